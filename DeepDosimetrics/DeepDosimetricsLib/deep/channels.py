"""Network input channels: gray-scale windows of the CT, structure masks and dose, all in [0, 1].

A channel is described by a :class:`ChannelSpec` and written as a short label:

- ``window:NAME`` with NAME a preset of :data:`WINDOW_PRESETS` (``lung``, ``soft_tissue`` also
  called ``mediastinum``, ``bone``, ``brain``, ``full``), or ``window:LEVEL/WIDTH`` in HU
  (e.g. ``window:-200/600``). HU ``level - width/2`` maps to 0, ``level + width/2`` to 1, clipped.
- ``mask:NAME``: a structure of the cache (``mask:PTV`` is always the target), 0 or 1.
- ``dose`` (the same as ``dose:80``): dose / 80 Gy, clipped to [0, 1]; ``dose:GY`` divides by a
  fixed maximum of GY Gy; ``dose:prescription`` divides by the patient's prescription (known from the
  cohort or from the target's name, e.g. PTV70 -> 70 Gy), so 1 means 100% of the prescription.

Channel sets are named in :data:`CHANNEL_SETS`: ``default`` (soft-tissue window, PTV, dose: the
prototype's set) and ``full`` (the 5 windows, PTV, dose: 7 channels). The windows are cheap functions
of HU, so they are computed per tile when a tile is read (:func:`compute_channels`), never stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from DeepDosimetricsLib.runtime.errors import InputError

#: HU range of stored CT values (the full-range window spans it)
HU_MIN, HU_MAX = -1024, 3071
#: HU of the padding outside a volume (air)
AIR_HU = HU_MIN
#: Gy that a plain ``dose`` channel divides by
DEFAULT_DOSE_MAX_GY = 80.0

#: window name -> (level, width) in HU
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "full": ((HU_MIN + HU_MAX) / 2.0, float(HU_MAX - HU_MIN)),
}
#: other spellings accepted for the presets -> canonical preset name
WINDOW_ALIASES: dict[str, str] = {
    "mediastinum": "soft_tissue",
    "soft-tissue": "soft_tissue",
    "softtissue": "soft_tissue",
    "soft": "soft_tissue",
    "full_range": "full",
    "full-range": "full",
}

#: channel-set name -> comma-separated channel labels
CHANNEL_SETS: dict[str, str] = {
    "default": "window:soft_tissue,mask:PTV,dose",
    "full": "window:lung,window:soft_tissue,window:bone,window:brain,window:full,mask:PTV,dose",
}

#: help text for a command's ``--channels`` option
CHANNELS_HELP = (
    "input channels: a set (default = window:soft_tissue,mask:PTV,dose; full = the 5 windows lung, "
    "soft_tissue, bone, brain, full + mask:PTV + dose) or a comma-separated list of window:PRESET, "
    "window:LEVEL/WIDTH (HU), mask:STRUCTURE, dose (= dose:80, Gy/80), dose:GY, dose:prescription"
)

KINDS = ("window", "mask", "dose")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"


@dataclass(frozen=True)
class ChannelSpec:
    """One input channel.

    kind: ``window``, ``mask`` or ``dose``.
    name: the window preset (or ``LEVEL/WIDTH`` for a custom window), the structure name of a mask,
        ``fixed`` or ``prescription`` for dose.
    level, width: the window in HU (windows only).
    dose_max_gy: the Gy that maps to 1 for a fixed dose scaling (None with ``prescription``).
    """

    kind: str
    name: str
    level: float = 0.0
    width: float = 0.0
    dose_max_gy: Optional[float] = None

    @property
    def label(self) -> str:
        """Canonical text of the channel; ``parse_channels(label)`` gives this spec back."""
        if self.kind == "window":
            return f"window:{self.name}"
        if self.kind == "mask":
            return f"mask:{self.name}"
        if self.name == "prescription":
            return "dose:prescription"
        if self.dose_max_gy == DEFAULT_DOSE_MAX_GY:
            return "dose"
        return f"dose:{self.dose_max_gy:g}"

    @property
    def lower_hu(self) -> float:
        """HU that maps to 0 (windows)."""
        return self.level - self.width / 2.0

    @property
    def upper_hu(self) -> float:
        """HU that maps to 1 (windows)."""
        return self.level + self.width / 2.0

    def __str__(self) -> str:
        return self.label


def window(level: float, width: float, name: Optional[str] = None) -> ChannelSpec:
    """A window channel; named after a preset when ``name`` is given, else ``LEVEL/WIDTH``."""
    if not width > 0:
        raise InputError(f"window width must be positive, got {width:g} HU")
    return ChannelSpec("window", name or f"{level:g}/{width:g}", float(level), float(width))


def mask(name: str) -> ChannelSpec:
    """A structure-mask channel."""
    return ChannelSpec("mask", name)


def dose(max_gy: Optional[float] = DEFAULT_DOSE_MAX_GY) -> ChannelSpec:
    """A dose channel divided by ``max_gy`` Gy, or by the prescription when ``max_gy`` is None."""
    if max_gy is None:
        return ChannelSpec("dose", "prescription")
    if not max_gy > 0:
        raise InputError(f"dose scaling must be a positive number of Gy, got {max_gy:g}")
    return ChannelSpec("dose", "fixed", dose_max_gy=float(max_gy))


def _parse_one(item: str) -> ChannelSpec:
    kind, _, argument = item.partition(":")
    kind, argument = kind.strip().lower(), argument.strip()
    if kind == "window":
        key = argument.lower()
        key = WINDOW_ALIASES.get(key, key)
        if key in WINDOW_PRESETS:
            return window(*WINDOW_PRESETS[key], name=key)
        match = re.fullmatch(rf"\s*({_NUMBER})\s*/\s*({_NUMBER})\s*", argument)
        if match:
            return window(float(match.group(1)), float(match.group(2)))
        presets = ", ".join(name for name in WINDOW_PRESETS if name not in WINDOW_ALIASES)
        raise InputError(
            f"unknown window {argument!r} in channel {item!r}: use one of {presets} or LEVEL/WIDTH in HU "
            "(e.g. window:-200/600)"
        )
    if kind == "mask":
        if not argument:
            raise InputError(f"channel {item!r} names no structure: use e.g. mask:PTV")
        return mask(argument)
    if kind == "dose":
        if not argument:
            return dose()
        if argument.lower() in ("prescription", "rx"):
            return dose(None)
        if re.fullmatch(_NUMBER, argument):
            return dose(float(argument))
        raise InputError(
            f"unknown dose scaling {argument!r} in channel {item!r}: use dose (= dose:{DEFAULT_DOSE_MAX_GY:g}), "
            "dose:prescription or dose:GY"
        )
    raise InputError(
        f"unknown channel {item!r}: a channel set ({', '.join(CHANNEL_SETS)}) or a comma-separated list of "
        "window:NAME|window:LEVEL/WIDTH, mask:STRUCTURE, dose|dose:prescription|dose:GY"
    )


def parse_channels(text: Union[str, Sequence[Union[str, ChannelSpec]]]) -> list[ChannelSpec]:
    """Channel specs from a set name (``default``, ``full``) or a list such as ``window:lung,mask:PTV,dose``.

    A sequence of labels or specs is accepted too. Raises InputError on an unknown name or a repeat.
    """
    if isinstance(text, str):
        key = text.strip()
        if key.lower() in CHANNEL_SETS:
            key = CHANNEL_SETS[key.lower()]
        items: list = [item for item in key.split(",") if item.strip()]
    else:
        items = list(text)
    if not items:
        raise InputError("no channels given: use a channel set (default, full) or a list like window:lung,dose")
    specs = [item if isinstance(item, ChannelSpec) else _parse_one(item) for item in items]
    labels = [spec.label for spec in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise InputError(f"channel(s) given more than once: {', '.join(repeated)}")
    return specs


def channel_labels(specs: Sequence[ChannelSpec]) -> list[str]:
    """The labels of the specs (what a model configuration stores)."""
    return [spec.label for spec in specs]


def dose_scale_gy(spec: ChannelSpec, prescription_gy: Optional[float] = None) -> float:
    """The Gy that maps to 1 for a dose channel; InputError when a needed prescription is unknown."""
    if spec.dose_max_gy is not None:
        return spec.dose_max_gy
    if prescription_gy is None or not prescription_gy > 0:
        raise InputError(
            "channel 'dose:prescription' needs the patient's prescription, which is not known: "
            f"use dose:GY with a fixed maximum (e.g. dose:{DEFAULT_DOSE_MAX_GY:g})"
        )
    return float(prescription_gy)


def window_values(hu: np.ndarray, level: float, width: float, out: Optional[np.ndarray] = None) -> np.ndarray:
    """HU mapped to [0, 1] by a (level, width) window, as float32 (into ``out`` when given)."""
    lower = level - width / 2.0
    if out is None:
        out = np.empty(hu.shape, dtype=np.float32)
    np.subtract(hu, np.float32(lower), out=out, dtype=np.float32, casting="unsafe")
    np.multiply(out, np.float32(1.0 / width), out=out)
    return np.clip(out, 0.0, 1.0, out=out)


def compute_channels(
    specs: Sequence[ChannelSpec],
    hu: Optional[np.ndarray],
    masks: Optional[Mapping[str, np.ndarray]] = None,
    dose_gy: Optional[np.ndarray] = None,
    prescription_gy: Optional[float] = None,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """The channels of one tile as float32 (C, *shape) in [0, 1].

    hu: int16 (or float) HU; masks: structure name -> 0/1 array; dose_gy: dose in Gy (any float type).
    Every given array has the tile's shape. A channel whose input is missing raises InputError.
    """
    arrays = [a for a in (hu, dose_gy, *(masks or {}).values()) if a is not None]
    if not arrays:
        raise InputError("no input arrays to compute channels from")
    shape = arrays[0].shape
    if out is None:
        out = np.empty((len(specs), *shape), dtype=np.float32)
    for index, spec in enumerate(specs):
        target = out[index]
        if spec.kind == "window":
            if hu is None:
                raise InputError(f"channel {spec.label!r} needs the CT")
            window_values(hu, spec.level, spec.width, out=target)
        elif spec.kind == "mask":
            if not masks or spec.name not in masks:
                raise InputError(f"no structure {spec.name}; channel {spec.label!r} needs it")
            np.copyto(target, np.not_equal(masks[spec.name], 0))
        elif spec.kind == "dose":
            if dose_gy is None:
                raise InputError(f"no dose; channel {spec.label!r} needs it")
            scale = dose_scale_gy(spec, prescription_gy)
            np.copyto(target, dose_gy, casting="unsafe")  # float16 -> float32 first: float16 math is slow
            np.multiply(target, np.float32(1.0 / scale), out=target)
            np.clip(target, 0.0, 1.0, out=target)
        else:
            raise InputError(f"unknown channel kind {spec.kind!r}")
    return out


def to_units(spec: ChannelSpec, values: np.ndarray, prescription_gy: Optional[float] = None) -> np.ndarray:
    """Channel values in [0, 1] back to physical units: HU within the window, Gy, or mask probability."""
    values = np.asarray(values, dtype=np.float32)
    if spec.kind == "window":
        return (np.float32(spec.lower_hu) + values * np.float32(spec.width)).astype(np.float32)
    if spec.kind == "dose":
        return (values * np.float32(dose_scale_gy(spec, prescription_gy))).astype(np.float32)
    if spec.kind == "mask":
        return np.clip(values, 0.0, 1.0).astype(np.float32)
    raise InputError(f"unknown channel kind {spec.kind!r}")
