"""The module panels checked without Slicer (both modules: DeepDosimetrics, DeepDosimetricsOutcome, and the
panel base they share, mrml/panel.py): the .ui against the Widget code (handlers, CTK string lists),
the panel's defaults against the library's, the requirements list against pyproject.toml and the first-use
install decision, and the offscreen rendering of the panel picture."""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: the extension's modules; each Widget inherits the shared plumbing of mrml/panel.py (JobPanel)
MODULES = ("DeepDosimetrics", "DeepDosimetricsOutcome")
PANEL_FILE = ROOT / "DeepDosimetrics" / "DeepDosimetricsLib" / "mrml" / "panel.py"


def module_file(module: str) -> Path:
    return ROOT / module / f"{module}.py"


def ui_file(module: str) -> Path:
    return ROOT / module / "Resources" / "UI" / f"{module}.ui"


def class_def(path: Path, name: str) -> ast.ClassDef:
    tree = ast.parse(path.read_text())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def widget_class(name: str, module: str = "DeepDosimetrics") -> ast.ClassDef:
    return class_def(module_file(module), name)


def methods(cls: ast.ClassDef) -> set:
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("module", MODULES)
def test_every_button_is_connected_to_an_existing_handler(module):
    """Buttons are connected by name in ``setupPanel`` ((name, handler) pairs; Cancel by the panel base)."""
    buttons = {w.get("name") for w in ET.parse(ui_file(module)).iter("widget") if w.get("class") == "QPushButton"}
    widget, panel = widget_class(f"{module}Widget", module), class_def(PANEL_FILE, "JobPanel")
    assert [ast.unparse(b) for b in widget.bases] == ["JobPanel"]
    source = ast.unparse(widget) + ast.unparse(panel)
    pairs = dict(re.findall(r"\('(\w+Button)', self\.(\w+)\)", source))
    assert "setupPanel(" in ast.unparse(widget) and pairs.get("cancelButton") == "onCancel"
    assert buttons - set(pairs) == set(), f"buttons without a handler: {sorted(buttons - set(pairs))}"
    missing = {b: h for b, h in pairs.items() if h not in methods(widget) | methods(panel)}
    assert not missing, f"handlers absent from the Widget: {missing}"
    assert "getattr(self.ui, name).connect('clicked(bool)', handler)" in ast.unparse(panel)


@pytest.mark.parametrize("module", MODULES)
def test_name_filters_are_one_pattern_per_string(module):
    """CTK reads a stringlist: "*.yaml *.yml" in one entry is one pattern that no file name matches."""
    for widget in ET.parse(ui_file(module)).iter("widget"):
        for prop in widget.findall("property[@name='nameFilters']"):
            patterns = [s.text for s in prop.iter("string")]
            assert patterns and all(" " not in p for p in patterns), (widget.get("name"), patterns)
    names = {w.get("name"): w for w in ET.parse(ui_file(module)).iter("widget")}
    field, expected = {"DeepDosimetrics": ("radiomicsParameterFileLineEdit", ["*.yaml", "*.yml", "*.json"]),
                       "DeepDosimetricsOutcome": ("clinicalFileLineEdit", ["*.csv"])}[module]
    assert [s.text for s in names[field].iter("string") if s.text.startswith("*")] == expected


def test_path_fields_can_be_cleared():
    """Every ctkPathLineEdit (of either module: the panel base loads both) is found by class and an emptied
    one clears its parameter."""
    source = ast.unparse(class_def(PANEL_FILE, "JobPanel"))
    assert "findChildren(uiWidget, className='ctkPathLineEdit')" in source
    assert "validInputChanged(bool)" in source and "_onPathEdited" in source
    assert "loadUI(self.resourcePath(f'UI/{self.moduleName}.ui'))" in source


def test_panel_defaults_are_the_library_defaults():
    sys.path.insert(0, str(ROOT / "DeepDosimetrics"))
    from DeepDosimetricsLib.cli import build_parser
    from DeepDosimetricsLib.deep.encode.settings import EncodeSettings

    node = widget_class("DeepDosimetricsParameterNode")
    fields = {a.target.id: ast.unparse(a) for a in node.body if isinstance(a, ast.AnnAssign)}
    assert fields["overlap"].endswith("= DEFAULT_OVERLAP")
    assert "Choice(DEVICES)" in fields["device"] and "Choice(tuple(CHANNEL_SETS))" in fields["channels"]
    assert "Choice(RADIOMICS_PRESETS)" in fields["radiomicsPreset"]
    arguments = build_parser().parse_args(["encode", "--model", "M", "--cohort", "C", "--out", "O"])
    assert arguments.overlap == EncodeSettings().overlap
    assert build_parser().parse_args(["encode", "--model", "M", "--cohort", "C", "--out", "O", "--device", "mps"])
    node = widget_class("DeepDosimetricsOutcomeParameterNode", "DeepDosimetricsOutcome")
    fields = {a.target.id: ast.unparse(a) for a in node.body if isinstance(a, ast.AnnAssign)}
    assert "Choice(MODELS)" in fields["predictModel"] and fields["predictModel"].endswith("DEFAULT_PROTOCOL.model")
    assert fields["folds"].endswith("DEFAULT_PROTOCOL.folds") and fields["repeats"].endswith("DEFAULT_PROTOCOL.repeats")


@pytest.mark.parametrize("command, owner, name, value, shown", [
    ("cache", "DeepDosimetricsLib.deep.cache.store:CacheConfig", "margin_mm", 12.5, "(default 12.5)"),
    ("dvh", "DeepDosimetricsLib.features.dosimetrics", "DEFAULT_BIN_WIDTH_GY", 0.25, "(default 0.25)"),
    ("radiomics", "DeepDosimetricsLib.features.radiomics", "DEFAULT_IMAGE", "dose", "default dose"),
    ("radiomics", "DeepDosimetricsLib.features.radiomics", "IMAGE_KINDS", ("ct", "dose", "pet"), "{ct,dose,pet}"),
    ("synth", "DeepDosimetricsLib.data.phantoms.config", "DEFAULT_PATIENTS", 9, "(default 9)"),
    ("predict", "DeepDosimetricsLib.analysis.job:PredictSettings", "folds", 7, "outer folds (default 7)"),
])
def test_cli_help_reads_the_library_values(command, owner, name, value, shown, monkeypatch, capsys):
    """A default or a list of choices the --help restates comes from the library: change it there, the help
    follows."""
    import importlib

    from DeepDosimetricsLib.cli import main

    module, _, attribute = owner.partition(":")
    target = importlib.import_module(module)
    monkeypatch.setattr(getattr(target, attribute) if attribute else target, name, value)
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert shown in " ".join(capsys.readouterr().out.split())


def test_outcome_analysis_lives_in_its_own_module():
    """The outcome section moved out of DeepDosimetrics (its .ui and code) into DeepDosimetricsOutcome."""
    main = module_file("DeepDosimetrics").read_text() + ui_file("DeepDosimetrics").read_text()
    for name in ("predictOutcome", "predictButton", "clinicalFile", "featureTables", "outcomeCollapsibleButton"):
        assert name not in main, name
    assert "outcomeCollapsibleButton" in ui_file("DeepDosimetricsOutcome").read_text()


# ------------------------------------------------------------------------------------- requirements
def test_requirements_list_and_pyproject_agree():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    from DeepDosimetricsLib.runtime.requirements import REQUIREMENTS, TOOL_EXTRAS

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {(None, r) for r in project["dependencies"]}
    for extra, entries in project.get("optional-dependencies", {}).items():
        if extra not in TOOL_EXTRAS:
            declared |= {(extra, r) for r in entries}
    listed = {(r.extra, r.pyproject) for r in REQUIREMENTS}
    assert declared - listed == set(), f"in pyproject.toml, not in runtime/requirements.py: {sorted(declared - listed, key=str)}"
    assert listed - declared == set(), f"in runtime/requirements.py, not in pyproject.toml: {sorted(listed - declared, key=str)}"


def test_first_use_installs_only_what_is_missing_and_asks_once():
    from DeepDosimetricsLib.runtime import requirements

    present = {"numpy", "SimpleITK", "vtk", "slicer", "scipy", "radiomics"}
    calls = []

    def find_spec(name):
        return object() if name in present else None

    def pip_install(specs):
        calls.append(("pip", list(specs)))
        present.update(r.import_name for r in requirements.REQUIREMENTS if r.pip in specs)

    def install_torch(spec):
        calls.append(("torch", spec))
        present.add("torch")
        return object()

    asked = []
    assert requirements.ensure([None], lambda m: asked.append(m) or True, pip_install, install_torch, find_spec)
    assert len(asked) == 1 and "pandas>=" in asked[0]
    installed = calls[0][1]
    assert {"pandas>=1.5", "psutil>=5.9"} <= set(installed)
    assert not any(s.startswith(("numpy", "SimpleITK", "vtk", "torch", "pyradiomics")) for s in installed)
    assert calls[1][0] == "torch" and calls[1][1].startswith(">=")
    calls.clear()
    assert requirements.ensure([None], lambda m: pytest.fail("asked again"), pip_install, install_torch, find_spec)
    assert calls == []


def test_first_use_declined_or_impossible():
    from DeepDosimetricsLib.runtime import requirements
    from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError

    nothing = lambda name: None  # noqa: E731
    with pytest.raises(DeepDosimetricsError, match="reinstall Slicer"):
        requirements.ensure([None], lambda m: True, pytest.fail, pytest.fail, nothing)
    only_slicer = lambda name: object() if name in ("numpy", "SimpleITK", "slicer") else None  # noqa: E731
    with pytest.raises(DeepDosimetricsError, match="SlicerRadiomics from the Extensions Manager"):
        requirements.ensure([None], lambda m: True, pytest.fail, pytest.fail, only_slicer)
    no_pandas = lambda name: None if name == "pandas" else object()  # noqa: E731
    assert requirements.ensure([None], lambda m: False, pytest.fail, pytest.fail, no_pandas) is False
    assert [r.name for r in requirements.requirements(["review"])] == ["trame-slicer"]
    trame = next(r for r in requirements.REQUIREMENTS if r.name == "trame-slicer")
    assert trame.pip == "trame-slicer==2.0.0"  # no [standalone]: Slicer is slicer-core


# ------------------------------------------------------------------------------------- picture
@pytest.mark.parametrize("module, min_height", [("DeepDosimetrics", 900), ("DeepDosimetricsOutcome", 500)])
def test_panel_renders_offscreen(tmp_path, monkeypatch, module, min_height):
    pytest.importorskip("PySide6", reason="PySide6 is not installed (pip install PySide6-Essentials)")
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    sys.path.insert(0, str(ROOT / "Utilities"))
    import render_panel

    assert module in render_panel.MODULES
    out = render_panel.render(tmp_path / "panel.png", module=module)
    header = out.read_bytes()[:24]
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and width >= 400 and height > min_height
    text = render_panel.qt_ui_text(render_panel.module_ui(module))
    assert "ctk" not in text and "qMRML" not in text
