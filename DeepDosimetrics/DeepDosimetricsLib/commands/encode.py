"""`deepdosimetrics encode`: features (and reconstructions) of a cohort from a trained tile autoencoder."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable, Sequence

from DeepDosimetricsLib.commands import (
    add_common_arguments,
    add_pool_arguments,
    describe_command,
    pool_from_args,
    report_left_out,
)
from DeepDosimetricsLib.deep.encode.settings import EncodeSettings
from DeepDosimetricsLib.runtime.devices import DEVICES

HELP = ("encode a cohort with a trained model: per-tile and per-structure features; optionally the "
        "reconstructed volumes, residuals, metrics, latent traversals, snapshots and Slicer scenes")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    from DeepDosimetricsLib.deep.shipped import shipped_models

    describe_command(
        parser,
        ok="every patient was encoded",
        partial="patients were left out (refused by the cache, lacking a channel the model needs, failed): "
        "listed in OUT/summary.json and OUT/skipped.csv",
    )
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="model folder (model.json + model.pt), or the name of a shipped pre-trained model "
                        f"({', '.join(shipped_models()) or 'none installed'}; see its MODEL_CARD.md)")
    add_common_arguments(parser, cohort=True, cache=True, quiet=False)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--patients", metavar="IDS", default=None,
                        help="only these patients: comma-separated ids, or @FILE with one id per line")
    parser.add_argument("--reconstruct", action="store_true",
                        help="also write the reconstructed volumes, residuals and metrics.csv")
    parser.add_argument("--overlap", type=float, default=EncodeSettings.overlap, metavar="F",
                        help="tile overlap fraction in [0, 1): stride = tile * (1 - F) (default %(default)s)")
    parser.add_argument("--batch", type=int, default=EncodeSettings.batch, metavar="N",
                        help="tiles per model call (default %(default)s)")
    parser.add_argument("--device", default=EncodeSettings.device, metavar="DEVICE",
                        help=f"{', '.join(DEVICES)} or cuda:N (default %(default)s: CUDA, then MPS, then the CPU)")
    parser.add_argument("--traverse", metavar="FEATURES", default=None,
                        help="latent traversal of these features (e.g. z00,z03 or all); needs --reconstruct")
    parser.add_argument("--sigmas", type=_floats, nargs="+", default=[EncodeSettings.sigmas], metavar="S",
                        help="traversal shifts in cohort standard deviations: --sigmas -2 2 or --sigmas=-2,2 "
                        f"(default {' '.join(f'{s:g}' for s in EncodeSettings.sigmas)})")
    parser.add_argument("--snapshots", action="store_true",
                        help="PNG snapshots (axial, coronal, sagittal through the PTV centre); needs --reconstruct")
    parser.add_argument("--scene", action="store_true",
                        help="a Slicer scene (.mrb) per patient; needs --reconstruct and slicer-core (or Slicer)")
    parser.add_argument("--no-residuals", action="store_true", help="do not write residual volumes")
    parser.add_argument("--compress", action="store_true", help="zlib-compress the float NRRD volumes")
    add_pool_arguments(parser, "the patients' cache entries (the encoding itself runs in this process, or "
                       "split across ranks under torchrun)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue an earlier run in --out (finished patients are not redone)")
    group.add_argument("--overwrite", action="store_true", help="replace an earlier encoding in --out")
    add_common_arguments(parser, progress_lines=True)


def _patient_list(text):
    from DeepDosimetricsLib.runtime.errors import InputError

    if text is None:
        return None
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            items = path.read_text().split()
        except OSError as error:
            raise InputError(f"--patients: cannot read {path} ({error.strerror})") from None
    else:
        items = text.split(",")
    ids = [item.strip() for item in items if item.strip()]
    if not ids:
        raise InputError("--patients names no patient")
    return ids


def scene_outputs(cohort_dir, snapshots: bool, scene: bool) -> Callable[[str, Path, Sequence], None] | None:
    """The ``patient_hook`` of ``encode_cohort`` writing PNG ``snapshots/`` and/or a Slicer ``scene.mrb``.

    The deep stage calls it and the MRML layer does the work, so neither imports the other.

    Args:
        cohort_dir: the cohort folder (the scene shows the patient's CT, dose and structures).
        snapshots: write ``snapshots/*.png`` from the patient's ``recon/`` volumes.
        scene: write ``scene.mrb`` (needs slicer-core or Slicer).
    """
    if not (snapshots or scene):
        return None

    def write(patient_id: str, folder: Path, specs: Sequence) -> None:
        from DeepDosimetricsLib.mrml.snapshots import write_patient_scene, write_snapshots

        folder = Path(folder)
        if snapshots:
            write_snapshots(folder / "recon", folder / "snapshots", specs)
        if scene:
            write_patient_scene(cohort_dir, patient_id, folder / "recon", folder / "scene.mrb", specs,
                                snapshot_dir=folder / "snapshots" if snapshots else None)

    return write


def run(args: argparse.Namespace) -> int:
    """Encode; the patients left out are printed last, and make the exit code 1."""
    from DeepDosimetricsLib.deep.encode.job import encode_cohort
    from DeepDosimetricsLib.mrml.snapshots import slicer_available
    from DeepDosimetricsLib.runtime.errors import InputError

    traverse = None
    if args.traverse:
        traverse = None if args.traverse.strip().lower() == "all" else [
            f.strip() for f in args.traverse.split(",") if f.strip()]
        if traverse is None:
            from DeepDosimetricsLib.deep.model import ModelConfig, read_model_json

            count = ModelConfig.from_dict(dict(read_model_json(args.model).get("config") or {})).features
            traverse = [f"z{i:02d}" for i in range(count)]
    if args.scene and not slicer_available():
        raise InputError("--scene needs the MRML layer: install slicer-core (pip install slicer-core) "
                         "or run inside 3D Slicer; --snapshots works without it")
    settings = EncodeSettings(
        overlap=args.overlap, batch=args.batch, device=args.device, reconstruct=args.reconstruct,
        residuals=not args.no_residuals, snapshots=args.snapshots, scene=args.scene, compress=args.compress,
        traverse=traverse, sigmas=tuple(v for group in args.sigmas for v in group),
        patients=_patient_list(args.patients), jobs=args.jobs, scheduler=args.scheduler,
        quiet=args.quiet,
    )
    pool_from_args(args)  # --jobs and --scheduler are checked before any work
    result = encode_cohort(args.model, args.cohort, args.out, args.cache, settings,
                           resume=args.resume, overwrite=args.overwrite,
                           patient_hook=scene_outputs(args.cohort, settings.snapshots, settings.scene))
    if os.environ.get("RANK", "0") not in ("", "0"):  # under torchrun, rank 0 reports for all
        return 1 if result.skipped else 0
    print(f"encoded: {len(result.done)} patient(s) ({len(result.reused)} already done), "
          f"skipped: {len(result.skipped)}")
    for name, path in result.tables.items():
        print(f"  {name}: {path}")
    if settings.reconstruct:
        print(f"  volumes: {result.out}/<patient>/recon/")
    report_left_out(result.skipped, "(exit code 1; see summary.json)")
    return 1 if result.skipped else 0
