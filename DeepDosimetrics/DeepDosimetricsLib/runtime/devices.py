"""Compute devices: the choices offered everywhere and how a name becomes a ``torch.device``."""

from __future__ import annotations

import os
from typing import Optional

DEVICES = ("auto", "cpu", "cuda", "mps")
"""Device names the CLI and the Slicer panel offer (``cuda:N`` is accepted too)."""
DEFAULT_DEVICE = "auto"


def mps_available() -> bool:
    """Whether Apple's Metal backend is usable in this torch build."""
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: Optional[str] = DEFAULT_DEVICE, local_rank: Optional[int] = None):
    """A ``torch.device`` for auto|cpu|cuda|cuda:N|mps.

    Args:
        name: ``auto`` picks CUDA, then MPS, then the CPU.
        local_rank: plain ``cuda`` becomes ``cuda:<local_rank mod GPUs>``; default: torchrun's ``LOCAL_RANK``
            (0 outside torchrun).

    Raises:
        InputError: unknown name, or a device this machine does not have.
    """
    import torch

    from DeepDosimetricsLib.runtime.errors import InputError

    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else ("mps" if mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InputError(f"unknown device {name!r} ({error}); use one of {', '.join(DEVICES)} or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is available (torch.cuda.is_available() is False);"
                             " use --device cpu")
        if device.index is None:  # an explicit index: torch.cuda.set_device and DDP need one
            rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
            device = torch.device(f"cuda:{rank % torch.cuda.device_count()}")
    elif device.type == "mps" and not mps_available():
        raise InputError(f"--device {name}: Apple MPS is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported device {name!r}; use one of {', '.join(DEVICES)}")
    return device
