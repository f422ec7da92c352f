"""`deepdosimetrics synth`: write the deterministic phantom cohort (see DeepDosimetricsLib.data.phantoms)."""

from __future__ import annotations

import argparse

HELP = "write a deterministic cohort of CT-like phantoms (CT, structures, multi-beam dose, clinical.csv)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the sub-command."""
    parser.add_argument("--out", required=True, metavar="DIR", help="cohort folder to write (created)")
    parser.add_argument("--patients", type=int, default=6, metavar="N", help="number of patients (default 6)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[96, 96, 64],
        metavar=("X", "Y", "Z"),
        help="CT size in voxels (default 96 96 64; 512 512 350 for full size)",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=None,
        metavar=("SX", "SY", "SZ"),
        help="voxel spacing in mm (default: 400-mm field of view and 320-mm scan length for the shape)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same files")
    parser.add_argument(
        "--sites",
        type=int,
        default=0,
        metavar="N",
        help="scanner sites (1-4): a 'site' column in clinical.csv and a per-site CT effect (HU offset, noise, "
        "slice thickness) that changes no dose or outcome; the PTV site is then 'tumour_site' (default 0: none)",
    )
    parser.add_argument(
        "--outcome-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply the dose and PTV-volume coefficients of the outcome model by F (written to cohort.json; "
        "default 1)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Generate the cohort; patients already written with the same settings are kept."""
    from DeepDosimetricsLib.data.phantoms import synthesize_cohort

    out = synthesize_cohort(
        args.out,
        patients=args.patients,
        shape=tuple(args.shape),
        spacing=None if args.spacing is None else tuple(args.spacing),
        seed=args.seed,
        quiet=args.quiet,
        sites=args.sites,
        outcome_scale=args.outcome_scale,
    )
    if not args.quiet:
        print(f"wrote {args.patients} phantom patients to {out} (clinical.csv, cohort.json)")
    return 0
