"""DistributedDataParallel when launched by ``torchrun`` (WORLD_SIZE > 1); a no-op context otherwise.

Backends: NCCL on CUDA, gloo on CPU. ``torchrun`` sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; several nodes use ``--nnodes N --node-rank R --rdzv-endpoint HOST:PORT`` (or
``--master-addr/--master-port``) with the same command on every node.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class DistributedContext:
    """Rank bookkeeping plus the few collective operations training needs."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    initialised: bool = False

    @classmethod
    def from_environment(cls) -> DistributedContext:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
        local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
        return cls(rank=rank, local_rank=local, world_size=world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and self.initialised

    def init(self, device_name: str) -> None:
        """Join the process group (gloo on CPU, NCCL when training on CUDA)."""
        if self.world_size <= 1:
            return
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError

            raise DeepDosimetricsError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        self.initialised = True
        log.info("DDP: rank %d/%d (local %d), backend %s", self.rank, self.world_size, self.local_rank, backend)

    def set_device(self, device) -> None:
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)

    def wrap(self, model, device):
        """The model wrapped in DistributedDataParallel when distributed, else itself."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def _collective_device(self):
        import torch
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, tensor):
        """Sum of a CPU tensor over ranks (returned on the CPU)."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        work = tensor.to(self._collective_device())
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.cpu()

    def all_reduce_mean(self, value: float) -> float:
        if not self.active:
            return value
        import torch

        return float(self.all_reduce_sum(torch.tensor([value], dtype=torch.float64))[0]) / self.world_size

    def gather_objects(self, obj: Any) -> Any:
        """[obj of rank 0, obj of rank 1, ...] (every rank gets the list); obj itself when not distributed."""
        if not self.active:
            return obj
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def parameters_in_sync(self, model) -> bool:
        """Whether every rank holds the same parameters (max |difference| of a float64 fingerprint)."""
        if not self.active:
            return True
        import torch

        with torch.no_grad():
            flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
            fingerprint = torch.stack([flat.sum(), (flat * flat).sum(), (flat * torch.arange(len(flat), dtype=torch.float64)).sum()])
        gathered = self.gather_objects(fingerprint.tolist())
        return all(g == gathered[0] for g in gathered)

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
            self.initialised = False
