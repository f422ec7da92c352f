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
}


def add_structure_table_arguments(parser, what: str) -> None:
    """--structures, --jobs and --wide: the options every per-structure cohort table shares."""
    parser.add_argument(
        "--structures",
        default=None,
        metavar="A,B",
        help="comma-separated structure names (case-insensitive; default: every structure)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="processes working in parallel over (patient, structure) (default 1)",
    )
    parser.add_argument(
        "--wide",
        action="store_true",
        help=f"write {what} as rows and one column per patient/structure (default: a long "
        "table patient,structure,image,feature,value,reason)",
    )
