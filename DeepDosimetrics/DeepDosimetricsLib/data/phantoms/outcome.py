"""The clinical variables of a phantom patient and the model its binary outcome is drawn from.

Outcome model (binary ``outcome`` in clinical.csv, drawn per patient from its own stream)::

    organ   = Heart (thorax) or Rectum (pelvis)
    logit   = -0.2 + 0.15 / Gy * (mean organ dose - reference dose of the organ)
                   + 0.012 / cc * (PTV volume - 100 cc)
    p       = 1 / (1 + exp(-logit));  outcome = 1 if uniform(0, 1) < p
    reference dose: Heart 3 Gy, Rectum 20 Gy  (see ``OutcomeModel``; written to cohort.json)

Clinical columns: patient, age (years), sex (M/F; pelvis patients are male), smoking
(never/former/current), ecog (0-2), site (lung_left, lung_right, mediastinum, prostate), outcome (0/1).
Only ``outcome`` depends on dose and PTV volume; the other variables are noise. With scanner sites,
``site`` is the scanner's and the PTV site moves to ``tumour_site`` (see ``scanner``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Tuple

import numpy as np


@dataclass(frozen=True)
class OutcomeModel:
    """Logistic model of the binary outcome: mean dose to an organ at risk and PTV volume."""

    intercept: float = -0.2
    per_gy_organ_mean_dose: float = 0.15
    per_cc_ptv_volume: float = 0.012
    reference_ptv_cc: float = 100.0
    reference_dose_gy: Dict[str, float] = field(default_factory=lambda: {"Heart": 3.0, "Rectum": 20.0})
    organ_by_variant: Dict[str, str] = field(default_factory=lambda: {"thorax": "Heart", "pelvis": "Rectum"})

    def logit(self, organ: str, organ_mean_dose_gy: float, ptv_volume_cc: float) -> float:
        """The log-odds of outcome = 1."""
        return (
            self.intercept
            + self.per_gy_organ_mean_dose * (organ_mean_dose_gy - self.reference_dose_gy[organ])
            + self.per_cc_ptv_volume * (ptv_volume_cc - self.reference_ptv_cc)
        )

    def describe(self) -> dict:
        """The model as written to cohort.json."""
        return {
            "formula": "logit = intercept + per_gy_organ_mean_dose * (organ mean dose [Gy] - reference_dose_gy"
            "[organ]) + per_cc_ptv_volume * (PTV volume [cc] - reference_ptv_cc); p = 1/(1+exp(-logit)); "
            "outcome = 1 if uniform(0,1) < p (per-patient random stream)",
            **asdict(self),
        }


OUTCOME_MODEL = OutcomeModel()


CLINICAL_COLUMNS = ("patient", "age", "sex", "smoking", "ecog", "site", "outcome")
#: with scanner sites: ``site`` is the scanner's, the PTV site moves to ``tumour_site``
CLINICAL_COLUMNS_SITES = ("patient", "age", "sex", "smoking", "ecog", "tumour_site", "site", "outcome")


def draw_outcome(
    model: OutcomeModel, organ: str, organ_mean_dose_gy: float, ptv_volume_cc: float, rng: np.random.Generator
) -> Tuple[float, float, int]:
    """(logit, probability, outcome) of a patient; one uniform draw from ``rng`` (its outcome stream)."""
    logit = model.logit(organ, organ_mean_dose_gy, ptv_volume_cc)
    probability = 1.0 / (1.0 + math.exp(-logit))
    outcome = int(rng.random() < probability)
    return logit, probability, outcome


def clinical_row(patient: str, variant: str, site: str, rng: np.random.Generator) -> dict:
    """The clinical variables of ``patient`` (its id; outcome is added from the model)."""
    pelvis = variant == "pelvis"
    age = int(np.clip(round(rng.normal(68.0 if pelvis else 65.0, 9.0)), 38, 90))
    sex = "M" if pelvis else ("M", "F")[int(rng.integers(0, 2))]
    smoking = ("never", "former", "current")[
        int(rng.choice(3, p=[0.4, 0.4, 0.2] if pelvis else [0.15, 0.5, 0.35]))
    ]
    ecog = int(rng.choice(3, p=[0.45, 0.45, 0.10]))
    return {
        "patient": patient,
        "age": age,
        "sex": sex,
        "smoking": smoking,
        "ecog": ecog,
        "site": site,
    }


def clinical_column_descriptions(sites: bool) -> dict:
    """What each clinical.csv column holds (cohort.json), in the column order of the file."""
    columns = {
        "patient": "patient folder name",
        "age": "years at treatment",
        "sex": "M or F (pelvis patients are male)",
        "smoking": "never, former or current",
        "ecog": "ECOG performance status 0-2",
        "site": "PTV site: lung_left, lung_right, mediastinum or prostate",
        "outcome": "binary toxicity-like outcome drawn from outcome_model",
    }
    if sites:
        columns["tumour_site"] = columns.pop("site")
        columns["site"] = "scanner site (scanner_sites): changes the CT only, not the dose, structures or outcome"
        columns["outcome"] = columns.pop("outcome")
    return columns
