"""Deterministic CT-like phantom cohort: CT, structures, a multi-beam dose and clinical data.

The embedded default data set of DeepDosimetrics (``deepdosimetrics synth``). Every patient is drawn
from its own random stream, ``SeedSequence([seed, index])``, so patient ``i`` is the same whatever the
cohort size, and the same seed gives identical files. One module per concept, lower first:

- ``outcome``: clinical variables and the logistic outcome model (``OutcomeModel``, ``OUTCOME_MODEL``);
- ``scanner``: scanner sites and their effect on the CT (``ScannerSite``, ``SCANNER_SITES``);
- ``anatomy``: thorax and pelvis anatomies painted slice by slice (HU and structure masks), drawn per
  patient (``patient_variant``, ``THORAX_STRUCTURES``, ``PELVIS_STRUCTURES``);
- ``config``: ``PhantomConfig`` (shape, spacing, seed, dose grid, sites, outcome scale) and patient names;
- ``grid``: the CT grid and the coarse dose grid;
- ``dose``: the beam plan and the dose computed through the anatomy;
- ``patient``: ``generate_patient`` -> ``PhantomPatient`` (arrays and ``phantom.json`` parameters in memory);
- ``writer``: the files: patient folders, ``clinical.csv``, ``cohort.json`` (``synthesize_patient``,
  ``synthesize_cohort``).

Import the public API from here: ``from DeepDosimetricsLib.data.phantoms import synthesize_cohort``.
"""

from DeepDosimetricsLib.data.phantoms.anatomy import PELVIS_STRUCTURES, THORAX_STRUCTURES, patient_variant
from DeepDosimetricsLib.data.phantoms.config import DEFAULT_PATIENTS, DEFAULT_SHAPE, PhantomConfig, patient_id
from DeepDosimetricsLib.data.phantoms.outcome import (
    CLINICAL_COLUMNS,
    CLINICAL_COLUMNS_SITES,
    OUTCOME_MODEL,
    OutcomeModel,
)
from DeepDosimetricsLib.data.phantoms.patient import PhantomPatient, generate_patient
from DeepDosimetricsLib.data.phantoms.scanner import SCANNER_SITES, ScannerSite
from DeepDosimetricsLib.data.phantoms.writer import synthesize_cohort, synthesize_patient

__all__ = [
    "PhantomConfig",
    "PhantomPatient",
    "OutcomeModel",
    "OUTCOME_MODEL",
    "SCANNER_SITES",
    "ScannerSite",
    "THORAX_STRUCTURES",
    "PELVIS_STRUCTURES",
    "CLINICAL_COLUMNS",
    "CLINICAL_COLUMNS_SITES",
    "DEFAULT_PATIENTS",
    "DEFAULT_SHAPE",
    "generate_patient",
    "synthesize_patient",
    "synthesize_cohort",
    "patient_id",
    "patient_variant",
]
