"""Where the library's data files live (radiomics presets, structure synonyms, training defaults)."""

from __future__ import annotations

from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"


def resource_path(*parts: str) -> Path:
    """A file or folder under the library's ``Resources/``."""
    return RESOURCES.joinpath(*parts)
