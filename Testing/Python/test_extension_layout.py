"""The Slicer extension's layout: files a Slicer developer expects, complete CMake lists, .s4ext keys,
each module's UI bound to its parameter node (both modules: DeepDosimetrics, DeepDosimetricsOutcome).
Needs neither Slicer nor slicer-core."""

from __future__ import annotations

import ast
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "DeepDosimetrics"
LIB = MODULE / "DeepDosimetricsLib"
#: the extension's modules, in the order of the top CMakeLists.txt; they share DeepDosimetricsLib
MODULES = ("DeepDosimetrics", "DeepDosimetricsOutcome")
#: what every module's Widget inherits (the .ui loading, parameter node and job plumbing)
PANEL_FILE = LIB / "mrml" / "panel.py"

#: widget class -> parameter types the parameter node wrapper can bind it to
WIDGET_TYPES = {
    "qMRMLNodeComboBox": ("vtkMRML",),
    "QComboBox": ("Choice",),
    "ctkPathLineEdit": ("Path",),
    "QCheckBox": ("bool",),
    "QSpinBox": ("int",),
    "QDoubleSpinBox": ("float",),
    "ctkSliderWidget": ("float",),
    "QLineEdit": ("str",),
}


def cmake_list(text: str, variable: str, module: str = "DeepDosimetrics") -> list[str]:
    """Entries of ``set(VARIABLE ...)`` in a module's CMake file."""
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    entries = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    return [e.replace("${MODULE_NAME}", module) for e in entries if e]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG header."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def parameter_fields(module: str = "DeepDosimetrics") -> dict[str, str]:
    """Field name -> annotation text of the @parameterNodeWrapper class in <module>.py."""
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {
                item.target.id: ast.unparse(item.annotation)
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    raise AssertionError(f"no @parameterNodeWrapper class in {module}.py")


def test_expected_files_exist():
    for relative in (
        "CMakeLists.txt",
        "DeepDosimetrics.s4ext",
        "README.md",
        "DeepDosimetrics/CMakeLists.txt",
        "DeepDosimetrics/DeepDosimetrics.py",
        "DeepDosimetrics/Resources/UI/DeepDosimetrics.ui",
        "DeepDosimetrics/Resources/Icons/DeepDosimetrics.png",
        "DeepDosimetrics/DeepDosimetricsLib/__init__.py",
        "DeepDosimetricsOutcome/CMakeLists.txt",
        "DeepDosimetricsOutcome/DeepDosimetricsOutcome.py",
        "DeepDosimetricsOutcome/Resources/UI/DeepDosimetricsOutcome.ui",
        "DeepDosimetricsOutcome/Resources/Icons/DeepDosimetricsOutcome.png",
        "Resources/Icons/DeepDosimetrics.png",
    ):
        assert (ROOT / relative).is_file(), f"{relative} is missing"


def test_icons_are_128_pixel_pngs():
    icons = [ROOT / "Resources/Icons/DeepDosimetrics.png"] + [ROOT / m / f"Resources/Icons/{m}.png" for m in MODULES]
    for icon in icons:
        assert png_size(icon) == (128, 128), icon


@pytest.mark.parametrize("module", MODULES)
def test_only_the_module_file_sits_in_the_module_folder(module):
    """Every .py directly in a module folder is taken for a Slicer module: helpers live in the one Lib."""
    assert sorted(p.name for p in (ROOT / module).glob("*.py")) == [f"{module}.py"]
    if module != "DeepDosimetrics":
        assert not list((ROOT / module).rglob("*Lib")), "the extension has one library: DeepDosimetricsLib"
        assert "from DeepDosimetricsLib" in (ROOT / module / f"{module}.py").read_text()


def test_top_cmakelists_describes_the_extension():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"project\(\s*DeepDosimetrics\s*\)", text)
    for variable in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{variable}\s+"[^"]+"\)', text), f"EXTENSION_{variable} not set"
    assert 'set(EXTENSION_DEPENDS "SlicerRadiomics PyTorch")' in text
    ordered = [
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(DeepDosimetrics)",
        "add_subdirectory(DeepDosimetricsOutcome)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ]
    positions = [text.find(line) for line in ordered]
    assert all(p >= 0 for p in positions), dict(zip(ordered, positions))
    assert positions == sorted(positions), "CMake statements out of order"


def test_s4ext_has_the_classic_keys():
    keys = {}
    for line in (ROOT / "DeepDosimetrics.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            keys[key] = value.strip()
    for key in ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "description", "screenshoturls", "enabled"):
        assert key in keys, f".s4ext lacks '{key}'"
    assert keys["depends"].split() == ["SlicerRadiomics", "PyTorch"]
    top = (ROOT / "CMakeLists.txt").read_text()
    assert keys["iconurl"] in top and keys["homepage"] in top, ".s4ext and CMakeLists.txt disagree"


def test_module_cmakelists_lists_every_library_file():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    expected = ["DeepDosimetrics.py"] + sorted(
        p.relative_to(MODULE).as_posix() for p in LIB.rglob("*.py") if "__pycache__" not in p.parts
    )
    missing = sorted(set(expected) - set(scripts))
    stale = sorted(set(scripts) - set(expected))
    assert not missing, f"run Utilities/update_cmake_lists.py (MODULE_PYTHON_SCRIPTS lacks {missing})"
    assert not stale, f"listed in MODULE_PYTHON_SCRIPTS but absent: {stale}"


def test_outcome_cmakelists_lists_its_files():
    """The second module lists its own files only; the Lib is installed once, by DeepDosimetrics."""
    folder = ROOT / "DeepDosimetricsOutcome"
    text = (folder / "CMakeLists.txt").read_text()
    assert cmake_list(text, "MODULE_PYTHON_SCRIPTS", folder.name) == [f"{folder.name}.py"]
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert files == {"CMakeLists.txt", f"{folder.name}.py"} | set(cmake_list(text, "MODULE_PYTHON_RESOURCES", folder.name))


@pytest.mark.parametrize("module", MODULES)
def test_module_cmakelists_lists_every_resource(module):
    folder = ROOT / module
    text = (folder / "CMakeLists.txt").read_text()
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES", module)
    expected = {f"Resources/Icons/{module}.png", f"Resources/UI/{module}.ui"} | {
        p.relative_to(MODULE).as_posix()
        for p in (LIB / "Resources").rglob("*")
        if module == "DeepDosimetrics" and p.is_file() and p.suffix in (".yaml", ".yml", ".json", ".csv", ".txt")
    }
    missing = sorted(expected - set(resources))
    assert not missing, f"run Utilities/update_cmake_lists.py (MODULE_PYTHON_RESOURCES lacks {missing})"
    absent = sorted(r for r in resources if not (folder / r).is_file())
    assert not absent, f"listed in MODULE_PYTHON_RESOURCES but absent: {absent}"
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS", text, re.S)
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text, re.S)


def ui_file(module: str) -> Path:
    return ROOT / module / "Resources" / "UI" / f"{module}.ui"


@pytest.mark.parametrize("module", MODULES)
def test_ui_parses_and_binds_every_parameter_widget(module):
    tree = ET.parse(ui_file(module))
    fields = parameter_fields(module)
    bound = {}
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", f"{widget.get('name')}: SlicerParameterName must be dynamic"
                name = prop.find("string").text
                assert name in fields, f"{widget.get('name')} is bound to '{name}', not a parameter node field"
                accepted = WIDGET_TYPES.get(widget.get("class"))
                assert accepted, f"{widget.get('name')}: no parameter connector for {widget.get('class')}"
                assert any(a in fields[name] for a in accepted), (
                    f"{widget.get('name')} ({widget.get('class')}) cannot show '{name}: {fields[name]}'"
                )
                bound[name] = widget.get("name")
    assert sorted(bound) == sorted(fields), f"fields without a widget: {sorted(set(fields) - set(bound))}"


@pytest.mark.parametrize("module", MODULES)
def test_ui_has_the_widgets_the_module_uses(module):
    """Widgets named in the module's Widget (``self.ui.x`` or a button name given to ``setupPanel``) and in the
    panel base it inherits (``mrml/panel.py``) exist in the module's .ui."""
    names = {w.get("name") for w in ET.parse(ui_file(module)).iter("widget")}
    source = (ROOT / module / f"{module}.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source + PANEL_FILE.read_text()))
    used |= set(re.findall(r"\(\"(\w+Button)\", self\.\w+\)", source))
    assert {"progressBar", "logTextEdit", "cancelButton"} <= used
    assert used - names == set(), f"the widget uses widgets absent from the .ui: {sorted(used - names)}"
    required = {"DeepDosimetrics": ("trainButton", "encodeButton", "radiomicsButton", "dvhButton"),
                "DeepDosimetricsOutcome": ("predictButton", "addFeatureTableButton")}[module]
    assert set(required) <= names


def test_screenshots_named_in_cmake_exist():
    text = (ROOT / "CMakeLists.txt").read_text()
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS\s+"([^"]+)"\)', text).group(1).split()
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        path = ROOT / "Resources" / "Screenshots" / name
        assert path.is_file(), f"{path} (named in EXTENSION_SCREENSHOTURLS) is missing"


def test_cmake_minimum_is_slicers():
    """Slicer requires CMake 3.20.6 or later (its extension template: 3.20.6...3.28)."""
    match = re.search(r"cmake_minimum_required\(VERSION (\d+)\.(\d+)\.(\d+)\.\.\.([\d.]+)", (ROOT / "CMakeLists.txt").read_text())
    assert match and tuple(int(v) for v in match.groups()[:3]) >= (3, 20, 6)


def test_extensions_index_json_entry_agrees_with_s4ext():
    import json

    entry = json.loads((ROOT / "DeepDosimetrics.json").read_text())
    for key in ("$schema", "build_dependencies", "category", "scm_url", "scm_revision", "tier"):
        assert key in entry, f"DeepDosimetrics.json lacks {key}"
    keys = dict(line.partition(" ")[::2] for line in (ROOT / "DeepDosimetrics.s4ext").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert entry["build_dependencies"] == keys["depends"].split()
    assert entry["scm_url"] == keys["scmurl"].strip() and entry["category"] == keys["category"].strip()


@pytest.mark.parametrize("module", MODULES)
def test_panel_picture_is_in_the_readme(module):
    assert (ROOT / "Resources" / "Screenshots" / f"{module}-panel.png").is_file()
    assert f"Resources/Screenshots/{module}-panel.png" in (ROOT / "README.md").read_text()
