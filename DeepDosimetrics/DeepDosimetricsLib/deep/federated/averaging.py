"""The weighted average of model weights (FedAvg): the one implementation every federated path uses.

Sites send their weights after a round of local steps; the server replaces the global weights by their
average weighted by what each site trained on (tiles seen). Floating-point arrays are averaged in float64
and cast back to their dtype; integer arrays (counters) must agree and are taken as they are.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from DeepDosimetricsLib.runtime.errors import InputError


def _weights(weights: Sequence[float], count: int) -> np.ndarray:
    values = np.asarray([float(w) for w in weights], dtype=np.float64)
    if len(values) != count:
        raise InputError(f"federated average: {count} sites but {len(values)} weights")
    if count == 0:
        raise InputError("federated average: no site sent weights")
    bad = [i for i, w in enumerate(values) if not math.isfinite(w) or w < 0]
    if bad:
        raise InputError(f"federated average: site {bad[0]} has weight {values[bad[0]]} (weights must be finite, >= 0)")
    if values.sum() <= 0:
        raise InputError("federated average: every site's weight is 0 (no tiles seen)")
    return values / values.sum()


def weighted_average(sites: Sequence[Sequence[np.ndarray]], weights: Sequence[float]) -> list[np.ndarray]:
    """The weighted average of the sites' lists of arrays (Flower's NDArrays), array by array.

    Args:
        sites: one list of arrays per site, all with the same shapes and dtypes in the same order.
        weights: one weight per site (tiles seen); normalised here.
    """
    share = _weights(weights, len(sites))
    first = [np.asarray(a) for a in sites[0]]
    for index, arrays in enumerate(sites[1:], start=1):
        if len(arrays) != len(first):
            raise InputError(f"federated average: site {index} sent {len(arrays)} arrays, site 0 sent {len(first)}")
        for position, (a, b) in enumerate(zip(first, arrays)):
            if np.shape(b) != a.shape:
                raise InputError(f"federated average: array {position} of site {index} has shape {np.shape(b)}, "
                                 f"site 0's {a.shape} (another model configuration?)")
    out = []
    for position, reference in enumerate(first):
        if np.issubdtype(reference.dtype, np.floating) or np.issubdtype(reference.dtype, np.complexfloating):
            total = np.zeros(reference.shape, dtype=np.float64)
            for weight, arrays in zip(share, sites):
                total += weight * np.asarray(arrays[position], dtype=np.float64)
            out.append(total.astype(reference.dtype))
        else:
            for index, arrays in enumerate(sites[1:], start=1):
                if not np.array_equal(np.asarray(arrays[position]), reference):
                    raise InputError(f"federated average: integer array {position} differs between site 0 and "
                                     f"site {index} (counters cannot be averaged)")
            out.append(reference.copy())
    return out


def state_to_arrays(state: Mapping[str, Any]) -> list[np.ndarray]:
    """A torch state dict as a list of numpy arrays, in the state dict's key order."""
    return [value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value) for value in state.values()]


def arrays_to_state(arrays: Sequence[np.ndarray], template: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`state_to_arrays` against a state dict of the same model (torch tensors)."""
    import torch

    if len(arrays) != len(template):
        raise InputError(f"federated weights: {len(arrays)} arrays for a model of {len(template)} tensors")
    state = {}
    for (key, value), array in zip(template.items(), arrays):
        if tuple(np.shape(array)) != tuple(value.shape):
            raise InputError(f"federated weights: {key} has shape {np.shape(array)}, the model's {tuple(value.shape)}")
        state[key] = torch.as_tensor(np.asarray(array), dtype=value.dtype)
    return state


def average_state_dicts(states: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> dict[str, Any]:
    """The weighted average of torch state dicts of the same model (keys must agree)."""
    keys = list(states[0].keys()) if states else []
    for index, state in enumerate(states[1:], start=1):
        if list(state.keys()) != keys:
            missing = sorted(set(keys) ^ set(state.keys()))
            raise InputError(f"federated average: site {index}'s model differs from site 0's ({', '.join(missing[:3])})")
    return arrays_to_state(weighted_average([state_to_arrays(s) for s in states], weights), states[0])


__all__ = ["weighted_average", "average_state_dicts", "state_to_arrays", "arrays_to_state"]
