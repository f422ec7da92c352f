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
