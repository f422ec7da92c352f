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
from DeepDosimetricsLib.runtime.configs import dataclass_from_dict
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
RUNTIME_OPTIONS = ("steps", "epochs", "device", "num_workers", "sampler", "threads", "checkpoint_every", "log_every", "patience",
                   "budget_minutes", "compile")
SCHEDULES = ("cosine", "warmup_cosine", "plateau", "constant")
#: where training tiles are cut: auto (on a GPU whose memory holds the cache, else on the host), device, host
SAMPLERS = ("auto", "device", "host")


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved as train-config.yaml and inside each checkpoint)."""

    # data
    channels: str = "default"  # channel set or list: default, full, "window:lung,mask:PTV,dose"
    tile: int = 64
    batch: int = 2
    val_fraction: float = 0.2
    val_tiles: int = 16  # fixed validation tiles drawn from the held-out patients (the one default)
    skip_incomplete: bool = False  # leave out patients lacking a channel instead of refusing
    ptv_share: float = 0.3
    body_share: float = 0.6
    edge_share: float = 0.0  # share of tiles centred on the target's surface (taken from ptv_share)
    flips: bool = True
    jitter: float = 0.02
    num_workers: Optional[int] = None  # DataLoader processes (None: 0 on the CPU, cores - 1 up to 4 feeding a GPU)
    sampler: str = "auto"  # one of SAMPLERS: tiles cut on the device from a resident cache, or read on the host
    threads: Optional[int] = None  # torch CPU threads per process (None: torch's default; DDP on CPU: cores / local ranks)
    # model
    features: int = 10
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 64])
    convs_per_level: int = 1
    groups: int = 8
    activation: str = "silu"
    gradient_checkpointing: bool = False
    residual: bool = False  # residual blocks for the extra convolutions of each level
    decoder_convs: Optional[int] = None  # extra convolutions per decoder level (None: convs_per_level)
    init_output_bias: bool = False  # start each output channel at its mean over validation tiles
    pca_start: bool = False  # residual around PCA: a frozen PCA path fitted on training tiles, convolutions from zero
    pca_tiles: int = 1024  # training tiles the PCA start is fitted on
    # loss
    channel_weights: dict[str, float] = field(default_factory=dict)  # label -> weight (default 1)
    mask_bce_weight: float = 0.0  # extra binary cross-entropy on mask channels
    mask_dice_weight: float = 0.0  # soft Dice loss on mask channels (boundary-sensitive)
    dose_target_weight: float = 0.0  # squared dose error inside the target (PTV) mask
    dose_gradient_weight: float = 0.0  # squared error of the dose's finite differences (fall-off)
    # optimisation
    steps: Optional[int] = None  # total steps; or epochs * steps_per_epoch
    epochs: Optional[int] = None
    steps_per_epoch: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.05  # cosine floor as a share of lr
    warmup_fraction: float = 0.0  # warmup_cosine: share of the run with a linear warm-up
    budget_minutes: Optional[float] = None  # stop after this much training time (the schedule follows it)
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    patience: int = 10  # early stopping: validations without improvement (0: never stop early)
    min_delta: float = 0.0
    # bookkeeping
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    compile: bool = False  # torch.compile the model (CUDA: worth it for long runs; CPU: needs a compiler)

    def __post_init__(self) -> None:
        self.widths = [int(w) for w in self.widths]
        self.channel_weights = {str(k): float(v) for k, v in (self.channel_weights or {}).items()}
        if self.sampler not in SAMPLERS:
            raise InputError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise InputError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise InputError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in ("tile", "batch", "steps_per_epoch", "checkpoint_every", "log_every", "features", "pca_tiles"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and self.epochs < 1:
            raise InputError("steps and epochs must be >= 1")
        if self.lr <= 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise InputError(f"budget_minutes must be > 0, got {self.budget_minutes}")
        if not 0 <= self.edge_share <= self.ptv_share:
            raise InputError(f"edge_share ({self.edge_share}) must lie in [0, ptv_share ({self.ptv_share})]")

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
        return dataclass_from_dict(cls, data, source, "training")


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
def _prepare_patients(cache: Any, specs: list, config: TrainConfig, cohort_dir: Path) -> tuple[list, dict[str, str]]:
    """Patients of the cache that provide every channel (or InputError naming those that do not), and the
    patients left out for lacking a channel with ``skip_incomplete`` (id -> reason)."""
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
    return usable, missing


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
    axes.set_ylabel("loss (weighted MSE + fidelity terms)")
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
        residual=config.residual,
        decoder_convs=config.decoder_convs,
        pca_start=config.pca_start,
    )


def model_config_for(config: TrainConfig, labels: list[str]):
    """The ModelConfig a TrainConfig trains (the federated server builds the same model)."""
    return _model_config(config, labels)


def _make_scheduler(optimizer, config: TrainConfig, total_steps: int):
    import torch

    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, total_steps), eta_min=config.lr * config.min_lr_ratio
        )
    if config.schedule == "warmup_cosine":  # the trainer sets the rate from the run's progress
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=config.plateau_factor, patience=config.plateau_patience
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def lr_factor(progress: float, warmup_fraction: float, min_ratio: float) -> float:
    """warmup_cosine: linear warm-up over ``warmup_fraction`` of the run, then a cosine down to ``min_ratio``."""
    progress = min(1.0, max(0.0, progress))
    if warmup_fraction > 0 and progress < warmup_fraction:
        return max(progress / warmup_fraction, 1e-3)
    rest = (progress - warmup_fraction) / max(1e-9, 1.0 - warmup_fraction)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * rest))


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
    """Train a TileAutoencoder on a cohort and write the model folder (see the module docstring).

    Args:
        cohort_dir: cohort folder (one sub-folder per patient).
        out_dir: model folder: model.json/model.pt (best by validation loss), checkpoint.pt,
            train-config.yaml, loss_history.csv, loss_curve.png.
        config: the training configuration (default: ``make_config()``, i.e. Resources/train-default.yaml).
        cache_dir: preprocessing cache folder (default: the cohort's default cache; built when missing).
        resume: continue from ``out_dir/checkpoint.pt`` (a new run when there is none); without it an
            existing checkpoint is refused with an InputError.
        quiet: no progress bar (``@progress`` lines are still printed by rank 0).
        cache: an already opened cache (skips opening/building it).

    Returns:
        A TrainResult (steps done, best validation loss, history, the trained model on its device).
    """
    from DeepDosimetricsLib.runtime.memory import return_freed_memory

    return_freed_memory()  # the steps' freed tiles and activations leave the resident set at once
    config = config or make_config()
    ctx = DistributedContext.from_environment()
    try:
        ctx.init(config.device)
        trainer = Trainer(Path(cohort_dir), Path(out_dir), config, ctx, resume=resume, quiet=quiet)
        trainer.setup(cache=cache, cache_dir=Path(cache_dir) if cache_dir else None)
        for batch in trainer.batches():
            loss = trainer.step(batch)
            trainer.after_step(loss)
            if trainer.should_stop:
                break
        return trainer.finish()
    finally:
        ctx.close()


class Trainer:
    """One training run, in named steps: ``setup``, then ``step``/``after_step`` per batch, then ``finish``.

    ``after_step`` logs, validates (keeping the best model), and checkpoints at their intervals.
    """

    def __init__(self, cohort_dir: Path, out_dir: Path, config: TrainConfig, ctx: DistributedContext,
                 resume: bool = False, quiet: bool = False) -> None:
        self.cohort_dir, self.out_dir, self.config, self.ctx = cohort_dir, out_dir, config, ctx
        self.resume, self.quiet = resume, quiet
        self.checkpoint_path = out_dir / CHECKPOINT_NAME
        self.step_count = 0
        self.history: list[dict[str, Any]] = []
        self.best_val, self.bad_validations, self.best_step = math.inf, 0, None
        self.stopped_early = False
        self._budget_reached = False
        self.last_train_loss: Optional[float] = None
        #: an extra loss term of the model added in ``step`` (None: none; federated FedProx: the proximal term)
        self.penalty: Optional[Any] = None
        #: the weights come from elsewhere (a federated round): no PCA or output-bias start is fitted here
        self.external_start = False

    # ------------------------------------------------------------------ setup
    def setup(self, cache: Any = None, cache_dir: Optional[Path] = None) -> None:
        """Resume state, device, data (samplers, validation tiles), model/optimiser/schedule, output folder."""
        checkpoint = self._read_checkpoint()
        config, ctx = self.config, self.ctx
        self.device = resolve_device(config.device, local_rank=ctx.local_rank)
        ctx.set_device(self.device)
        _set_threads(config.threads, ctx, self.device)
        from DeepDosimetricsLib.deep.channels import channel_labels, parse_channels

        self.specs = parse_channels(config.channels)
        self.labels = channel_labels(self.specs)
        if checkpoint is not None and list(checkpoint["channels"]) != self.labels:
            raise InputError(f"{self.checkpoint_path}: its channels {checkpoint['channels']} differ from {self.labels}")
        self.model_config = _model_config(config, self.labels)  # validates tile vs depth early
        if cache is None:
            cache = _open_cache(self.cohort_dir, cache_dir, ctx, self.quiet)
        self._setup_data(cache)
        self._setup_model(checkpoint)
        self._setup_loss()
        if ctx.is_main:
            import yaml

            from DeepDosimetricsLib.runtime.atomic import write_text_atomic

            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out_dir / CONFIG_YAML, yaml.safe_dump(config.to_dict(), sort_keys=False))

    def _read_checkpoint(self) -> Optional[dict[str, Any]]:
        """The checkpoint to resume from (its configuration replaces ours), or None for a new run."""
        if self.resume and self.checkpoint_path.exists():
            checkpoint = load_checkpoint(self.checkpoint_path)
            self.config = _resume_config(checkpoint["train_config"], self.config)
            return checkpoint
        if self.resume:
            log.info("no checkpoint in %s: starting a new run", self.out_dir)
        elif self.checkpoint_path.exists():
            raise InputError(
                f"{self.out_dir} already holds a training checkpoint; pass --resume to continue it, "
                "or choose another --out"
            )
        return None

    def _setup_data(self, cache: Any) -> None:
        """Usable patients, the by-patient split, the training sampler and the fixed validation tiles."""
        from DeepDosimetricsLib.deep.train.sampling import (
            SamplingConfig,
            TileSampler,
            index_patient,
            split_patients,
        )

        config = self.config
        patients, self.skipped_patients = _prepare_patients(cache, self.specs, config, self.cohort_dir)
        # patients the cache refused (unreadable, failing the value checks): trained without, reported
        self.refused_patients = {str(k): str(v) for k, v in (getattr(cache, "failed", None) or {}).items()}
        self.train_ids, self.val_ids = split_patients([p.id for p in patients], config.val_fraction, config.seed)
        by_id = {p.id: p for p in patients}
        sampling = SamplingConfig(
            tile=config.tile, batch=config.batch, ptv_share=config.ptv_share, body_share=config.body_share,
            flips=config.flips, jitter=config.jitter, edge_share=config.edge_share,
        )
        indexes = {p.id: index_patient(p, config.tile, edges=config.edge_share > 0) for p in patients}

        def sampler(ids: list[str], rank: int = 0) -> TileSampler:
            return TileSampler([by_id[i] for i in ids], self.specs, sampling, seed=config.seed, rank=rank,
                               indexes=[indexes[i] for i in ids])

        self.sampler = sampler(self.train_ids, rank=self.ctx.rank)
        self.resident = self._resident_sampler()
        if self.val_ids:
            self.val_sampler = sampler(self.val_ids)
            self.val_tiles = self.val_sampler.fixed_tiles(config.val_tiles)
        else:
            log.warning("only %d patient(s): validation uses fixed tiles of the training patients", len(patients))
            self.val_sampler = sampler(self.train_ids)
            self.val_tiles = self.val_sampler.fixed_tiles(config.val_tiles, stream=2)

    def _resident_sampler(self):
        """A ResidentTileSampler on the device when asked, or (auto) when the cache fits a GPU's memory; else None."""
        from DeepDosimetricsLib.deep.train.resident import ResidentTileSampler, fits_on_device

        choice = self.config.sampler
        if choice == "host" or (choice == "auto" and not fits_on_device(self.sampler, self.device)):
            return None
        return ResidentTileSampler(self.sampler, self.device)

    @property
    def sampler_kind(self) -> str:
        return "host" if self.resident is None else "device"

    def _loader_workers(self) -> int:
        """DataLoader processes for host sampling: as configured, or (None) 0 on a CPU and up to 4 feeding a GPU."""
        if self.config.num_workers is not None:
            return int(self.config.num_workers)
        if self.device.type == "cpu":
            return 0
        return max(0, min(4, (os.cpu_count() or 1) - 1))

    def _setup_model(self, checkpoint: Optional[dict[str, Any]]) -> None:
        """Model (seeded), optimiser and schedule on the device; restored from ``checkpoint`` when resuming."""
        import torch

        from DeepDosimetricsLib.deep.model import TileAutoencoder

        config, device = self.config, self.device
        torch.manual_seed(config.seed)
        self.cpu = device.type == "cpu"
        self.use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.memory_format = torch.channels_last_3d if self.cpu else torch.contiguous_format
        model = TileAutoencoder(self.model_config).to(device)
        if self.cpu:
            model = model.to(memory_format=self.memory_format)
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.total_steps = config.total_steps
        self.scheduler = _make_scheduler(self.optimizer, config, self.total_steps)
        self.pca_summary: Optional[dict[str, Any]] = None
        if checkpoint is not None:
            self._restore(checkpoint)
        elif self.external_start:
            pass
        elif config.pca_start:
            self._fit_pca_start()
        elif config.init_output_bias:
            self._init_output_bias()
        self.ddp_model = self.ctx.wrap(model, device)
        if config.compile:
            self.ddp_model = torch.compile(self.ddp_model)

    def _fit_pca_start(self) -> None:
        """Fit the PCA path on training tiles (rank 0; DistributedDataParallel copies it to the other ranks)."""
        if not self.ctx.is_main:
            return
        from DeepDosimetricsLib.deep.train.pca import fit_pca, sampler_batches

        started = time.perf_counter()
        basis = fit_pca(sampler_batches(self.sampler, self.config.pca_tiles), self.config.features,
                        seed=self.config.seed, progress=log.info)
        self.model.set_pca_basis(basis.mean, basis.axes, basis.variances)
        self.pca_summary = {"tiles": basis.tiles, "variance_kept": float(basis.variances.sum() / basis.total_variance),
                            "seconds": round(time.perf_counter() - started, 1)}

    def _init_output_bias(self, tiles: int = 16) -> None:
        """Output biases at the logit of each channel's mean over the first validation tiles, so that the
        first steps learn structure rather than the mean (deterministic: no random numbers drawn)."""
        import torch

        chosen = self.val_tiles[:tiles]
        if not chosen:
            return
        values = np.stack([self.val_sampler.read(p, s, None) for p, s in chosen])
        means = np.clip(values.mean(axis=(0, 2, 3, 4)), 1e-3, 1 - 1e-3)
        with torch.no_grad():
            self.model.output_bias().copy_(torch.logit(torch.as_tensor(means, dtype=torch.float32)))

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        """Weights, optimiser, schedule, history, early-stopping state and random states of a checkpoint."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.config.schedule == "cosine":
            self.scheduler.T_max = max(1, self.total_steps)
        self.step_count = int(checkpoint["step"])
        self.history = [dict(r) for r in checkpoint["history"]]
        early = checkpoint["early"]
        self.best_val, self.bad_validations = float(early["best_val"]), int(early["bad_validations"])
        self.best_step = early.get("best_step")
        rng = checkpoint["rng"]
        set_rng_state(rng[min(self.ctx.rank, len(rng) - 1)] if isinstance(rng, list) else rng)
        log.info("resuming %s at step %d of %d", self.out_dir, self.step_count, self.total_steps)

    def _setup_loss(self) -> None:
        """Per-channel loss weights (refusing weights of channels not trained) and the mask channels."""
        config = self.config
        self.weights = [config.channel_weights.get(label, 1.0) for label in self.labels]
        unknown_weights = sorted(set(config.channel_weights) - set(self.labels))
        if unknown_weights:
            raise InputError(f"channel_weights name channels not trained: {', '.join(unknown_weights)}")
        self.mask_channels = self.model_config.mask_channels
        self.loss_terms = None
        if config.mask_dice_weight or config.dose_target_weight or config.dose_gradient_weight:
            from DeepDosimetricsLib.deep.model import LossTerms

            target = "mask:PTV"
            self.loss_terms = LossTerms(
                dose_channels=[i for i, label in enumerate(self.labels) if label.startswith("dose")],
                mask_channels=self.mask_channels,
                target_channel=self.labels.index(target) if target in self.labels else None,
                dice=config.mask_dice_weight, dose_in_target=config.dose_target_weight,
                gradient=config.dose_gradient_weight,
            )

    # ------------------------------------------------------------------ the loop
    def batches(self):
        """The training batches of the remaining steps (with the progress bar and throughput window set up)."""
        from DeepDosimetricsLib.deep.train.sampling import make_loader
        from DeepDosimetricsLib.runtime.progress import progress_bar

        if self.config.pca_start and self.step_count == 0 and not self.history:
            # the PCA start is the first candidate for the best model: no run ends below it on validation
            row = {"step": 0, "epoch": 0.0, "train_loss": None, "val_loss": None, "lr": 0.0, "voxels_per_s": None,
                   "elapsed_s": 0.0}
            self._validate_into(row)
            self.history.append(row)
        self.window_loss, self.window_steps, self.window_start = 0.0, 0, time.perf_counter()
        self.run_start = time.perf_counter() - (self.history[-1]["elapsed_s"] if self.history else 0.0)
        self.bar = progress_bar(range(self.step_count, self.total_steps), total=self.total_steps, desc="train",
                                quiet=self.quiet or not self.ctx.is_main)
        self.bar.update(self.step_count)
        self.model.train()
        if self.resident is not None:
            return (self.resident.batch(step) for step in range(self.step_count, self.total_steps))
        return make_loader(self.sampler, self.step_count, self.total_steps, self._loader_workers(),
                           pin_memory=self.device.type == "cuda")

    def run_steps(self, first_step: int, count: int) -> list[float]:
        """``count`` optimisation steps on the batches of steps ``first_step`` .. ``first_step + count - 1``,
        without logging, validation or checkpoints: a federated round (the caller loads the weights before
        and reads them after). The losses of the steps."""
        from DeepDosimetricsLib.deep.train.sampling import make_loader

        self.model.train()
        self.step_count = int(first_step)
        stop = self.step_count + int(count)
        if self.resident is not None:
            source = (self.resident.batch(step) for step in range(self.step_count, stop))
        else:
            source = make_loader(self.sampler, self.step_count, stop, self._loader_workers(),
                                 pin_memory=self.device.type == "cuda")
        return [self.step(batch) for batch in source]

    def _to_device(self, batch):
        batch = batch.to(self.device, non_blocking=True)
        return batch.contiguous(memory_format=self.memory_format) if self.cpu else batch

    def _autocast(self):
        import contextlib

        import torch

        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()

    def _loss(self, logits, x):
        from DeepDosimetricsLib.deep.model import reconstruction_loss

        return reconstruction_loss(logits, x, self.weights, self.mask_channels, self.config.mask_bce_weight,
                                   self.loss_terms)

    def step(self, batch) -> float:
        """One optimisation step on a batch; the loss (DeepDosimetricsError when it is not finite)."""
        if self.config.schedule == "warmup_cosine":
            factor = lr_factor(self.progress(), self.config.warmup_fraction, self.config.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.lr * factor
        x = self._to_device(batch)
        with self._autocast():
            logits, _ = self.ddp_model(x)
        loss, _ = self._loss(logits, x)
        if self.penalty is not None:
            loss = loss + self.penalty(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.config.schedule not in ("plateau", "warmup_cosine"):
            self.scheduler.step()
        self.step_count += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DeepDosimetricsError(
                f"training diverged at step {self.step_count} (loss {value}); lower --lr (now {self.config.lr})"
            )
        return value

    def after_step(self, loss: float) -> None:
        """Log, validate and checkpoint when their intervals come; sets ``should_stop`` for early stopping."""
        config, step = self.config, self.step_count
        self.window_loss += loss
        self.window_steps += 1
        self.bar.update(1)
        last = step == self.total_steps or self._budget_check()
        validate_now = step % config.steps_per_epoch == 0 or last
        row = None
        if step % config.log_every == 0 or last or validate_now:
            row = self._log_row()
        if validate_now:
            self._validate_into(row)
        if row is not None:
            self.history.append(row)
            if self.ctx.is_main:
                emit_progress("train", step, self.total_steps, loss=row["train_loss"], val_loss=row["val_loss"],
                              voxels_per_s=row["voxels_per_s"], lr=row["lr"])
        if validate_now and config.patience and self.bad_validations >= config.patience:
            self.stopped_early = True
            log.info("early stopping at step %d: no improvement in %d validations", step, self.bad_validations)
        if step % config.checkpoint_every == 0 or last or self.stopped_early:
            self.checkpoint()

    def progress(self) -> float:
        """Share of the run done: of the steps, or of the time budget when that is further along."""
        done = self.step_count / max(1, self.total_steps)
        if self.config.budget_minutes:
            done = max(done, (time.perf_counter() - self.run_start) / (60 * self.config.budget_minutes))
        return done

    @property
    def should_stop(self) -> bool:
        """Early stopping, or the time budget spent (then after_step has validated and checkpointed)."""
        return self.stopped_early or self.budget_spent

    @property
    def budget_spent(self) -> bool:
        return bool(self.config.budget_minutes) and self._budget_reached

    def _budget_check(self) -> bool:
        minutes = self.config.budget_minutes
        self._budget_reached = bool(minutes) and time.perf_counter() - self.run_start >= 60 * minutes
        return self._budget_reached

    def _log_row(self) -> dict[str, Any]:
        """A history row for this step: mean training loss (over ranks) and throughput since the last row."""
        config = self.config
        now = time.perf_counter()
        train_loss = float(self.ctx.all_reduce_mean(self.window_loss / max(1, self.window_steps)))
        voxels_per_batch = config.batch * config.tile**3
        speed = self.ctx.world_size * voxels_per_batch * self.window_steps / max(1e-9, now - self.window_start)
        row = {
            "step": self.step_count, "epoch": self.step_count / config.steps_per_epoch, "train_loss": train_loss,
            "val_loss": None, "lr": self.optimizer.param_groups[0]["lr"], "voxels_per_s": speed,
            "elapsed_s": now - self.run_start,
        }
        self.last_train_loss = train_loss
        self.window_loss, self.window_steps, self.window_start = 0.0, 0, now
        self.bar.set_postfix(loss=f"{train_loss:.4g}", vox_s=f"{speed:.3g}")
        return row

    def _validate_into(self, row: dict[str, Any]) -> None:
        """Validate, record the losses in ``row``, step a plateau schedule, keep the best model."""
        from DeepDosimetricsLib.deep.model import save_model

        val_loss, per_channel = self.validate()
        row["val_loss"] = val_loss
        for label, mse in zip(self.labels, per_channel):
            row[f"val_mse[{label}]"] = mse
        if self.config.schedule == "plateau":
            self.scheduler.step(val_loss)
        if val_loss < self.best_val - self.config.min_delta:
            self.best_val, self.bad_validations, self.best_step = val_loss, 0, self.step_count
            if self.ctx.is_main:
                _save_model_or_fail(save_model, self.out_dir, self.model, self.model_config, self.summary())
        else:
            self.bad_validations += 1
        self.window_start = time.perf_counter()  # validation time is not training throughput

    def validate(self) -> tuple[float, list[float]]:
        """Mean loss and per-channel MSE over the fixed validation tiles (shared across ranks)."""
        import torch

        ctx, batch = self.ctx, self.config.batch
        self.model.eval()
        totals = torch.zeros(1 + len(self.labels), dtype=torch.float64)
        mine = [t for i, t in enumerate(self.val_tiles) if i % ctx.world_size == ctx.rank]
        with torch.no_grad():
            for first in range(0, len(mine), batch):
                chunk = mine[first : first + batch]
                x = self._to_device(torch.from_numpy(np.stack([self.val_sampler.read(p, s, None) for p, s in chunk])))
                with self._autocast():
                    logits, _ = self.model(x)
                loss, per_channel = self._loss(logits, x)
                totals += torch.cat([loss.detach().double().cpu().view(1), per_channel.double().cpu()]) * len(chunk)
        totals = ctx.all_reduce_sum(totals) / max(1, len(self.val_tiles))
        self.model.train()
        return float(totals[0]), [float(v) for v in totals[1:]]

    # ------------------------------------------------------------------ outputs
    def summary(self) -> dict[str, Any]:
        """The training summary stored in model.json."""
        return {
            "steps": self.step_count, "total_steps": self.total_steps,
            "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
            "best_step": self.best_step, "train_patients": self.train_ids, "val_patients": self.val_ids,
            "world_size": self.ctx.world_size, "device": str(self.device), "bf16": self.use_bf16,
            "train_config": self.config.to_dict(), "cohort": str(self.cohort_dir),
            "training_seconds": round(self.history[-1]["elapsed_s"], 1) if self.history else 0.0,
            "sampler": self.sampler_kind, "refused_patients": self.refused_patients, "skipped_patients": self.skipped_patients,
            **({"pca_start": self.pca_summary} if self.pca_summary else {}),
        }

    def _write_history(self, final: bool = False) -> None:
        if not self.ctx.is_main:
            return
        write_history_csv(self.out_dir / HISTORY_CSV, self.history)
        if final:
            write_loss_curve(self.out_dir / LOSS_CURVE_PNG, self.history)

    def checkpoint(self) -> None:
        """Write checkpoint.pt and loss_history.csv (rank 0; every rank's random state is gathered)."""
        rngs = self.ctx.gather_objects(rng_state())
        if self.ctx.is_main:
            save_checkpoint(
                self.checkpoint_path, step=self.step_count, train_config=self.config.to_dict(),
                model_config=self.model_config.to_dict(), channels=self.labels, model=self.model,
                optimizer=self.optimizer, scheduler=self.scheduler, rng=rngs, history=self.history,
                early={"best_val": self.best_val, "bad_validations": self.bad_validations,
                       "best_step": self.best_step},
                world_size=self.ctx.world_size,
            )
            self._write_history()
        self.ctx.barrier()

    def finish(self) -> TrainResult:
        """Last checkpoint, model.json (best weights kept, run summary updated), loss curve; the result."""
        from DeepDosimetricsLib.deep.model import MODEL_JSON, save_model

        self.bar.close()
        if self.step_count % self.config.checkpoint_every and not (self.stopped_early or self.budget_spent):
            self.checkpoint()
        in_sync = self.ctx.parameters_in_sync(self.model)
        if self.ctx.is_main:
            if not (self.out_dir / MODEL_JSON).exists() or math.isinf(self.best_val):
                _save_model_or_fail(save_model, self.out_dir, self.model, self.model_config, self.summary())
            else:  # keep the best weights; record the run's end in model.json
                _update_summary(self.out_dir, {**self.summary(), "ranks_in_sync": in_sync,
                                               "stopped_early": self.stopped_early})
            self._write_history(final=True)
        self.ctx.barrier()
        return TrainResult(
            out_dir=self.out_dir, steps=self.step_count,
            best_val_loss=None if math.isinf(self.best_val) else self.best_val,
            final_train_loss=self.last_train_loss, stopped_early=self.stopped_early, history=self.history,
            model=self.model, summary={**self.summary(), "ranks_in_sync": in_sync},
        )


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


__all__ = [
    "TrainConfig", "TrainResult", "make_config", "load_config_file", "train",
    "write_history_csv", "write_loss_curve", "Trainer", "model_config_for",
]
