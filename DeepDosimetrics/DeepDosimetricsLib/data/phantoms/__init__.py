"""The deterministic phantom cohort of ``deepdosimetrics synth`` (being split into one module per concept)."""

from DeepDosimetricsLib.data.phantoms.anatomy import (
    OUTCOME_MODEL,
    PELVIS_STRUCTURES,
    SCANNER_SITES,
    THORAX_STRUCTURES,
    OutcomeModel,
    PhantomConfig,
    PhantomPatient,
    ScannerSite,
    generate_patient,
    patient_id,
    patient_variant,
    synthesize_cohort,
    synthesize_patient,
)

__all__ = [
    "PhantomConfig",
    "PhantomPatient",
    "OutcomeModel",
    "OUTCOME_MODEL",
    "SCANNER_SITES",
    "ScannerSite",
    "THORAX_STRUCTURES",
    "PELVIS_STRUCTURES",
    "generate_patient",
    "synthesize_patient",
    "synthesize_cohort",
    "patient_id",
    "patient_variant",
]
