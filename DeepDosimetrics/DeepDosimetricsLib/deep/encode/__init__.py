"""Encoding patients to features, reconstruction, quality metrics and latent traversal."""
