"""`deepdosimetrics import folder|openkbp|dicom SRC --out COHORT`: bring patients into the canonical layout.

Exit code 0 when every patient was imported, 1 when some were skipped (see COHORT/import_report.csv),
2 for bad arguments. Patients already in COHORT are kept unless ``--overwrite``; SRC is never modified.
"""

from __future__ import annotations

import argparse

from DeepDosimetricsLib.commands import (
    add_common_arguments,
    add_modality_argument,
    add_pool_arguments,
    describe_command,
    pool_from_args,
)

HELP = "import a cohort (folder exports, OpenKBP CSVs or DICOM-RT) into the canonical layout"

FOLDER_EPILOG = """\
Patient sub-folders of SRC are read with glob patterns per role, tried in order (the first pattern
that matches wins). The defaults fit the prototype's exports (Pt001/2_pms.nrrd is the CT,
Pt001/1_RTSTRUCT_ANON_<Name>.nrrd the structures, *RTDOSE*/*dose* the dose), flat folders such as
OpenKBP's (ct.nrrd, dose.nrrd, <Name>.nrrd; possible_dose_mask.nrrd is kept, not a structure) and
cohorts already in the canonical layout (structures/<Name>.nrrd). Conforming NRRDs are symlinked
(default), hard-linked (--hardlink) or copied (--copy); other images are converted.
"""


def _describe(parser: argparse.ArgumentParser, notes: str = "") -> None:
    describe_command(parser, ok="every patient was imported (COHORT/import_report.csv)",
                     partial="some patients were skipped, or none was found (the reasons in "
                     "COHORT/import_report.csv)", notes=notes)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="source folder (never modified)")
    parser.add_argument("--out", required=True, metavar="COHORT", help="cohort folder to write (created)")
    parser.add_argument("--overwrite", action="store_true",
                        help="import again patients already in COHORT (default: keep them)")
    parser.add_argument("--synonyms", metavar="YAML", default=None,
                        help="structure-name synonyms extending the packaged map "
                        "(default: $DEEPDOSIMETRICS_SYNONYMS if set)")
    add_common_arguments(parser)
    parser.add_argument("--pseudonymize", metavar="KEYFILE", default=None,
                        help="replace patient ids with stable pseudonyms (anon-<HMAC-SHA256 of the id>); the "
                        "secret key and the only mapping back to the ids live in KEYFILE (created, mode 0600, "
                        "when absent; keep it outside the cohort and private). The same KEYFILE gives the same "
                        "pseudonyms in later imports")
    add_pool_arguments(parser, "patients")  # this process alone names them and writes the key file and report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sub-commands folder, openkbp and dicom with their options."""
    _describe(parser)
    kinds = parser.add_subparsers(dest="import_kind", metavar="KIND", required=True)
    folder = kinds.add_parser("folder", help="folders of NRRD/NIfTI files, one sub-folder per patient",
                              description="Import folder exports.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _describe(folder, FOLDER_EPILOG)
    _common(folder)
    folder.add_argument("--ct", action="append", metavar="GLOB",
                        help="CT file pattern(s), relative to a patient folder (repeat or comma-separate)")
    folder.add_argument("--dose", action="append", metavar="GLOB", help="dose file pattern(s)")
    folder.add_argument("--structure", action="append", metavar="GLOB", help="structure file pattern(s)")
    folder.add_argument("--name-pattern", metavar="REGEX", default=None,
                        help="regular expression with a group (?P<name>...) taking the structure name "
                        "from a file stem (default: the prototype's <n>_RTSTRUCT_[ANON_]<name>, else the stem)")
    linking = folder.add_mutually_exclusive_group()
    linking.add_argument("--copy", dest="link", action="store_const", const="copy",
                         help="copy files instead of symlinking them")
    linking.add_argument("--hardlink", dest="link", action="store_const", const="hardlink",
                         help="hard-link files (same file system) instead of symlinking them")
    folder.set_defaults(link="symlink")
    add_modality_argument(folder, "the images in the CT's place")
    for kind, help_text, description in (
        ("openkbp", "the OpenKBP challenge's sparse CSVs (pt_N/ct.csv, ...)", "Import OpenKBP sparse CSV patients."),
        ("dicom", "DICOM-RT: CT series, RTSTRUCT, RTDOSE (any folder tree)",
         "Import a DICOM-RT tree, grouped by patient and frame of reference."),
    ):
        sub = kinds.add_parser(kind, help=help_text, description=description)
        _describe(sub)
        _common(sub)


def _patterns(values, defaults: list[str]) -> list[str]:
    if not values:
        return list(defaults)
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    """Import, write COHORT/import_report.csv, print the summary; 1 when some patients were skipped."""
    from DeepDosimetricsLib.data.importers import ImportOptions
    from DeepDosimetricsLib.data.modality import AUTO
    from DeepDosimetricsLib.data.synonyms import load_synonyms

    options = ImportOptions(out=args.out, overwrite=args.overwrite, link=getattr(args, "link", "symlink"),
                            synonyms=load_synonyms(args.synonyms), quiet=args.quiet,
                            pseudonymize=getattr(args, "pseudonymize", None), pool=pool_from_args(args),
                            modality=getattr(args, "modality", AUTO))
    if args.import_kind == "folder":
        from DeepDosimetricsLib.data.importers.folder import (
            DEFAULT_CT_PATTERNS,
            DEFAULT_DOSE_PATTERNS,
            DEFAULT_NAME_PATTERN,
            DEFAULT_STRUCTURE_PATTERNS,
            FolderPatterns,
            import_folder,
        )

        patterns = FolderPatterns(ct=_patterns(args.ct, DEFAULT_CT_PATTERNS),
                                  dose=_patterns(args.dose, DEFAULT_DOSE_PATTERNS),
                                  structures=_patterns(args.structure, DEFAULT_STRUCTURE_PATTERNS),
                                  name_pattern=args.name_pattern or DEFAULT_NAME_PATTERN)
        report = import_folder(args.source, options, patterns)
    elif args.import_kind == "openkbp":
        from DeepDosimetricsLib.data.importers.openkbp import import_openkbp

        report = import_openkbp(args.source, options)
    else:
        from DeepDosimetricsLib.data.importers.dicom import import_dicom

        report = import_dicom(args.source, options)
    path = report.write(options.out)
    if options.pseudonymised:
        print(f"pseudonyms: key and mapping in {args.pseudonymize} (keep it private, outside the cohort)")
    print(f"report: {path}")
    print(report.summary())  # the skipped patients come last
    return report.exit_code
