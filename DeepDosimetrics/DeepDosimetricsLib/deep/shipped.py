"""Pre-trained models shipped with DeepDosimetrics: a name (``openkbp-hn``) stands for a model folder.

Each shipped model is an ordinary model folder under ``Resources/models/<name>/`` (``model.json``,
``model.pt``) with its model card ``MODEL_CARD.md`` (data, recipe, fidelity, intended use and limits).
Its ``model.json`` records the SHA-256 of its weights, which ``load_model`` checks before reading them.
Wherever a model folder is asked for (``encode --model``, ``review --model``, the panels), a shipped
model's name may be given instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from DeepDosimetricsLib.runtime.resources import resource_path

SHIPPED_MODELS_DIR = resource_path("models")
MODEL_CARD = "MODEL_CARD.md"


def shipped_models() -> dict[str, Path]:
    """Name -> folder of every shipped model (folders of ``Resources/models`` holding a model.json)."""
    if not SHIPPED_MODELS_DIR.is_dir():
        return {}
    return {folder.name: folder for folder in sorted(SHIPPED_MODELS_DIR.iterdir()) if (folder / "model.json").is_file()}


def resolve_model(model: Union[str, Path]) -> Path:
    """The folder of ``model``: the path as given, or, when no such path exists, the shipped model of that name
    (a user's own ``./openkbp-hn`` folder wins over the shipped one)."""
    path = Path(model).expanduser()
    if not path.exists():
        shipped = shipped_models()
        if str(model) in shipped:
            return shipped[str(model)]
    return path


def shipped_names_hint() -> str:
    """'; shipped models: a, b' (for error messages), or '' when none is shipped."""
    names = list(shipped_models())
    return f"; shipped models: {', '.join(names)}" if names else ""


__all__ = ["SHIPPED_MODELS_DIR", "MODEL_CARD", "shipped_models", "resolve_model", "shipped_names_hint"]
