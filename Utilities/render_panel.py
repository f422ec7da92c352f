"""Render the extension's module panels (DeepDosimetrics, DeepDosimetricsOutcome) offscreen with PySide6.

Desktop Slicer cannot run on headless machines, so the picture is drawn by plain Qt: the Slicer/CTK widget
classes are replaced by their Qt base classes (ctkCollapsibleButton -> QGroupBox, ctkPathLineEdit ->
QLineEdit, qMRMLNodeComboBox -> QComboBox) for the picture only, and the combo boxes and spin boxes show the
parameter node's choices and defaults, read from the library as the module reads them.

    QT_QPA_PLATFORM=offscreen python Utilities/render_panel.py     # Resources/Screenshots/<module>-panel.png
"""

from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("DeepDosimetrics", "DeepDosimetricsOutcome")


def module_ui(module: str = "DeepDosimetrics") -> Path:
    """The module's .ui (``<module>/Resources/UI/<module>.ui``)."""
    return ROOT / module / "Resources" / "UI" / f"{module}.ui"


def picture(module: str = "DeepDosimetrics") -> Path:
    """Where the README's picture of the module's panel is."""
    return ROOT / "Resources" / "Screenshots" / f"{module}-panel.png"


UI_FILE, OUT = module_ui(), picture()
#: Slicer/CTK class -> the Qt class drawn in its place
QT_CLASS = {"ctkCollapsibleButton": "QGroupBox", "ctkPathLineEdit": "QLineEdit", "qMRMLNodeComboBox": "QComboBox",
            "qMRMLWidget": "QWidget", "ctkSliderWidget": "QDoubleSpinBox"}
#: what the node selectors show in the picture
NODE_EXAMPLES = {"ctVolume": "pt_001 CT", "segmentation": "pt_001 structures", "doseVolume": "pt_001 dose"}
PATH_EXAMPLES = {"cohortFolder": "/data/cohort", "modelFolder": "/data/model", "outputFolder": "/data/encoding",
                 "clinicalFile": "/data/cohort/clinical.csv", "analysisFolder": "/data/analysis"}


def panel_defaults() -> dict:
    """Parameter name -> (choices or None, default), from the library, as DeepDosimetrics.py reads them."""
    sys.path.insert(0, str(ROOT / "DeepDosimetrics"))
    from DeepDosimetricsLib.analysis.protocol import MODELS, ProtocolSettings
    from DeepDosimetricsLib.deep.channels import CHANNEL_SETS
    from DeepDosimetricsLib.deep.encode.settings import DEFAULT_OVERLAP
    from DeepDosimetricsLib.deep.train.training import TrainConfig
    from DeepDosimetricsLib.features.radiomics import DEFAULT_PRESET, preset_names
    from DeepDosimetricsLib.runtime.devices import DEFAULT_DEVICE, DEVICES

    protocol = ProtocolSettings()
    return {
        "radiomicsPreset": (preset_names(), DEFAULT_PRESET), "channels": (list(CHANNEL_SETS), "default"),
        "device": (list(DEVICES), DEFAULT_DEVICE), "predictModel": (list(MODELS), protocol.model),
        "trainingSteps": (None, TrainConfig().total_steps), "overlap": (None, DEFAULT_OVERLAP),
        "folds": (None, protocol.folds), "repeats": (None, protocol.repeats), "reconstruct": (None, True),
        "outcomeColumn": (None, "outcome"), "featureTables": (None, "dvh=dvh.csv radiomics=radiomics.csv"),
    }


def qt_ui_text(ui_file: Path = UI_FILE) -> str:
    """The .ui with Slicer/CTK classes replaced by Qt ones (custom widgets and connections removed)."""
    tree = ET.parse(ui_file)
    root = tree.getroot()
    for widget in root.iter("widget"):
        original = widget.get("class")
        if original in QT_CLASS:
            widget.set("class", QT_CLASS[original])
        for prop in list(widget.findall("property")):
            if prop.get("name") in ("nodeTypes", "filters", "nameFilters", "showChildNodeTypes", "noneEnabled",
                                    "addEnabled", "removeEnabled", "renameEnabled"):
                widget.remove(prop)
            elif prop.get("name") == "text" and widget.get("class") == "QGroupBox":
                prop.set("name", "title")
    for tag in ("customwidgets", "connections"):
        for element in root.findall(tag):
            root.remove(element)
    return ET.tostring(root, encoding="unicode")


def render(out: Path = OUT, width: int = 420, module: str = "DeepDosimetrics") -> Path:
    """Write the picture of the module's panel; returns its path."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import tempfile

    from PySide6.QtCore import QFile, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import (
        QApplication,
        QCheckBox,
        QComboBox,
        QDoubleSpinBox,
        QGroupBox,
        QLineEdit,
        QPushButton,
        QSpinBox,
    )

    app = QApplication.instance() or QApplication([])
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "panel.ui"
        path.write_text(qt_ui_text(module_ui(module)))
        ui_file = QFile(str(path))
        ui_file.open(QIODevice.ReadOnly)
        loader = QUiLoader()
        panel = loader.load(ui_file)
        ui_file.close()
    if panel is None:
        raise RuntimeError(f"Qt could not load the panel: {loader.errorString()}")
    defaults = panel_defaults()
    for child in panel.findChildren(QGroupBox):
        child.setStyleSheet("QGroupBox { font-weight: bold; margin-top: 1.2em; } "
                            "QGroupBox::title { subcontrol-origin: margin; left: 6px; }")
    for child in panel.findChildren(object):
        name = child.property("SlicerParameterName") if hasattr(child, "property") else None
        if not name:
            continue
        choices, default = defaults.get(name, (None, None))
        if isinstance(child, QComboBox):
            child.addItems(choices or [NODE_EXAMPLES.get(name, "None")])
            if default is not None:
                child.setCurrentText(str(default))
        elif isinstance(child, QSpinBox):
            child.setMaximum(10_000_000)
            child.setValue(int(default or 0))
        elif isinstance(child, QDoubleSpinBox):
            child.setValue(float(default or 0))
        elif isinstance(child, QCheckBox):
            child.setChecked(bool(default))
        elif isinstance(child, QLineEdit):
            child.setText(PATH_EXAMPLES.get(name, default or ""))
    enabled = re.compile(r"loadPatient|radiomics|dvh|train|encode|review|predict|addFeature")
    for button in panel.findChildren(QPushButton):
        button.setEnabled(bool(enabled.match(button.objectName())))
    panel.progressBar.setValue(40) if hasattr(panel, "progressBar") else None
    panel.resize(width, panel.sizeHint().height())
    panel.adjustSize()
    panel.resize(width, panel.sizeHint().height())
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.stem + ".part.png")
    if not panel.grab().save(str(partial)):
        raise RuntimeError(f"could not write {partial}")
    os.replace(partial, out)
    app.processEvents()
    return out


if __name__ == "__main__":
    for name in MODULES:
        print(render(picture(name), module=name))
