"""Sub-commands of the `deepdosimetrics` command line.

Each sub-command lives in its own module of this package and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Heavy imports belong inside ``run``. What the commands
share is here: :func:`describe_command` (the --help epilog: notes, then the command's reading of the one
exit-code contract), :func:`add_common_arguments` (--cohort, --cache, --quiet), the per-structure table and
pool options, and :func:`report_left_out` (the patients a command left out, printed last).
"""

from __future__ import annotations

import textwrap
from typing import Mapping, Optional

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
    "federated": "federated",
}


def describe_command(parser, ok: str, partial: Optional[str] = None, notes: str = "") -> None:
    """The command's --help epilog: ``notes``, then its exit codes, the rows of the README's one contract.

    Args:
        parser: the command's parser.
        ok: when it exits 0 (everything done, or left out for a reason the data give or the user chose).
        partial: when it exits 1, for a command that finishes the rest and names what it left out (None for
            a command that does all or nothing).
        notes: what comes first (outputs, behaviour).
    """
    codes = [f"Exit code 0: {ok}."]
    if partial:
        codes.append(f"Exit code 1: {partial}; the rest is done and what was left out is named last.")
    codes.append("Exit code 2: bad arguments or input that stops the command (one 'error: ...' line, no traceback).")
    # wrapped here too, for parsers that print their epilog as written (RawDescriptionHelpFormatter)
    parser.epilog = "\n\n".join(([notes.rstrip()] if notes else []) + [textwrap.fill(" ".join(codes), 100)])


def add_common_arguments(parser, cohort: bool = False, cache: bool = False, quiet: bool = True,
                         progress_lines: bool = False) -> None:
    """The options several commands share, with one wording: --cohort DIR (required), --cache DIR (the
    preprocessing cache) and --quiet (``progress_lines``: the command also prints ``@progress`` lines, which
    --quiet keeps)."""
    if cohort:
        parser.add_argument("--cohort", required=True, metavar="DIR", help="cohort folder (one sub-folder per patient)")
    if cache:
        parser.add_argument("--cache", metavar="DIR", default=None,
                            help="preprocessing cache folder (built or completed when needed; an existing one "
                            "keeps its configuration; default: the cohort's default cache folder)")
    if quiet:
        parser.add_argument("--quiet", action="store_true",
                            help="no progress bar" + (" (@progress lines are still printed)" if progress_lines else ""))


def report_left_out(patients: Mapping[str, str], why: str) -> None:
    """Print the patients a command left out (id: reason), after its other output: a scheduler's log ends
    with them."""
    if patients:
        print(f"left out {len(patients)} patient(s) {why}:")
        for pid, reason in patients.items():
            print(f"  {pid}: {reason}")


def describe_structure_table(parser, reasons: str) -> None:
    """describe_command for a per-structure cohort table (radiomics, dvh): ``reasons`` are the reason rows the
    data give (exit 0), rows of failed patients or structures say ``error: ...`` (exit 1)."""
    describe_command(
        parser,
        ok=f"every structure was measured, or has a row with the 'reason' the data give ({reasons}), also "
        "listed on stderr",
        partial="some patients or structures failed (unreadable files, values failing the checks: their rows "
        "say 'error: ...')",
    )


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
