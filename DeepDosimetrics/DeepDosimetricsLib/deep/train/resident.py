"""Training tiles drawn on the training device, from a cohort cache held in the device's memory.

A GPU step of the autoencoder is faster than a CPU can read, window and augment tiles for it. When the
compact cache of the training patients (int16 HU, uint8 masks, the stored dose) fits in device memory,
:class:`ResidentTileSampler` copies it there once and cuts every batch on the device: one gather per
stored volume for the whole batch (flips are reversed indices), then the channel arithmetic of
``channels.compute_channels`` and the window jitter as tensor operations.

It draws exactly the tiles of the :class:`~DeepDosimetricsLib.deep.train.sampling.TileSampler` it is made
from: positions, flips and jitter come from the same generator, seeded by (seed, rank, step), in the same
order (``tile_start`` then ``draw_augmentation``), so a fixed seed gives the same batches on the device as
on the host, up to float rounding (tested with the CPU as the device).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from DeepDosimetricsLib.deep.cache.store import drop_mapped_pages
from DeepDosimetricsLib.deep.channels import AIR_HU, dose_scale_gy
from DeepDosimetricsLib.deep.train.sampling import TileSampler, draw_augmentation, tile_start
from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)

#: share of the device's free memory the resident cache may take (the model, activations and optimiser need the rest)
RESIDENT_MEMORY_SHARE = 0.5


def _volumes(sampler: TileSampler) -> dict[str, Any]:
    """The stored volumes the channels need: key -> (fill value, function patient -> array)."""
    volumes: dict[str, Any] = {}
    for spec in sampler.specs:
        if spec.kind == "window":
            volumes["hu"] = (AIR_HU, lambda patient: patient.hu)
        elif spec.kind == "mask":
            volumes[f"mask:{spec.name}"] = (0, lambda patient, name=spec.name: patient.mask(name))
        elif spec.kind == "dose":
            volumes["dose"] = (0, lambda patient: patient.dose)
    return volumes


def _padding(shape: tuple[int, int, int], tile: int) -> np.ndarray:
    """Voxels of air added on each side of an axis shorter than the tile (tiles then stay inside)."""
    return np.maximum(0, tile - np.asarray(shape, dtype=np.int64))


def resident_bytes(sampler: TileSampler) -> int:
    """Bytes the resident copy of the sampler's patients takes (padded volumes of every needed kind)."""
    total = 0
    for _, read in _volumes(sampler).values():
        for patient in sampler.sources:
            array = read(patient)
            padded = np.asarray(patient.shape) + 2 * _padding(patient.shape, sampler.config.tile)
            total += int(np.prod(padded)) * array.dtype.itemsize
    return total


def device_free_bytes(device: Any) -> Optional[int]:
    """Free memory of a CUDA device (None for other devices: their memory is the host's)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def fits_on_device(sampler: TileSampler, device: Any, share: float = RESIDENT_MEMORY_SHARE) -> bool:
    """Whether the resident cache fits ``share`` of the device's free memory (False for host-memory devices)."""
    free = device_free_bytes(device)
    return free is not None and resident_bytes(sampler) <= share * free


class ResidentTileSampler:
    """The batches of a ``TileSampler``, cut on ``device`` from a resident copy of its patients' volumes."""

    def __init__(self, sampler: TileSampler, device: Any) -> None:
        import torch

        self.host, self.device = sampler, torch.device(device)
        self.config, self.specs = sampler.config, sampler.specs
        tile = self.config.tile
        count = len(sampler.sources)
        pads = np.stack([_padding(p.shape, tile) for p in sampler.sources])
        self.padded_shapes = np.stack([np.asarray(p.shape) for p in sampler.sources]) + 2 * pads
        self.pads = pads
        sizes = self.padded_shapes.prod(axis=1)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.volumes: dict[str, Any] = {}
        for key, (fill, read) in _volumes(sampler).items():
            dtype = read(sampler.sources[0]).dtype
            flat = np.full(int(sizes.sum()), fill, dtype=dtype)
            for index, patient in enumerate(sampler.sources):
                array = read(patient)
                target = flat[self.offsets[index] : self.offsets[index] + sizes[index]].reshape(self.padded_shapes[index])
                p = pads[index]
                z, y, x = array.shape
                for z0 in range(0, z, 16):  # slab by slab: the memory maps' pages are dropped as we go
                    target[p[0] + z0 : p[0] + min(z, z0 + 16), p[1] : p[1] + y, p[2] : p[2] + x] = array[z0 : z0 + 16]
                    drop_mapped_pages(array)
            self.volumes[key] = torch.from_numpy(flat).to(self.device)
        self.prescriptions = [getattr(p, "prescription_gy", None) for p in sampler.sources]
        self._axis = torch.arange(tile, device=self.device, dtype=torch.int64)
        log.info("resident tile sampler: %d patients, %.0f MB on %s", count,
                 sum(v.numel() * v.element_size() for v in self.volumes.values()) / 2**20, self.device)

    def _draw(self, step: int) -> tuple[list[int], np.ndarray, list]:
        """Patients, starts and augmentations of a step's tiles: the host sampler's draws, in its order."""
        host = self.host
        rng = np.random.default_rng([host.seed, host.rank, int(step)])
        patients, starts, augmentations = [], [], []
        for _ in range(self.config.batch):
            patient = int(rng.integers(len(host.sources)))
            patients.append(patient)
            starts.append(tile_start(host.indexes[patient], self.config, rng))
            augmentations.append(draw_augmentation(self.config, bool(host.window_channels), rng))
        return patients, np.asarray(starts, dtype=np.int64), augmentations

    def _indices(self, patients: list[int], starts: np.ndarray, augmentations: list):
        """(B, t, t, t) flat indices of every tile voxel into the resident volumes (flips reverse an axis)."""
        import torch

        tile, axis = self.config.tile, self._axis
        patients_array = np.asarray(patients)
        origin = torch.as_tensor(starts + self.pads[patients_array], device=self.device)  # (B, 3) in padded volumes
        shapes = torch.as_tensor(self.padded_shapes[patients_array], device=self.device)
        flips = torch.as_tensor([[a in aug.flip_axes for a in range(3)] for aug in augmentations], device=self.device)
        # coordinate along each axis: start + i, or start + (t - 1 - i) on a flipped axis
        steps = torch.where(flips[:, :, None], tile - 1 - axis, axis)  # (B, 3, t)
        coords = origin[:, :, None] + steps
        strides = torch.stack([shapes[:, 1] * shapes[:, 2], shapes[:, 2], torch.ones_like(shapes[:, 2])], dim=1)
        along = coords * strides[:, :, None]  # (B, 3, t)
        base = torch.as_tensor(self.offsets[patients_array], device=self.device)
        return (base[:, None, None, None] + along[:, 0, :, None, None] + along[:, 1, None, :, None]
                + along[:, 2, None, None, :])

    def batch(self, step: int):
        """The (B, C, t, t, t) float32 batch of a training step, on the device."""
        import torch

        patients, starts, augmentations = self._draw(step)
        index = self._indices(patients, starts, augmentations)
        batch = len(patients)
        out = torch.empty((batch, len(self.specs), *index.shape[1:]), dtype=torch.float32, device=self.device)
        jitter = any(a.scale != 1.0 or a.shift != 0.0 for a in augmentations)
        scale = torch.tensor([a.scale for a in augmentations], dtype=torch.float32, device=self.device).view(-1, 1, 1, 1)
        shift = torch.tensor([a.shift for a in augmentations], dtype=torch.float32, device=self.device).view(-1, 1, 1, 1)
        for channel, spec in enumerate(self.specs):
            if spec.kind == "window":
                lower = np.float32(spec.level - spec.width / 2.0)
                values = (self.volumes["hu"].take(index).to(torch.float32) - float(lower)) * float(np.float32(1.0 / spec.width))
                values = values.clamp_(0.0, 1.0)
                if jitter:
                    values = (values * scale + shift).clamp_(0.0, 1.0)
            elif spec.kind == "mask":
                values = self.volumes[f"mask:{spec.name}"].take(index).ne(0).to(torch.float32)
            elif spec.kind == "dose":
                inverse = torch.tensor([np.float32(1.0 / dose_scale_gy(spec, self.prescriptions[p])) for p in patients],
                                       dtype=torch.float32, device=self.device).view(-1, 1, 1, 1)
                values = (self.volumes["dose"].take(index).to(torch.float32) * inverse).clamp_(0.0, 1.0)
            else:
                raise InputError(f"unknown channel kind {spec.kind!r}")
            out[:, channel] = values
        return out


__all__ = ["ResidentTileSampler", "resident_bytes", "fits_on_device", "device_free_bytes", "RESIDENT_MEMORY_SHARE"]
