"""Training loop of the tile autoencoder: Adam + schedule, validation, early stopping, checkpoints, DDP.

``train(cohort_dir, out_dir, config)`` reads tiles from the preprocessing cache (built when missing),
trains, and leaves in ``out_dir``:

- ``model.json`` + ``model.pt``: the best model so far (by validation loss), loadable by ``load_model``;
- ``checkpoint.pt``: everything needed to continue (``resume=True``), written atomically every
  ``checkpoint_every`` steps, so a killed process loses at most one interval;
- ``train-config.yaml``, ``loss_history.csv`` and ``loss_curve.png``.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel: gloo on CPU,
NCCL on CUDA; every rank draws its own tiles (seed + rank), rank 0 writes files.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from DeepDosimetricsLib.deep.distributed import DistributedContext
from DeepDosimetricsLib.deep.train.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from DeepDosimetricsLib.runtime.devices import DEVICES, resolve_device
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError, InputError
from DeepDosimetricsLib.runtime.progress import emit_progress
from DeepDosimetricsLib.runtime.resources import resource_path

log = logging.getLogger(__name__)

DEFAULT_CONFIG_FILE = resource_path("train-default.yaml")
HISTORY_CSV = "loss_history.csv"
LOSS_CURVE_PNG = "loss_curve.png"
CONFIG_YAML = "train-config.yaml"
#: options a resumed run takes from the new call rather than from the checkpoint
RUNTIME_OPTIONS = ("steps", "epochs", "device", "num_workers", "threads", "checkpoint_every", "log_every", "patience")
SCHEDULES = ("cosine", "plateau", "constant")


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved as train-config.yaml and inside each checkpoint)."""

    # data
    channels: str = "default"  # channel set or list: default, full, "window:lung,mask:PTV,dose"
    tile: int = 64
    batch: int = 2
    val_fraction: float = 0.2
    val_tiles: int = 16
    skip_incomplete: bool = False  # leave out patients lacking a channel instead of refusing
    ptv_share: float = 0.3
    body_share: float = 0.6
    flips: bool = True
    jitter: float = 0.02
    num_workers: int = 0
    threads: Optional[int] = None  # torch CPU threads per process (None: torch's default; DDP on CPU: cores / local ranks)
    # model
    features: int = 10
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 64])
    convs_per_level: int = 1
    groups: int = 8
    activation: str = "silu"
    gradient_checkpointing: bool = False
    # loss
    channel_weights: dict[str, float] = field(default_factory=dict)  # label -> weight (default 1)
    mask_bce_weight: float = 0.0  # extra binary cross-entropy on mask channels
    # optimisation
    steps: Optional[int] = None  # total steps; or epochs * steps_per_epoch
    epochs: Optional[int] = None
    steps_per_epoch: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.05  # cosine floor as a share of lr
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    patience: int = 10  # early stopping: validations without improvement (0: never stop early)
    min_delta: float = 0.0
    # bookkeeping
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        self.widths = [int(w) for w in self.widths]
        self.channel_weights = {str(k): float(v) for k, v in (self.channel_weights or {}).items()}
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise InputError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in ("tile", "batch", "steps_per_epoch", "checkpoint_every", "log_every", "features"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and self.epochs < 1:
            raise InputError("steps and epochs must be >= 1")
        if self.lr <= 0:
            raise InputError(f"lr must be > 0, got {self.lr}")

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return int(self.steps)
        if self.epochs is not None:
            return int(self.epochs) * self.steps_per_epoch
        return 20 * self.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "configuration") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{source}: unknown training option(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise InputError(f"{source}: {error}") from error


def load_config_file(path: Union[str, Path, None]) -> dict[str, Any]:
    """Options from a YAML (or JSON) training configuration file; {} for None."""
    if path is None:
        return {}
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"training configuration {path} cannot be read ({error})") from error
    if not isinstance(data, dict):
        raise InputError(f"training configuration {path}: expected a mapping of options")
    data = data.get("train", data) if isinstance(data.get("train"), dict) else data
    TrainConfig.from_dict(dict(data), source=str(path))  # validate names early
    return dict(data)


def make_config(config_file: Union[str, Path, None] = None, **overrides: Any) -> TrainConfig:
    """Defaults (Resources/train-default.yaml) <- config_file <- overrides that are not None."""
    data: dict[str, Any] = {}
    if DEFAULT_CONFIG_FILE.is_file():
        data.update(load_config_file(DEFAULT_CONFIG_FILE))
    data.update(load_config_file(config_file))
    data.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("steps") is not None:
        data["epochs"] = None
    elif overrides.get("epochs") is not None:
        data["steps"] = None
    return TrainConfig.from_dict(data, source=str(config_file or "training options"))


@dataclass
class TrainResult:
    """What a run produced."""

    out_dir: Path
    steps: int
    best_val_loss: Optional[float]
    final_train_loss: Optional[float]
    stopped_early: bool
    history: list[dict[str, Any]]
    model: Any = None  # the trained (unwrapped) TileAutoencoder on its device
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- data
def _prepare_patients(cache: Any, specs: list, config: TrainConfig, cohort_dir: Path) -> list:
    """Patients of the cache that provide every channel (or InputError naming those that do not)."""
    if len(cache) == 0:
        failed = getattr(cache, "failed", {}) or {}
        detail = "; ".join(f"{pid}: {why}" for pid, why in list(failed.items())[:5])
        raise InputError(
            f"cohort {cohort_dir} has no usable patient" + (f" ({detail})" if detail else " (empty folder?)")
        )
    usable, missing = [], {}
    for patient in cache:
        try:
            patient.check_channels(specs)
            usable.append(patient)
        except InputError as error:
            missing[patient.id] = str(error)
    if missing and not config.skip_incomplete:
        names = ", ".join(sorted(missing)[:10]) + (" ..." if len(missing) > 10 else "")
        first = next(iter(missing.values()))
        raise InputError(
            f"{len(missing)} patient(s) lack a requested channel: {names} ({first}); "
            "choose other --channels or pass --skip-incomplete to train without them"
        )
    for pid, why in missing.items():
        log.warning("skipping %s: %s", pid, why)
    if not usable:
        raise InputError(f"no patient of {cohort_dir} provides the channels {[s.label for s in specs]}")
    tile = config.tile
    if all(max(p.shape) < tile for p in usable):
        largest = max(max(p.shape) for p in usable)
        raise InputError(
            f"tile {tile} exceeds the cropped volume of every patient in every axis (largest axis: "
            f"{largest} voxels); each tile would hold a whole patient and padding: choose --tile <= {largest}"
        )
    small = [p.id for p in usable if min(p.shape) < tile]
    if small:
        log.warning("tile %d is larger than the cropped volume of %d patient(s) in some axis (padded with "
                    "air): %s", tile, len(small), ", ".join(small[:5]) + (" ..." if len(small) > 5 else ""))
    return usable


def _open_cache(cohort_dir: Path, cache_dir: Optional[Path], ctx: DistributedContext, quiet: bool):
    """Build (local rank 0 of each node) or open the cache of a cohort."""
    from DeepDosimetricsLib.deep.cache.build import ensure_cache
    from DeepDosimetricsLib.deep.cache.store import COHORT_MANIFEST, CacheConfig, open_cache

    if not cohort_dir.is_dir():
        raise InputError(f"cohort folder {cohort_dir} does not exist")
    # an existing cache folder keeps the configuration it was built with (e.g. `cache --spacing`)
    config = CacheConfig()
    if cache_dir is not None and (cache_dir / COHORT_MANIFEST).is_file():
        config = open_cache(cache_dir).config
    if ctx.local_rank == 0:
        cache = ensure_cache(cohort_dir, config, cache_dir=cache_dir, jobs=1, quiet=quiet)
    ctx.barrier()
    if ctx.local_rank != 0:
        cache = ensure_cache(cohort_dir, config, cache_dir=cache_dir, jobs=1, quiet=True)
    return cache


# ---------------------------------------------------------------------------------------- outputs
def write_history_csv(path: Path, history: list[dict[str, Any]]) -> None:
    from DeepDosimetricsLib.runtime.atomic import write_text_atomic

    columns = ["step", "epoch", "train_loss", "val_loss", "lr", "voxels_per_s", "elapsed_s"]
    extra = sorted({k for row in history for k in row} - set(columns))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns + extra, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns + extra})
    write_text_atomic(path, buffer.getvalue())


def write_loss_curve(path: Path, history: list[dict[str, Any]]) -> None:
    """Training and validation loss against step (matplotlib, Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from DeepDosimetricsLib.runtime.atomic import write_bytes_atomic

    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.subplots()
    train = [(r["step"], r["train_loss"]) for r in history if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if train:
        axes.plot(*zip(*train), label="training", lw=1)
    if val:
        axes.plot(*zip(*val), "o-", label="validation (held-out patients)", ms=3)
    if train or val:
        values = [v for _, v in train + val]
        if min(values) > 0:
            axes.set_yscale("log")
        axes.legend()
    axes.set_xlabel("step")
    axes.set_ylabel("loss (weighted MSE)")
    axes.set_title("DeepDosimetrics tile autoencoder")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    write_bytes_atomic(path, lambda handle: figure.savefig(handle, format="png"))


# ---------------------------------------------------------------------------------------- training
def _model_config(config: TrainConfig, labels: list[str]):
    from DeepDosimetricsLib.deep.model import ModelConfig

    return ModelConfig(
        channels=labels,
        tile=config.tile,
        features=config.features,
        widths=list(config.widths),
        convs_per_level=config.convs_per_level,
        groups=config.groups,
        activation=config.activation,
        gradient_checkpointing=config.gradient_checkpointing,
    )


def _make_scheduler(optimizer, config: TrainConfig, total_steps: int):
    import torch

    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, total_steps), eta_min=config.lr * config.min_lr_ratio
        )
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=config.plateau_factor, patience=config.plateau_patience
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _resume_config(saved: dict[str, Any], requested: TrainConfig) -> TrainConfig:
    """The checkpoint's configuration, with the run-length and runtime options of this call."""
    config = TrainConfig.from_dict(dict(saved), source="checkpoint")
    for name in RUNTIME_OPTIONS:
        setattr(config, name, getattr(requested, name))
    differing = [
        f.name
        for f in fields(TrainConfig)
        if f.name not in RUNTIME_OPTIONS and getattr(config, f.name) != getattr(requested, f.name)
    ]
    if differing:
        log.warning("resuming with the checkpoint's %s (ignoring this call's values)", ", ".join(differing))
    return config


def train(
    cohort_dir: Union[str, Path],
    out_dir: Union[str, Path],
    config: Optional[TrainConfig] = None,
    cache_dir: Union[str, Path, None] = None,
    resume: bool = False,
    quiet: bool = False,
    cache: Any = None,
) -> TrainResult:
    """Train a TileAutoencoder on a cohort (see module docstring). ``cache`` may pass an opened cache."""
    import torch

    from DeepDosimetricsLib.deep.channels import channel_labels, parse_channels
    from DeepDosimetricsLib.deep.model import MODEL_JSON, TileAutoencoder, reconstruction_loss, save_model
    from DeepDosimetricsLib.deep.train.sampling import (
        SamplingConfig,
        TileSampler,
        index_patient,
        make_loader,
        split_patients,
    )
    from DeepDosimetricsLib.runtime.atomic import write_text_atomic

    config = config or make_config()
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    ctx = DistributedContext.from_environment()
    try:
        ctx.init(config.device)
        checkpoint_path = out_dir / CHECKPOINT_NAME
        checkpoint = None
        if resume and checkpoint_path.exists():
            checkpoint = load_checkpoint(checkpoint_path)
            config = _resume_config(checkpoint["train_config"], config)
        elif resume:
            log.info("no checkpoint in %s: starting a new run", out_dir)
        elif checkpoint_path.exists():
            raise InputError(
                f"{out_dir} already holds a training checkpoint; pass --resume to continue it, "
                "or choose another --out"
            )
        device = resolve_device(config.device, local_rank=ctx.local_rank, world_size=ctx.world_size)
        ctx.set_device(device)
        _set_threads(config.threads, ctx, device)
        specs = parse_channels(config.channels)
        labels = channel_labels(specs)
        if checkpoint is not None and list(checkpoint["channels"]) != labels:
            raise InputError(f"{checkpoint_path}: its channels {checkpoint['channels']} differ from {labels}")
        model_config = _model_config(config, labels)  # validates tile vs depth early

        if cache is None:
            cache = _open_cache(cohort_dir, Path(cache_dir) if cache_dir else None, ctx, quiet)
        patients = _prepare_patients(cache, specs, config, cohort_dir)
        train_ids, val_ids = split_patients([p.id for p in patients], config.val_fraction, config.seed)
        by_id = {p.id: p for p in patients}
        sampling = SamplingConfig(
            tile=config.tile, batch=config.batch, ptv_share=config.ptv_share, body_share=config.body_share,
            flips=config.flips, jitter=config.jitter, val_tiles=config.val_tiles,
        )
        train_sources = [by_id[i] for i in train_ids]
        indexes = {p.id: index_patient(p, config.tile) for p in patients}
        sampler = TileSampler(train_sources, specs, sampling, seed=config.seed, rank=ctx.rank,
                              indexes=[indexes[i] for i in train_ids])
        if val_ids:
            val_sampler = TileSampler([by_id[i] for i in val_ids], specs, sampling, seed=config.seed,
                                      indexes=[indexes[i] for i in val_ids])
            val_tiles = val_sampler.fixed_tiles(config.val_tiles)
        else:
            log.warning("only %d patient(s): validation uses fixed tiles of the training patients", len(patients))
            val_sampler = TileSampler(train_sources, specs, sampling, seed=config.seed,
                                      indexes=[indexes[i] for i in train_ids])
            val_tiles = val_sampler.fixed_tiles(config.val_tiles, stream=2)

        # model, optimiser, schedule
        torch.manual_seed(config.seed)
        cpu = device.type == "cpu"
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        memory_format = torch.channels_last_3d if cpu else torch.contiguous_format
        model = TileAutoencoder(model_config).to(device)
        if cpu:
            model = model.to(memory_format=memory_format)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        total_steps = config.total_steps
        scheduler = _make_scheduler(optimizer, config, total_steps)
        step, history = 0, []
        best_val, bad_validations, best_step = math.inf, 0, None
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            if config.schedule == "cosine":
                scheduler.T_max = max(1, total_steps)
            step = int(checkpoint["step"])
            history = [dict(r) for r in checkpoint["history"]]
            best_val = float(checkpoint["early"]["best_val"])
            bad_validations = int(checkpoint["early"]["bad_validations"])
            best_step = checkpoint["early"].get("best_step")
            set_rng_state(checkpoint["rng"][min(ctx.rank, len(checkpoint["rng"]) - 1)]
                          if isinstance(checkpoint["rng"], list) else checkpoint["rng"])
            log.info("resuming %s at step %d of %d", out_dir, step, total_steps)
        ddp_model = ctx.wrap(model, device)

        weights = [config.channel_weights.get(label, 1.0) for label in labels]
        unknown_weights = sorted(set(config.channel_weights) - set(labels))
        if unknown_weights:
            raise InputError(f"channel_weights name channels not trained: {', '.join(unknown_weights)}")
        mask_channels = model_config.mask_channels
        voxels_per_batch = config.batch * config.tile**3

        def to_device(batch: torch.Tensor) -> torch.Tensor:
            batch = batch.to(device, non_blocking=True)
            return batch.contiguous(memory_format=memory_format) if cpu else batch

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else _nullcontext()

        def validate() -> tuple[float, list[float]]:
            """Mean loss and per-channel MSE over the fixed validation tiles (shared across ranks)."""
            model.eval()
            totals = torch.zeros(1 + len(labels), dtype=torch.float64)
            mine = [t for i, t in enumerate(val_tiles) if i % ctx.world_size == ctx.rank]
            with torch.no_grad():
                for first in range(0, len(mine), config.batch):
                    chunk = mine[first : first + config.batch]
                    x = torch.from_numpy(np.stack([val_sampler.read(p, s, None) for p, s in chunk]))
                    x = to_device(x)
                    with autocast():
                        logits, _ = model(x)
                    loss, per_channel = reconstruction_loss(logits, x, weights, mask_channels, config.mask_bce_weight)
                    totals += torch.cat([loss.detach().double().cpu().view(1), per_channel.double().cpu()]) * len(chunk)
            totals = ctx.all_reduce_sum(totals) / max(1, len(val_tiles))
            model.train()
            return float(totals[0]), [float(v) for v in totals[1:]]

        def write_outputs(final: bool = False) -> None:
            if not ctx.is_main:
                return
            write_history_csv(out_dir / HISTORY_CSV, history)
            if final:
                write_loss_curve(out_dir / LOSS_CURVE_PNG, history)

        def summary() -> dict[str, Any]:
            return {
                "steps": step, "total_steps": total_steps, "best_val_loss": None if math.isinf(best_val) else best_val,
                "best_step": best_step, "train_patients": train_ids, "val_patients": val_ids,
                "world_size": ctx.world_size, "device": str(device), "bf16": use_bf16,
                "train_config": config.to_dict(), "cohort": str(cohort_dir),
            }

        def checkpoint_now() -> None:
            rngs = ctx.gather_objects(rng_state())
            if ctx.is_main:
                save_checkpoint(
                    checkpoint_path, step=step, train_config=config.to_dict(), model_config=model_config.to_dict(),
                    channels=labels, model=model, optimizer=optimizer, scheduler=scheduler, rng=rngs,
                    history=history,
                    early={"best_val": best_val, "bad_validations": bad_validations, "best_step": best_step},
                    world_size=ctx.world_size,
                )
                write_outputs()
            ctx.barrier()

        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            import yaml

            write_text_atomic(out_dir / CONFIG_YAML, yaml.safe_dump(config.to_dict(), sort_keys=False))
        val_every = config.steps_per_epoch
        stopped_early = False
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        run_start = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
        last_train_loss = None

        from DeepDosimetricsLib.runtime.progress import progress_bar

        bar = progress_bar(range(step, total_steps), total=total_steps, desc="train", quiet=quiet or not ctx.is_main)
        bar.update(step)
        loader = make_loader(sampler, step, total_steps, config.num_workers)
        model.train()
        for batch in loader:
            x = to_device(batch)
            with autocast():
                logits, _ = ddp_model(x)
            loss, _ = reconstruction_loss(logits, x, weights, mask_channels, config.mask_bce_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if config.schedule != "plateau":
                scheduler.step()
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise DeepDosimetricsError(
                    f"training diverged at step {step} (loss {value}); lower --lr (now {config.lr})"
                )
            window_loss += value
            window_steps += 1
            bar.update(1)
            log_now = step % config.log_every == 0 or step == total_steps
            validate_now = step % val_every == 0 or step == total_steps
            row: Optional[dict[str, Any]] = None
            if log_now or validate_now:
                now = time.perf_counter()
                train_loss = float(ctx.all_reduce_mean(window_loss / max(1, window_steps)))
                speed = ctx.world_size * voxels_per_batch * window_steps / max(1e-9, now - window_start)
                row = {
                    "step": step, "epoch": step / config.steps_per_epoch, "train_loss": train_loss,
                    "val_loss": None, "lr": optimizer.param_groups[0]["lr"], "voxels_per_s": speed,
                    "elapsed_s": now - run_start,
                }
                last_train_loss = train_loss
                window_loss, window_steps, window_start = 0.0, 0, now
                bar.set_postfix(loss=f"{train_loss:.4g}", vox_s=f"{speed:.3g}")
            if validate_now:
                val_loss, per_channel = validate()
                row["val_loss"] = val_loss
                for label, mse in zip(labels, per_channel):
                    row[f"val_mse[{label}]"] = mse
                if config.schedule == "plateau":
                    scheduler.step(val_loss)
                if val_loss < best_val - config.min_delta:
                    best_val, bad_validations, best_step = val_loss, 0, step
                    if ctx.is_main:
                        _save_model_or_fail(save_model, out_dir, model, model_config, summary())
                else:
                    bad_validations += 1
                window_start = time.perf_counter()  # validation time is not training throughput
            if row is not None:
                history.append(row)
                if ctx.is_main:
                    emit_progress("train", step, total_steps, loss=row["train_loss"], val_loss=row["val_loss"],
                                  voxels_per_s=row["voxels_per_s"], lr=row["lr"])
            if validate_now and config.patience and bad_validations >= config.patience:
                stopped_early = True
                log.info("early stopping at step %d: no improvement in %d validations", step, bad_validations)
            if step % config.checkpoint_every == 0 or step == total_steps or stopped_early:
                checkpoint_now()
            if stopped_early:
                break
        bar.close()
        if step % config.checkpoint_every and not stopped_early:
            checkpoint_now()
        in_sync = ctx.parameters_in_sync(model)
        if ctx.is_main:
            if not (out_dir / MODEL_JSON).exists() or math.isinf(best_val):
                _save_model_or_fail(save_model, out_dir, model, model_config, summary())
            else:  # keep the best weights; record the run's end in model.json
                _update_summary(out_dir, {**summary(), "ranks_in_sync": in_sync, "stopped_early": stopped_early})
            write_outputs(final=True)
        ctx.barrier()
        return TrainResult(
            out_dir=out_dir, steps=step, best_val_loss=None if math.isinf(best_val) else best_val,
            final_train_loss=last_train_loss, stopped_early=stopped_early, history=history, model=model,
            summary={**summary(), "ranks_in_sync": in_sync},
        )
    finally:
        ctx.close()


def _set_threads(threads: Optional[int], ctx: DistributedContext, device) -> None:
    """CPU threads of this process: as asked, or the cores shared among the ranks of this node under DDP."""
    import torch

    if threads is None and ctx.world_size > 1 and device.type == "cpu":
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        threads = max(1, (os.cpu_count() or 1) // max(1, local_ranks))
    if threads is not None:
        if threads < 1:
            raise InputError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _save_model_or_fail(save_model, out_dir: Path, model, model_config, extra: dict) -> None:
    try:
        save_model(out_dir, model, model_config, extra=extra)
    except OSError as error:
        raise DeepDosimetricsError(
            f"could not write the model to {out_dir} ({error}); the previous model file is intact"
        ) from error


def _update_summary(out_dir: Path, extra: dict) -> None:
    """Rewrite the training summary of model.json (weights untouched)."""
    import json

    from DeepDosimetricsLib.deep.model import MODEL_JSON, read_model_json
    from DeepDosimetricsLib.runtime.atomic import write_text_atomic

    meta = read_model_json(out_dir)
    meta["training"] = {**(meta.get("training") or {}), "run": extra}
    try:
        write_text_atomic(out_dir / MODEL_JSON, json.dumps(meta, indent=2, default=str) + "\n")
    except OSError as error:
        raise DeepDosimetricsError(f"could not update {out_dir / MODEL_JSON} ({error})") from error


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


__all__ = [
    "TrainConfig", "TrainResult", "make_config", "load_config_file", "train",
    "write_history_csv", "write_loss_curve", "seed_everything",
]
