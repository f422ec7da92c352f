"""`deepdosimetrics cache`: build (or complete) the compact preprocessing cache of a cohort."""

from __future__ import annotations

import argparse

from DeepDosimetricsLib.commands import (
    add_common_arguments,
    add_pool_arguments,
    describe_command,
    pool_from_args,
    report_left_out,
)

HELP = "build the compact memory-mapped preprocessing cache of a cohort (resampled, cropped to the body)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    from DeepDosimetricsLib.deep.cache.store import CacheConfig

    describe_command(parser, ok="every patient of the cohort is cached",
                     partial="patients could not be cached (unreadable, failing the value checks)")
    add_common_arguments(parser, cohort=True, quiet=False)
    parser.add_argument(
        "--cache", metavar="DIR", default=None,
        help="cache folder (default: $DEEPDOSIMETRICS_CACHE/<cohort>-<hash> or "
        "~/.cache/deepdosimetrics/<cohort>-<hash>; the cohort itself is never written)",
    )
    parser.add_argument(
        "--spacing", nargs=3, type=float, metavar=("SX", "SY", "SZ"), default=None,
        help="resample to this voxel spacing in mm (default: keep each patient's CT spacing)",
    )
    parser.add_argument("--margin", type=float, default=CacheConfig.margin_mm, metavar="MM",
                        help="margin around the body's bounding box, mm (default %(default)s)")
    parser.add_argument("--structures", nargs="+", default=None, metavar="NAME",
                        help="structures to store besides the target and body (default: all)")
    parser.add_argument("--target", default=None, metavar="NAME",
                        help="structure stored as the PTV mask (default: PTV, else the highest-dose PTV)")
    add_pool_arguments(parser, "patients")
    add_common_arguments(parser, progress_lines=True)


def run(args: argparse.Namespace) -> int:
    """Build what is missing; exit code 1 when some patients could not be cached."""
    from DeepDosimetricsLib.deep.cache.build import ensure_cache
    from DeepDosimetricsLib.deep.cache.store import CacheConfig

    pool = pool_from_args(args)
    config = CacheConfig(
        spacing=tuple(args.spacing) if args.spacing else None,
        margin_mm=args.margin,
        structures=tuple(args.structures) if args.structures else None,
        target=args.target,
    )
    cache = ensure_cache(args.cohort, config, cache_dir=args.cache, jobs=pool, quiet=args.quiet,
                         progress_json=True)
    print(f"cache: {cache.folder}")
    print(f"patients cached: {len(cache)}; failed: {len(cache.failed)}")
    report_left_out(cache.failed, "that could not be cached (exit code 1)")
    return 1 if cache.failed else 0
