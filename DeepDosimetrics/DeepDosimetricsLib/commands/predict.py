"""`deepdosimetrics predict`: do DVH, radiomics or deep features add predictive value to the clinical
variables? Nested repeated cross-validation, bootstrap CIs, paired increments and a report."""

from __future__ import annotations

import argparse
import sys

from DeepDosimetricsLib.commands import add_common_arguments, describe_command

HELP = "outcome analysis: compare clinical, DVH, radiomics and deep feature sets by nested CV (report)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options (defaults: PredictSettings')."""
    from DeepDosimetricsLib.analysis.job import PredictSettings
    from DeepDosimetricsLib.analysis.protocol import MODELS

    describe_command(
        parser,
        ok="the analysis ran; a set that cannot be fitted (e.g. every feature constant) has its reason in "
        "summary.csv",
        notes="Sets compared: each named set alone, the base, base + each set (e.g. clinical+dvh) and 'all'. "
        "Outputs in --out: summary.csv, comparison.csv, predictions.csv, selected_features.csv, cohort.csv, "
        "report.html, figures/*.png and predict.json (settings and versions), each written atomically. Bad "
        "input: an unknown column, a non-binary outcome, too few events, no patient in common.",
    )
    parser.add_argument("--clinical", required=True, metavar="CLINICAL.csv",
                        help="clinical table with a 'patient' column, the endpoint and the covariates")
    endpoint = parser.add_argument_group("endpoint (one of)")
    endpoint.add_argument("--outcome", metavar="COLUMN", help="binary endpoint column (0/1)")
    endpoint.add_argument("--time", metavar="COLUMN", help="time-to-event: follow-up time column")
    endpoint.add_argument("--event", metavar="COLUMN", help="time-to-event: event column (1 event, 0 censored)")
    parser.add_argument("--covariates", metavar="A,B", default=None,
                        help="clinical columns of the 'clinical' set (default: every other column; \"\" for none)")
    parser.add_argument("--features", nargs="+", default=[], metavar="NAME=TABLE.csv",
                        help="named feature tables: long (radiomics, dvh, encode features.csv) or wide")
    parser.add_argument("--base", default=None, metavar="clinical|NAME",
                        help="reference set of the increments (default: clinical when it has columns)")
    parser.add_argument("--structures", default=None, metavar="A,B", help="keep these structures' features")
    parser.add_argument("--select", default=None, metavar="REGEX", help="keep feature columns matching REGEX")
    parser.add_argument("--harmonize", default=None, metavar="COLUMN",
                        help="ComBat harmonisation of the image features by this clinical column (site/scanner), "
                        "fitted inside each training fold")
    parser.add_argument("--harmonize-sets", default=None, metavar="A,B",
                        help="feature tables ComBat adjusts (default: every table; e.g. radiomics,deep, not dvh)")
    parser.add_argument("--validate-on", default=None, metavar="SITE",
                        help="external validation: cross-validate on the other sites, then fit every set on all of "
                        "them and test it once on the patients of SITE (its own rows in summary.csv and "
                        "comparison.csv; nothing, ComBat included, is fitted on SITE)")
    parser.add_argument("--site-column", default=None, metavar="COLUMN",
                        help="clinical column of --validate-on (default: the --harmonize column, else 'site')")
    defaults = PredictSettings
    parser.add_argument("--model", default=defaults.model, choices=MODELS,
                        help="logistic (L2; Cox ridge for time-to-event), elasticnet, forest (default %(default)s)")
    parser.add_argument("--folds", type=int, default=defaults.folds, help="outer folds (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=defaults.repeats,
                        help="repeats of the outer K-fold (default %(default)s)")
    parser.add_argument("--inner-folds", type=int, default=defaults.inner_folds,
                        help="inner CV folds for tuning (default %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=defaults.bootstrap,
                        help="bootstrap resamples for CIs (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="random seed of the splits and models (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=defaults.jobs,
                        help="processes fitting folds in parallel (default %(default)s)")
    parser.add_argument("--no-report", action="store_true", help="skip report.html and figures")
    add_common_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")


def run(args: argparse.Namespace) -> int:
    """Exit code 0 on success, 2 on bad input (raised as InputError)."""
    from DeepDosimetricsLib.analysis.job import PredictSettings, format_summary, predict_outcome
    from DeepDosimetricsLib.analysis.tables import parse_feature_spec
    from DeepDosimetricsLib.runtime.errors import InputError

    features = {}
    for spec in args.features:
        name, path = parse_feature_spec(spec)
        if name in features:
            raise InputError(f"--features: the set name {name!r} is given twice")
        features[name] = path

    def split(text):
        return [part.strip() for part in text.split(",") if part.strip()] if text else None

    settings = PredictSettings(
        clinical=args.clinical, features=features, out=args.out, outcome=args.outcome, time=args.time,
        event=args.event, covariates=[] if args.covariates == "" else split(args.covariates), base=args.base, structures=split(args.structures),
        select=args.select, harmonize=args.harmonize, harmonize_sets=split(args.harmonize_sets), model=args.model, folds=args.folds, repeats=args.repeats,
        inner_folds=args.inner_folds, seed=args.seed, jobs=args.jobs, bootstrap=args.bootstrap,
        report=not args.no_report, quiet=args.quiet,
        validate_on=args.validate_on, site_column=args.site_column,
    )
    result = predict_outcome(settings)
    print(format_summary(result.summary, result.comparison))
    print(f"\n{len(result.paths)} outputs in {result.out} ({result.elapsed_s:.0f} s): "
          + ", ".join(sorted(result.paths)), file=sys.stderr)
    return 0
