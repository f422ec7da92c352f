"""What the review station may serve: the encoded patients of one cohort, their metrics, the predict summary.

Every patient id coming from a browser goes through :meth:`Catalog.check_id`: it must be one of the ids the
encoding and the cohort share, so no request can name a file or a folder.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import pandas as pd

from DeepDosimetricsLib.runtime.errors import InputError

PathLike = Union[str, Path]

#: characters a patient id may hold (what the cohort layout allows as a folder name); nothing else is looked up
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: (column, channel kind, metric) of the patient list; the channel is matched by kind (window/mask:PTV/dose)
METRIC_COLUMNS = (
    ("psnr", "window", "psnr_body"),
    ("ssim", "window", "ssim"),
    ("mae_hu_body", "window", "mae_hu_body"),
    ("ptv_dice", "mask:PTV", "dice"),
    ("dose_mae_gy_ptv", "dose", "mae_gy_ptv"),
    ("d95_error_gy", "dose", "D95_error_gy"),
    ("dmean_error_gy", "dose", "Dmean_error_gy"),
)

#: a reconstruction is flagged when one of these is crossed (what a clinician would not accept at a glance)
FLAG_LIMITS = {"ptv_dice_below": 0.8, "d95_abs_error_gy_above": 2.0, "dmean_abs_error_gy_above": 2.0}


@dataclass(frozen=True)
class PatientFiles:
    """Where one patient's volumes lie (resolved from a checked id only)."""

    patient: str
    folder: Path  # the cohort's patient folder
    recon: Path  # ENC_DIR/<patient>/recon
    tiles: Path  # ENC_DIR/<patient>/tiles.csv

    def recon_volume(self, stem: str, residual: bool = False) -> Optional[Path]:
        """``recon/<stem>.nrrd`` or ``<stem>_residual.nrrd`` when it exists."""
        path = self.recon / (f"{stem}_residual.nrrd" if residual else f"{stem}.nrrd")
        return path if path.is_file() else None


def _channel_kind(channel: str) -> str:
    if channel.startswith("window"):
        return "window"
    if channel.startswith("dose"):
        return "dose"
    return channel


def metrics_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per patient from encode's long ``metrics.csv`` (patient, channel, metric, value), with the
    columns of :data:`METRIC_COLUMNS`, ``flagged`` and ``why`` (the limits crossed)."""
    rows: Dict[str, dict] = {}
    if not metrics.empty:
        kinds = metrics["channel"].astype(str).map(_channel_kind)
        for column, kind, metric in METRIC_COLUMNS:
            chosen = metrics[(kinds == kind) & (metrics["metric"] == metric)]
            for patient, value in chosen.groupby("patient")["value"].first().items():
                rows.setdefault(str(patient), {})[column] = float(value)
    table = pd.DataFrame.from_dict(rows, orient="index")
    for column, _, _ in METRIC_COLUMNS:
        if column not in table:
            table[column] = math.nan
    table = table[[c for c, _, _ in METRIC_COLUMNS]]
    table.index.name = "patient"
    why = []
    for _, row in table.iterrows():
        reasons = []
        if row["ptv_dice"] < FLAG_LIMITS["ptv_dice_below"]:
            reasons.append(f"PTV Dice {row['ptv_dice']:.2f}")
        if abs(row["d95_error_gy"]) > FLAG_LIMITS["d95_abs_error_gy_above"]:
            reasons.append(f"D95 error {row['d95_error_gy']:+.1f} Gy")
        if abs(row["dmean_error_gy"]) > FLAG_LIMITS["dmean_abs_error_gy_above"]:
            reasons.append(f"Dmean error {row['dmean_error_gy']:+.1f} Gy")
        why.append("; ".join(reasons))
    table["why"] = why
    table["flagged"] = table["why"] != ""
    return table


class Catalog:
    """The patients the station serves: encoded (``ENC_DIR/<id>/done.json`` and ``recon/``) and in the cohort."""

    def __init__(self, encoding_dir: PathLike, cohort_dir: PathLike, predict_dir: Optional[PathLike] = None):
        from DeepDosimetricsLib.data.cohort import Cohort

        self.encoding_dir = Path(encoding_dir).resolve()
        self.cohort_dir = Path(cohort_dir).resolve()
        self.predict_dir = Path(predict_dir).resolve() if predict_dir else None
        job = self.encoding_dir / "encode.json"
        try:
            self.job = json.loads(job.read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"{self.encoding_dir} is not an encoding folder: {job} cannot be read ({error})") from None
        self.cohort = Cohort.open(self.cohort_dir)
        encoded = [str(p) for p in self.job.get("patients", [])]
        known = set(self.cohort.ids)
        self.ids: List[str] = [
            pid for pid in encoded
            if pid in known and _ID_PATTERN.match(pid) and (self.encoding_dir / pid / "recon").is_dir()
        ]
        if not self.ids:
            raise InputError(
                f"no patient of {self.encoding_dir} has a reconstruction and is in the cohort {self.cohort_dir} "
                "(run `deepdosimetrics encode --reconstruct` on this cohort)"
            )
        self.channels: List[str] = [str(c) for c in self.job.get("description", {}).get("channels", [])]
        path = self.encoding_dir / "metrics.csv"
        metrics = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["patient", "channel", "metric", "value"])
        table = metrics_table(metrics).reindex(self.ids)
        table["flagged"] = table["flagged"].fillna(False).astype(bool)
        table["why"] = table["why"].fillna("")
        self.metrics = table
        self.summary = self._read_summary()
        self.predictions = self._read_predictions()

    # ------------------------------------------------------------------ ids
    def check_id(self, patient: object) -> str:
        """The id itself when it is one of the catalog's patients; InputError otherwise (no path, no ``..``)."""
        if not isinstance(patient, str) or not _ID_PATTERN.match(patient) or ".." in patient:
            raise InputError("patient id refused: an id is a cohort folder name, never a path")
        if patient not in self.ids:
            raise InputError("unknown patient id: not one of the encoded patients of this cohort")
        return patient

    def files(self, patient: object) -> PatientFiles:
        """The patient's folders, for a checked id only."""
        pid = self.check_id(patient)
        return PatientFiles(pid, self.cohort_dir / pid, self.encoding_dir / pid / "recon",
                            self.encoding_dir / pid / "tiles.csv")

    def patient(self, patient: object):
        """The cohort's :class:`Patient` of a checked id, as a fresh shallow copy: the images it reads (a
        512x512x350 CT is 180 MB) go with the copy, not kept by the cohort for the server's lifetime."""
        return copy.copy(self.cohort[self.check_id(patient)])

    # ------------------------------------------------------------------ tables
    def patient_rows(self, sort_by: str = "flagged") -> List[dict]:
        """The patient list: flagged patients first (worst first), then by ``sort_by``."""
        table = self.metrics.reset_index()
        if sort_by == "flagged":
            table = table.assign(_dice=table["ptv_dice"].fillna(1.0), _psnr=table["psnr"].fillna(math.inf))
            table = table.sort_values(["flagged", "_dice", "_psnr"], ascending=[False, True, True])
            table = table.drop(columns=["_dice", "_psnr"])
        elif sort_by in table:
            ascending = sort_by in ("psnr", "ssim", "ptv_dice")  # worst first
            key = table[sort_by].abs() if sort_by.endswith("error_gy") else table[sort_by]
            table = table.iloc[key.sort_values(ascending=ascending, na_position="last").index]
        rows = []
        for record in table.to_dict("records"):
            rows.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()})
        return rows

    def _read_summary(self) -> Optional[pd.DataFrame]:
        if self.predict_dir is None:
            return None
        path = self.predict_dir / "summary.csv"
        if not path.is_file():
            raise InputError(f"{self.predict_dir} is not a predict output: {path} is missing")
        return pd.read_csv(path)

    def _read_predictions(self) -> Optional[pd.Series]:
        """Mean out-of-fold prediction per patient (``predictions.csv``), when there is one."""
        if self.predict_dir is None:
            return None
        path = self.predict_dir / "predictions.csv"
        if not path.is_file():
            return None
        table = pd.read_csv(path)
        value = next((c for c in ("prediction", "risk", "probability", "score") if c in table), None)
        if "patient" not in table or value is None:
            return None
        return table.groupby(table["patient"].astype(str))[value].mean()

    def summary_rows(self) -> List[dict]:
        if self.summary is None:
            return []
        return self.summary.round(3).astype(object).where(self.summary.notna(), None).to_dict("records")
