"""Typed configurations read from dictionaries (YAML files, model.json, messages): one clear error for bad keys."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Type, TypeVar

from DeepDosimetricsLib.runtime.errors import InputError

T = TypeVar("T")


def dataclass_from_dict(cls: Type[T], data: dict[str, Any], source: str, kind: str) -> T:
    """``cls(**data)``; an unknown key or a rejected value raises InputError naming ``source`` (and the
    ``kind`` of option for unknown keys, e.g. "training")."""
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise InputError(f"{source}: unknown {kind} option(s) {', '.join(unknown)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as error:
        raise InputError(f"{source}: {error}") from error
