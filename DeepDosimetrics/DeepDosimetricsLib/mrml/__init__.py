"""The MRML layer: patients and results as Slicer nodes and scenes (headless on slicer-core).

One module per concept; each imports ``slicer``, so none is imported with the package:
``from DeepDosimetricsLib import mrml`` then ``mrml.volumes.image_to_volume(...)`` imports the module on
first use.

- :mod:`.headless`: the scene and its logics outside the application; node collections
- :mod:`.volumes`: volume nodes <-> SimpleITK images and arrays (exact geometry); dose volumes
- :mod:`.segments`: segmentations and labelmaps <-> masks on a reference geometry
- :mod:`.patients`: a ``Patient`` <-> nodes
- :mod:`.display`: colour tables, window/level, the reconstruction set-up over the CT
- :mod:`.slices`: slice-view layers and headless slice pictures
- :mod:`.tables`: table nodes, DVH and ROC charts, showing a table
- :mod:`.features`: radiomics and dose-volume metrics of nodes as table nodes (the library computes)
- :mod:`.bundles`: ``.mrb`` scene bundles
- :mod:`.results`: encoding results (reconstructions, residuals) as nodes
- :mod:`.snapshots`: PNG snapshots (matplotlib, no Slicer) and the per-patient ``.mrb`` of ``encode --scene``
- :mod:`.application`: what the module takes from the Slicer application (first-use installation, scene
  saving) and headless stand-ins for the scripted-module API
- :mod:`.panel`: what the extension's modules share: the scripted-module API, the job Logic and panel bases
"""

from __future__ import annotations

import importlib

MODULES = ("headless", "volumes", "segments", "patients", "display", "slices", "tables", "features", "bundles",
           "results", "snapshots", "application", "panel")


def __getattr__(name: str):
    """``mrml.<module>`` imports that module on first use (each but snapshots imports slicer)."""
    if name in MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
