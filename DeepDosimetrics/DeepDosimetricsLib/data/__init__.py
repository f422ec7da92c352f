"""Data in: geometry, patients, cohorts, structure names, phantoms and importers."""
