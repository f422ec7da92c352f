"""Cohort importers: folder exports, OpenKBP sparse CSVs and DICOM-RT, into the canonical layout.

``COHORT/<patient>/ct.nrrd``, optional ``dose.nrrd``, ``structures/<Name>.nrrd`` (names normalised
through :mod:`DeepDosimetricsLib.data.synonyms`, originals kept in ``import.json``) and
``COHORT/import_report.csv`` (one row per patient: ok or skipped, with the reason).

    from DeepDosimetricsLib.data.importers import ImportOptions, import_folder, import_openkbp, import_dicom
    report = import_openkbp("openkbp-csv", ImportOptions(out="cohort"))
    report.write("cohort"); print(report.summary()); sys.exit(report.exit_code)
"""

from DeepDosimetricsLib.data.importers.layout import ImportOptions
from DeepDosimetricsLib.data.importers.report import ImportReport, PatientImportStatus


def import_folder(source, options, patterns=None, report=None):
    """See :func:`DeepDosimetricsLib.data.importers.folder.import_folder`."""
    from DeepDosimetricsLib.data.importers.folder import import_folder as run

    return run(source, options, patterns, report)


def import_openkbp(source, options, report=None):
    """See :func:`DeepDosimetricsLib.data.importers.openkbp.import_openkbp`."""
    from DeepDosimetricsLib.data.importers.openkbp import import_openkbp as run

    return run(source, options, report)


def import_dicom(source, options, report=None):
    """See :func:`DeepDosimetricsLib.data.importers.dicom.import_dicom`."""
    from DeepDosimetricsLib.data.importers.dicom import import_dicom as run

    return run(source, options, report)


__all__ = ["ImportOptions", "ImportReport", "PatientImportStatus", "import_folder", "import_openkbp",
           "import_dicom"]
