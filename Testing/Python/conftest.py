"""Shared fixtures of the headless test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("DEEPDOSIMETRICS_SHARED_DATA", REPO.parent / "shared" / "data"))

# Tests share 2 cores: keep each library from starting more threads than that.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# Hypothesis profiles (property-based tests, e.g. test_fuzz_inputs.py): "ci" (default) keeps each test to a
# few seconds on 2 cores; "nightly" runs many more examples: `pytest --hypothesis-profile nightly`
# (or HYPOTHESIS_PROFILE=nightly). Registered here so the plugin's option finds them.
try:
    from hypothesis import HealthCheck, settings

    _relaxed = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]
    settings.register_profile("ci", max_examples=25, deadline=10_000, derandomize=True,
                              suppress_health_check=_relaxed, print_blob=True)
    settings.register_profile("nightly", max_examples=400, deadline=10_000, suppress_health_check=_relaxed,
                              print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is in the dev extra; its tests skip without it
    pass


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip when this checkout has none beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (a fresh clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def openkbp_train(shared_data: Path) -> Path:
    """The 170 OpenKBP patients in NRRD (flat layout)."""
    path = shared_data / "openkbp" / "train"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory) -> Path:
    """A small deterministic phantom cohort (4 patients, 48x48x32), generated once per session."""
    from DeepDosimetricsLib.data.phantoms import synthesize_cohort

    out = tmp_path_factory.mktemp("phantoms") / "cohort"
    return Path(synthesize_cohort(out, patients=4, shape=(48, 48, 32), seed=0, quiet=True))


@pytest.fixture(scope="session")
def phantom_subset(phantom_cohort):
    """``make(folder, count) -> folder``: a cohort of the first ``count`` phantom patients, copied."""
    import shutil

    def make(folder: Path, count: int) -> Path:
        folder.mkdir(parents=True)
        for pid in sorted(p.name for p in phantom_cohort.iterdir() if p.is_dir())[:count]:
            shutil.copytree(phantom_cohort / pid, folder / pid)
        return folder

    return make


@pytest.fixture(scope="session")
def tiny_model():
    """``make(folder) -> folder``: an untrained model small enough for job tests (seed 0; tile 16, 4
    features, soft-tissue window + PTV + dose), saved in ``folder``."""

    def make(folder: Path) -> Path:
        import torch
        from DeepDosimetricsLib.deep.model import ModelConfig, TileAutoencoder, save_model

        torch.manual_seed(0)
        config = ModelConfig(channels=["window:soft_tissue", "mask:PTV", "dose"], tile=16, features=4,
                             widths=[4, 8], groups=2)
        return Path(save_model(folder, TileAutoencoder(config), config))

    return make
