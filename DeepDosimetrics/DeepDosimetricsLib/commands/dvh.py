"""`deepdosimetrics dvh`: dose-volume metrics (and curves) per structure of every patient of a cohort."""

from __future__ import annotations

import argparse

from DeepDosimetricsLib.commands import add_structure_table_arguments, pool_from_args

HELP = "dose-volume metrics per structure (volume, Dmean/min/max, D98/95/50/2, V5..V70) of a cohort to CSV"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    parser.epilog = (
        "A structure that cannot be measured (empty, outside the image, patient without dose, "
        "structure missing for that patient) gets one row with a 'reason' and is listed on stderr; the "
        "command still exits 0. Exit code 1: some patients or structures failed (unreadable files; their "
        "rows say 'error: ...'), the others are in the table. Exit code 2: bad input, nothing computed."
    )
    parser.add_argument(
        "--cohort", required=True, metavar="DIR", help="cohort folder (one sub-folder per patient)"
    )
    add_structure_table_arguments(parser, "metrics")
    parser.add_argument(
        "--dvh-curves",
        default=None,
        metavar="FILE.csv",
        help="also write the cumulative DVH curves (patient,structure,dose_gy,volume_pct)",
    )
    parser.add_argument(
        "--bin-width",
        type=float,
        default=0.1,
        metavar="GY",
        help="dose step of the DVH curves in Gy (default 0.1)",
    )
    parser.add_argument(
        "--spatial",
        action="store_true",
        help="also the spatial descriptors: mean dose in equal-volume halves and thirds along the patient's "
        "left-right, anterior-posterior and cranio-caudal axes, dose-weighted centroid offset, spread and "
        "gradient (mm, Gy/mm; README 'Spatial dose descriptors')",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", required=True, metavar="FILE.csv", help="output CSV (written atomically)")


def run(args: argparse.Namespace) -> int:
    """Exit code 0 when every structure was measured or skipped for a data reason (empty, outside the
    image, patient without dose), 1 when some failed (unreadable files), 2 on bad input."""
    from DeepDosimetricsLib.data.cohort import Cohort
    from DeepDosimetricsLib.features.dosimetrics import cohort_dvh
    from DeepDosimetricsLib.features.tables import parse_structure_list, write_result
    from DeepDosimetricsLib.runtime.atomic import write_csv_atomic
    from DeepDosimetricsLib.runtime.errors import InputError

    pool = pool_from_args(args)
    if not args.bin_width > 0:
        raise InputError(f"--bin-width must be positive, got {args.bin_width}")
    cohort = Cohort.open(args.cohort)
    result = cohort_dvh(
        cohort,
        structures=parse_structure_list(args.structures),
        jobs=pool,
        quiet=args.quiet,
        curves=bool(args.dvh_curves),
        bin_width_gy=args.bin_width,
        spatial=args.spatial,
    )
    if args.dvh_curves:
        write_csv_atomic(result.curves, args.dvh_curves)
    return write_result(result.metrics, args.out, wide=args.wide)
