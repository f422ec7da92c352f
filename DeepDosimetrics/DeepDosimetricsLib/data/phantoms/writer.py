"""The phantom cohort on disk: patient folders, clinical.csv and cohort.json (``synthesize_cohort``).

Files (canonical cohort layout): ``phantom_NNN/ct.nrrd`` (int16 HU), ``dose.nrrd`` (float32 Gy, CT
grid), ``structures/<Name>.nrrd`` (uint8 0/1; thorax: Body, Lung_L, Lung_R, Heart, Esophagus,
SpinalCord, Bones, PTV; pelvis: Body, Bladder, Rectum, Femur_L, Femur_R, Bones, PTV; the pelvis has no
spinal cord: the cord ends above the scanned region), ``phantom.json`` (all generating parameters, plan,
dose metrics, clinical row). The root holds ``clinical.csv`` and ``cohort.json`` (configuration and the
outcome model). NRRDs are gzip-compressed; patient folders appear atomically (written under a hidden
temporary name, then renamed); a rerun skips patients already generated with the same settings and
removes generated patients beyond the requested number.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence, Union

from DeepDosimetricsLib.data.phantoms.config import (
    DEFAULT_PATIENTS,
    DEFAULT_SHAPE,
    GENERATOR_NAME,
    PATIENT_PREFIX,
    PhantomConfig,
    patient_id,
)
from DeepDosimetricsLib.data.phantoms.outcome import (
    CLINICAL_COLUMNS,
    CLINICAL_COLUMNS_SITES,
    clinical_column_descriptions,
)
from DeepDosimetricsLib.data.phantoms.patient import generate_patient, rounded
from DeepDosimetricsLib.data.phantoms.scanner import SCANNER_SITES
from DeepDosimetricsLib.runtime.atomic import replace_folder, write_text_atomic
from DeepDosimetricsLib.runtime.errors import InputError


def _is_done(folder: Path, config: PhantomConfig, index: int) -> bool:
    """Whether ``folder`` already holds patient ``index`` generated with the same settings."""
    try:
        parameters = json.loads((folder / "phantom.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = rounded(
        {
            "name": GENERATOR_NAME,
            **config.settings(),
            "index": index,
            "seed_sequence_entropy": [config.seed, index],
        }
    )
    if parameters.get("generator") != expected:
        return False
    names = parameters.get("structures", [])
    files = [folder / "ct.nrrd", folder / "dose.nrrd"] + [folder / "structures" / f"{n}.nrrd" for n in names]
    return all(path.is_file() for path in files)


def synthesize_patient(
    out_dir: Union[str, Path], index: int, config: PhantomConfig = PhantomConfig()
) -> Path:
    """Write patient ``index`` into ``out_dir/phantom_NNN`` (atomically; skipped when already there)."""
    out_dir = Path(out_dir)
    folder = out_dir / patient_id(index)
    if _is_done(folder, config, index):
        return folder
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the phantom cohort folder {out_dir}: {error}") from error
    patient = generate_patient(index, config)
    tmp = out_dir / f".{patient.id}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        patient.write(tmp)
        del patient
        replace_folder(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _remove_surplus_patients(out_dir: Path, patients: int) -> None:
    """Remove phantom patients beyond ``patients`` left by an earlier, larger run (only our own folders)."""
    for folder in sorted(out_dir.glob(f"{PATIENT_PREFIX}[0-9][0-9][0-9]*")):
        suffix = folder.name[len(PATIENT_PREFIX) :]
        if not (folder.is_dir() and suffix.isdigit() and int(suffix) >= patients):
            continue
        try:
            generator = json.loads((folder / "phantom.json").read_text(encoding="utf-8")).get("generator", {})
        except (OSError, ValueError):
            continue
        if generator.get("name") == GENERATOR_NAME:
            shutil.rmtree(folder)


def synthesize_cohort(
    out_dir: Union[str, Path],
    patients: int = DEFAULT_PATIENTS,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Optional[Sequence[float]] = None,
    seed: int = 0,
    quiet: bool = True,
    sites: int = 0,
    outcome_scale: float = 1.0,
) -> Path:
    """Write a phantom cohort of ``patients`` patients into ``out_dir``; returns ``out_dir``.

    ``sites`` > 0 assigns each patient at random (its own stream) to one of the first ``sites`` scanner
    sites of ``SCANNER_SITES``: a ``site`` column in clinical.csv and the site's CT effect (HU offset, noise,
    slice thickness), which changes no dose, structure or outcome. ``outcome_scale`` multiplies the dose and
    volume coefficients of the outcome model (a stronger, easier-to-find signal for analysis demos).
    """
    from DeepDosimetricsLib.runtime.progress import progress_bar

    if int(patients) != patients or patients < 1:
        raise InputError(f"the number of phantom patients must be a positive integer, got {patients!r}")
    config = PhantomConfig(
        shape=tuple(shape), spacing=None if spacing is None else tuple(spacing), seed=seed, sites=sites,
        outcome_scale=outcome_scale,
    )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"phantom output {out_dir} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the phantom cohort folder {out_dir}: {error}") from error
    # .old-* were the replaced folders of earlier versions; replace_folder names them .old.<pid>
    for pattern in (f".{PATIENT_PREFIX}*.tmp-*", f".{PATIENT_PREFIX}*.old-*", f".{PATIENT_PREFIX}*.old.*"):
        for stale in out_dir.glob(pattern):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
    rows = []
    for index in progress_bar(range(int(patients)), total=int(patients), desc="synth", quiet=quiet):
        folder = synthesize_patient(out_dir, index, config)
        parameters = json.loads((folder / "phantom.json").read_text(encoding="utf-8"))
        rows.append(parameters["clinical"])
    _remove_surplus_patients(out_dir, int(patients))
    buffer = io.StringIO()
    columns = CLINICAL_COLUMNS_SITES if config.sites else CLINICAL_COLUMNS
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row[key] for key in columns})
    write_text_atomic(out_dir / "clinical.csv", buffer.getvalue())
    cohort = {
        "generator": {"name": GENERATOR_NAME, **config.settings()},
        "patients": [row["patient"] for row in rows],
        "layout": "one folder per patient: ct.nrrd (int16 HU), dose.nrrd (float32 Gy), structures/<Name>.nrrd "
        "(uint8 0/1), phantom.json (generating parameters); clinical.csv at the root",
        "variants": "index % 3 == 2: pelvis (one leg for indices 2, 8, 14, ..., two legs for 5, 11, ...); "
        "otherwise thorax",
        "clinical_columns": clinical_column_descriptions(bool(config.sites)),
        "outcome_model": config.outcome_model().describe(),
    }
    if config.sites:
        cohort["scanner_sites"] = [asdict(site) for site in SCANNER_SITES[: config.sites]]
    write_text_atomic(out_dir / "cohort.json", json.dumps(rounded(cohort), indent=2) + "\n")
    return out_dir
