"""Training the tile autoencoder: sampling, the training loop, checkpoints."""
