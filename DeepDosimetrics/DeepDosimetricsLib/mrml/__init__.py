"""The MRML layer: patients and results as Slicer nodes and scenes (headless on slicer-core)."""
