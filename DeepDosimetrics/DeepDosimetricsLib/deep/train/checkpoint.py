"""Training checkpoints: one file holding everything ``--resume`` needs, written atomically.

The file is a ``torch.save`` of plain containers and tensors (state dicts, numbers, strings), read back
with ``torch.load(weights_only=True)``: a checkpoint is never unpickled as arbitrary objects. A
corrupt, truncated or foreign file is refused with an InputError; a failed write (full disk) leaves the
previous checkpoint untouched.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Union

import numpy as np

from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError, InputError

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "deepdosimetrics-training-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("step", "train_config", "model_config", "channels", "model", "optimizer", "scheduler",
                 "rng", "history", "early")


def rng_state() -> dict[str, Any]:
    """Random states of python, numpy and torch (CPU, and CUDA when present) as plain containers."""
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Union[str, Path], *, model, optimizer, scheduler, **fields: Any) -> None:
    """Write a checkpoint atomically (temporary file, fsync, rename). DeepDosimetricsError on failure."""
    from DeepDosimetricsLib.deep.model import plain_state_dict
    from DeepDosimetricsLib.runtime.atomic import torch_save_atomic

    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model": plain_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        **fields,
    }
    try:
        torch_save_atomic(payload, path)
    except OSError as error:
        raise DeepDosimetricsError(
            f"could not write checkpoint {path} ({error.strerror or error}); the previous checkpoint is intact"
        ) from error


def load_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """Read and check a checkpoint (InputError for a corrupt, truncated or foreign file)."""
    from DeepDosimetricsLib.deep.model import load_state_dict_file

    path = Path(path)
    data = load_state_dict_file(path, device="cpu")
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a DeepDosimetrics training checkpoint (format tag missing or foreign)")
    if int(data.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise InputError(f"{path}: checkpoint format {data.get('format_version')} is newer than this DeepDosimetrics")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise InputError(f"{path}: incomplete checkpoint (missing {', '.join(missing)})")
    return data
