"""`deepdosimetrics dvh`: dose-volume metrics (and curves) per structure of every patient of a cohort."""

from __future__ import annotations

import argparse

from DeepDosimetricsLib.commands import (
    add_common_arguments,
    add_modality_argument,
    add_structure_table_arguments,
    describe_structure_table,
    pool_from_args,
)

HELP = "dose-volume metrics per structure (volume, Dmean/min/max, D98/95/50/2, V5..V70) of a cohort to CSV"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    from DeepDosimetricsLib.features.dosimetrics import DEFAULT_BIN_WIDTH_GY

    describe_structure_table(parser, "empty, outside the image, patient without dose, structure missing for "
                             "that patient")
    add_common_arguments(parser, cohort=True, quiet=False)
    add_structure_table_arguments(parser, "metrics")
    add_modality_argument(parser, "the images the dose lies on")
    parser.add_argument(
        "--dvh-curves",
        default=None,
        metavar="FILE.csv",
        help="also write the cumulative DVH curves (patient,structure,dose_gy,volume_pct)",
    )
    parser.add_argument(
        "--bin-width",
        type=float,
        default=DEFAULT_BIN_WIDTH_GY,
        metavar="GY",
        help="dose step of the DVH curves in Gy (default %(default)s)",
    )
    parser.add_argument(
        "--spatial",
        action="store_true",
        help="also the spatial descriptors: mean dose in equal-volume halves and thirds along the patient's "
        "left-right, anterior-posterior and cranio-caudal axes, dose-weighted centroid offset, spread and "
        "gradient (mm, Gy/mm; README 'Spatial dose descriptors')",
    )
    add_common_arguments(parser)
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
    cohort = Cohort.open(args.cohort, modality=args.modality)
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
