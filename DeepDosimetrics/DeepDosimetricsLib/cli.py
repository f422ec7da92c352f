"""The `deepdosimetrics` command line: dispatches to the modules of `commands/`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from DeepDosimetricsLib import __version__
from DeepDosimetricsLib.commands import COMMANDS
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser with every available sub-command (a missing command module is left out).

    ``only``: give that sub-command its options and the others their one-line help alone, so a command (or
    the top-level --help) does not import what every other command's defaults are read from."""
    parser = argparse.ArgumentParser(
        prog="deepdosimetrics",
        description="Deep-learning dosimetrics: phantoms, import, radiomics/DVH, tiled autoencoder "
        "training, encoding and reconstruction of radiotherapy CT + structures + dose.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (and tracebacks)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"{__package__}.commands.{module_name}")
        except ModuleNotFoundError as error:
            if error.name == f"{__package__}.commands.{module_name}":
                continue
            raise
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        if only is None or only == name:
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 some items failed, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # the top-level options take no value: the first other word names the command
    command = next((word for word in argv if not word.startswith("-")), "")
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s"
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except DeepDosimetricsError as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
