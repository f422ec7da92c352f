"""`deepdosimetrics radiomics`: pyradiomics features per structure of every patient of a cohort."""

from __future__ import annotations

import argparse

from DeepDosimetricsLib.commands import (
    add_common_arguments,
    add_modality_argument,
    add_structure_table_arguments,
    describe_structure_table,
    pool_from_args,
)

HELP = "radiomics features per structure (CT or dose) of a cohort, through pyradiomics, to a CSV table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    from DeepDosimetricsLib.features.radiomics import DEFAULT_IMAGE, IMAGE_KINDS

    describe_structure_table(parser, "empty, outside the image, too small for pyradiomics, patient without dose "
                             "(--image dose), structure missing for that patient")
    add_common_arguments(parser, cohort=True, quiet=False)
    parser.add_argument(
        "--image",
        choices=IMAGE_KINDS,
        default=DEFAULT_IMAGE,
        help="image the features describe: the CT (HU) or the dose on the CT grid (Gy); default %(default)s",
    )
    add_modality_argument(parser, "the images (--image ct: the patient's image, an MR or PET in its place)")
    settings = parser.add_mutually_exclusive_group()
    settings.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="settings preset: firstorder (default; 18 first-order features), all (every 3D "
        "class, shape included), ibsi (2 mm isotropic, trilinear, fixed bin width). "
        "Presets use a 0.5 Gy bin width on the dose, 25 HU on the CT",
    )
    settings.add_argument(
        "--params",
        default=None,
        metavar="FILE",
        help="a pyradiomics parameter file (.yaml or .json), used as it is",
    )
    add_structure_table_arguments(parser, "features")
    add_common_arguments(parser)
    parser.add_argument("--out", required=True, metavar="FILE.csv", help="output CSV (written atomically)")


def run(args: argparse.Namespace) -> int:
    """Exit code 0 when every structure was measured or skipped for a data reason (empty, outside the
    image, too small, no dose; listed on stderr and in the reason column), 1 when some failed
    (unreadable files), 2 on bad input (unknown preset, broken parameter file, no cohort)."""
    from DeepDosimetricsLib.data.cohort import Cohort
    from DeepDosimetricsLib.features.radiomics import DEFAULT_PRESET, cohort_radiomics, resolve_parameters
    from DeepDosimetricsLib.features.tables import parse_structure_list, write_result

    pool = pool_from_args(args)
    params = resolve_parameters(args.params or args.preset or DEFAULT_PRESET, image=args.image)
    cohort = Cohort.open(args.cohort, modality=args.modality)
    table = cohort_radiomics(
        cohort,
        image=args.image,
        params=params,
        structures=parse_structure_list(args.structures),
        jobs=pool,
        quiet=args.quiet,
    )
    return write_result(table, args.out, wide=args.wide)
