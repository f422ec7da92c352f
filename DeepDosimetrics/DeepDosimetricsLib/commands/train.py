"""`deepdosimetrics train`: train the tiled 3D autoencoder on a cohort (CPU, GPU, or DDP under torchrun)."""

from __future__ import annotations

import argparse
from typing import Any

from DeepDosimetricsLib.commands import add_common_arguments, describe_command, report_left_out
from DeepDosimetricsLib.runtime.devices import DEVICES

HELP = "train the tiled 3D autoencoder (K features per tile) on a cohort; resumable, torchrun-ready"


def training_defaults() -> dict[str, Any]:
    """The training defaults (``Resources/train-default.yaml``, the file ``make_config`` starts from), for
    the help texts; read without importing the training code so ``--help`` stays quick."""
    import yaml

    from DeepDosimetricsLib.runtime.resources import resource_path

    try:
        return yaml.safe_load(resource_path("train-default.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options (defaults come from Resources/train-default.yaml, then --config)."""
    defaults = training_defaults()

    def default(key: str) -> str:
        value = defaults.get(key)
        return " ".join(map(str, value)) if isinstance(value, list) else str(value)

    describe_command(
        parser,
        ok="the model was trained on every patient of the cohort, or without those --skip-incomplete left out "
        "(listed in model.json's skipped_patients)",
        partial="patients the cache refused (unreadable, failing the value checks) were left out: trained on "
        "the others, listed in model.json's refused_patients",
    )
    add_common_arguments(parser, cohort=True, cache=True, quiet=False)
    parser.add_argument("--out", required=True, metavar="MODEL_DIR",
                        help="model folder: model.json/model.pt, checkpoint.pt, loss_history.csv, loss_curve.png")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML training configuration (see Resources/train-default.yaml); options below override it")
    parser.add_argument("--channels", default=None, help="default | full | list such as window:lung,mask:PTV,dose")
    parser.add_argument("--tile", type=int, default=None, metavar="N", help=f"tile edge in voxels (default {default('tile')})")
    parser.add_argument("--batch", type=int, default=None, metavar="N", help=f"tiles per step and process (default {default('batch')})")
    parser.add_argument("--features", type=int, default=None, metavar="K", help=f"learned features per tile (default {default('features')})")
    parser.add_argument("--widths", type=int, nargs="+", default=None, metavar="W",
                        help=f"encoder widths, one per level halving the tile (default {default('widths')}; "
                        "16 32 32 trains about 5x faster at --tile 32 on a CPU)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, metavar="N", help="training steps in total")
    length.add_argument("--epochs", type=int, default=None, metavar="N",
                        help="epochs of steps_per_epoch steps (validation after each)")
    parser.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {default('lr')})")
    parser.add_argument("--schedule", choices=("cosine", "plateau", "constant"), default=None,
                        help=f"learning-rate schedule (default {default('schedule')})")
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help=f"default {default('device')}: auto is CUDA, then MPS, then the CPU")
    parser.add_argument("--resume", action="store_true",
                        help="continue from MODEL_DIR/checkpoint.pt (a new run when there is none)")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help=f"steps between checkpoints (default {default('checkpoint_every')})")
    parser.add_argument("--val-fraction", type=float, default=None, metavar="F",
                        help=f"share of patients held out for validation (default {default('val_fraction')})")
    parser.add_argument("--patience", type=int, default=None, metavar="N",
                        help=f"early stopping after N validations without improvement (0: off; default {default('patience')})")
    parser.add_argument("--workers", type=int, default=None, metavar="N", dest="num_workers",
                        help=f"DataLoader processes reading tiles (default {default('num_workers')}; 0: in the training process)")
    from DeepDosimetricsLib.deep.train.training import SAMPLERS

    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help=f"where tiles are cut (default {default('sampler')}): device = on the GPU from the cache "
                        "held in its memory; host = read by the CPU (DataLoader workers); auto = device when it fits")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads per process (default: torch's; under torchrun on CPU: cores / processes)")
    parser.add_argument("--skip-incomplete", action="store_true", default=None,
                        help="train without the patients lacking a requested channel instead of refusing")
    parser.add_argument("--seed", type=int, default=None, help=f"random seed (default {default('seed')})")
    add_common_arguments(parser, progress_lines=True)


def run(args: argparse.Namespace) -> int:
    """Train; prints where the model went, then the patients left out. Exit code 1 when the cache refused
    some (trained without them), 0 otherwise (also when --skip-incomplete left some out: the user's choice)."""
    from DeepDosimetricsLib.deep.train.training import make_config, train

    config = make_config(
        args.config,
        channels=args.channels, tile=args.tile, batch=args.batch, features=args.features, widths=args.widths,
        steps=args.steps, epochs=args.epochs, lr=args.lr, schedule=args.schedule, device=args.device,
        checkpoint_every=args.checkpoint_every, val_fraction=args.val_fraction, patience=args.patience,
        num_workers=args.num_workers, sampler=args.sampler, threads=args.threads, skip_incomplete=args.skip_incomplete, seed=args.seed,
    )
    import contextlib
    import os

    from DeepDosimetricsLib.runtime.locks import job_lock

    # one training per model folder: a second one is refused at once, naming the holder (under torchrun,
    # rank 0 holds it for the job)
    lock = (job_lock(args.out, "train", what="wait for it to finish or choose another --out")
            if os.environ.get("RANK", "0") in ("", "0") else contextlib.nullcontext())
    with lock:
        result = train(args.cohort, args.out, config, cache_dir=args.cache, resume=args.resume, quiet=args.quiet)
    refused = result.summary.get("refused_patients") or {}
    code = 1 if refused else 0
    if result.summary.get("world_size", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return code  # rank 0 reports for all
    best = f"{result.best_val_loss:.5g}" if result.best_val_loss is not None else "n/a"
    print(f"model: {result.out_dir} (steps {result.steps}, best validation loss {best}"
          + (", stopped early" if result.stopped_early else "") + ")")
    report_left_out(result.summary.get("skipped_patients") or {}, "lacking a channel (--skip-incomplete)")
    report_left_out(refused, "refused by the cache (exit code 1)")
    return code
