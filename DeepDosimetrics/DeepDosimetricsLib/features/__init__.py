"""Classic features: radiomics, dose-volume metrics and their result tables."""
