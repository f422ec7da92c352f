"""The deep path: channels, cache, tiles, model, training, encoding and reconstruction."""
