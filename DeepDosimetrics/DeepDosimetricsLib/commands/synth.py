"""`deepdosimetrics synth`: write the deterministic phantom cohort (see DeepDosimetricsLib.data.phantoms)."""

from __future__ import annotations

import argparse

from DeepDosimetricsLib.commands import add_common_arguments, describe_command

HELP = "write a deterministic cohort of CT-like phantoms (CT, structures, multi-beam dose, clinical.csv)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the sub-command (defaults: PhantomConfig's)."""
    from DeepDosimetricsLib.data.phantoms.config import DEFAULT_PATIENTS, PhantomConfig

    describe_command(parser, ok="the cohort was written (the same seed gives the same files)")
    parser.add_argument("--out", required=True, metavar="DIR", help="cohort folder to write (created)")
    parser.add_argument("--patients", type=int, default=DEFAULT_PATIENTS, metavar="N",
                        help="number of patients (default %(default)s)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=list(PhantomConfig.shape),
        metavar=("X", "Y", "Z"),
        help=f"CT size in voxels (default {' '.join(map(str, PhantomConfig.shape))}; 512 512 350 for full size)",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=None,
        metavar=("SX", "SY", "SZ"),
        help="voxel spacing in mm (default: 400-mm field of view and 320-mm scan length for the shape)",
    )
    parser.add_argument("--seed", type=int, default=PhantomConfig.seed,
                        help="random seed (default %(default)s); same seed, same files")
    parser.add_argument(
        "--sites",
        type=int,
        default=PhantomConfig.sites,
        metavar="N",
        help="scanner sites (1-4): a 'site' column in clinical.csv and a per-site CT effect (HU offset, noise, "
        "slice thickness) that changes no dose or outcome; the PTV site is then 'tumour_site' (default "
        "%(default)s: none)",
    )
    parser.add_argument(
        "--outcome-scale",
        type=float,
        default=PhantomConfig.outcome_scale,
        metavar="F",
        help="multiply the dose and PTV-volume coefficients of the outcome model by F (written to cohort.json; "
        "default %(default)s)",
    )
    add_common_arguments(parser)


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
