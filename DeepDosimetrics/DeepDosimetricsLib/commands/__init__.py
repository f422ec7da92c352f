"""Sub-commands of the `deepdosimetrics` command line.

Each sub-command lives in its own module of this package and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Heavy imports belong inside ``run``.
"""

#: sub-command name -> module in this package, in the order `--help` lists them
COMMANDS: dict[str, str] = {
    "synth": "synth",
    "import": "import_cohort",
    "radiomics": "radiomics",
    "dvh": "dvh",
    "cache": "cache",
    "train": "train",
    "encode": "encode",
    "review": "review",
    "predict": "predict",
}


def add_structure_table_arguments(parser, what: str) -> None:
    """--structures, --jobs and --wide: the options every per-structure cohort table shares."""
    parser.add_argument(
        "--structures",
        default=None,
        metavar="A,B",
        help="comma-separated structure names (case-insensitive; default: every structure)",
    )
    add_pool_arguments(parser, "(patient, structure) items")
    parser.add_argument(
        "--wide",
        action="store_true",
        help=f"write {what} as rows and one column per patient/structure (default: a long "
        "table patient,structure,image,feature,value,reason)",
    )


def add_pool_arguments(parser, what: str) -> None:
    """--jobs N and --scheduler ADDRESS|local:N: how a per-patient command spreads its work (one helper so
    every command offers them alike; see runtime/pools.py)."""
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help=f"local processes working in parallel over {what} (default 1)",
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help=f"run {what} on a Dask cluster: a scheduler address (tcp://host:8786), a scheduler file "
        "(.json), or local:N for a local cluster of N worker processes (needs dask[distributed]; "
        "overrides --jobs)",
    )


def pool_from_args(args):
    """The PoolSpec of --jobs/--scheduler (InputError for --jobs < 1 or a malformed --scheduler)."""
    from DeepDosimetricsLib.runtime.pools import PoolSpec

    return PoolSpec(jobs=args.jobs, scheduler=getattr(args, "scheduler", None))


def add_modality_argument(parser, what: str = "the patients' images") -> None:
    """--modality auto|CT|MR|PT|OT: the modality of images whose data do not say it (data/modality.py)."""
    import argparse

    from DeepDosimetricsLib.data.modality import (
        AUTO,
        DEFAULT_MODALITY,
        MODALITY_CHOICES,
        parse_modality_option,
    )
    from DeepDosimetricsLib.runtime.errors import InputError

    def modality(text: str) -> str:
        try:
            return parse_modality_option(text)
        except InputError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parser.add_argument(
        "--modality",
        type=modality,
        default=AUTO,
        metavar="|".join(MODALITY_CHOICES),
        help=f"modality of {what} where their data do not say it (import.json, a Modality header key): "
        "CT (HU checks), MR, PT (PET) or OT (no scale: only NaN/infinite values refused); a patient whose "
        f"data say otherwise is refused; default %(default)s (what the data say, else {DEFAULT_MODALITY})",
    )
