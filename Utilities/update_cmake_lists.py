"""Rewrite the MODULE_PYTHON_SCRIPTS / MODULE_PYTHON_RESOURCES lists of DeepDosimetrics/CMakeLists.txt.

Slicer packages only the files its CMake lists name; run this after adding a library file:
``python Utilities/update_cmake_lists.py`` (the layout test fails until the lists are complete).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

RESOURCE_SUFFIXES = (".yaml", ".yml", ".json", ".csv", ".txt", ".md", ".png", ".pt")  # .pt: shipped models


def update(module: Path) -> str:
    """The CMakeLists text with complete lists of the library's scripts and resources."""
    lib = module / "DeepDosimetricsLib"
    scripts = sorted(p.relative_to(module).as_posix() for p in lib.rglob("*.py") if "__pycache__" not in p.parts)
    resources = sorted(
        p.relative_to(module).as_posix()
        for p in (lib / "Resources").rglob("*")
        if p.is_file() and p.suffix in RESOURCE_SUFFIXES
    )
    text = (module / "CMakeLists.txt").read_text()
    text = re.sub(
        r"(set\(MODULE_PYTHON_SCRIPTS\n  \$\{MODULE_NAME\}\.py\n)(.*?)(  \))",
        lambda m: m.group(1) + "".join(f"  {s}\n" for s in scripts) + m.group(3),
        text,
        flags=re.S,
    )
    text = re.sub(
        r"(set\(MODULE_PYTHON_RESOURCES\n  Resources/Icons/\$\{MODULE_NAME\}\.png\n"
        r"  Resources/UI/\$\{MODULE_NAME\}\.ui\n)(.*?)(  \))",
        lambda m: m.group(1) + "".join(f"  {s}\n" for s in resources) + m.group(3),
        text,
        flags=re.S,
    )
    return text


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    module_dir = root / "DeepDosimetrics"
    (module_dir / "CMakeLists.txt").write_text(update(module_dir))
    print(f"updated {module_dir / 'CMakeLists.txt'}")
