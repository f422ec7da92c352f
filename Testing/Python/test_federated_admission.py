"""Issue 19 item 4: harmonisation across sites (deep/federated/admission.py) on phantom sites from `synth --sites 3`."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from DeepDosimetricsLib.data.phantoms import synthesize_cohort
from DeepDosimetricsLib.deep.cache.build import ensure_cache
from DeepDosimetricsLib.deep.federated.admission import (
    AdmissionThresholds,
    SiteStatistics,
    check_sites,
    site_statistics,
)


def _site_cohort(source: Path, ids: list[str], out: Path, change=None) -> Path:
    """A site's cohort folder: copies of ``ids``, each passed through ``change(folder)``."""
    out.mkdir(parents=True)
    for pid in ids:
        shutil.copytree(source / pid, out / pid)
        if change:
            change(out / pid)
    return out


def _scale_file(path: Path, factor: float = 1.0, offset: float = 0.0) -> None:
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    changed = sitk.GetImageFromArray((array.astype(np.float64) * factor + offset).astype(array.dtype))
    changed.CopyInformation(image)
    sitk.WriteImage(changed, str(path))


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Three phantom scanner sites (their own cohort folders and caches), a site whose doses are in cGy and a
    site whose CT has a +1000 HU offset (copies of site_A's patients)."""
    root = tmp_path_factory.mktemp("sites")
    cohort = synthesize_cohort(root / "all", patients=9, shape=(40, 40, 24), seed=0, sites=3, quiet=True)
    clinical = pd.read_csv(cohort / "clinical.csv")
    by_site = {site: sorted(group["patient"].astype(str)) for site, group in clinical.groupby("site")}
    assert sorted(by_site) == ["site_A", "site_B", "site_C"]
    folders = {site: _site_cohort(cohort, ids, root / site) for site, ids in by_site.items()}
    folders["site_cGy"] = _site_cohort(cohort, by_site["site_A"], root / "site_cGy",
                                       lambda folder: _scale_file(folder / "dose.nrrd", factor=100.0))
    folders["site_HU"] = _site_cohort(cohort, by_site["site_A"], root / "site_HU",
                                      lambda folder: _scale_file(folder / "ct.nrrd", offset=1000.0))
    caches = {site: ensure_cache(folder, cache_dir=root / f"cache-{site}") for site, folder in folders.items()}
    return {"folders": folders, "caches": caches, "ids": by_site, "root": root}


def test_normal_sites_are_admitted_and_only_aggregates_travel(sites):
    stats = {site: site_statistics(sites["caches"][site], "default") for site in ("site_A", "site_B", "site_C")}
    report = check_sites(stats)
    assert report.admitted == ["site_A", "site_B", "site_C"] and not report.refused, report.format()
    report.require(min_sites=3)
    for site, s in stats.items():
        assert s.patients == len(sites["ids"][site]) and s.refused == 0
        assert s.channel_share == {"window:soft_tissue": 1.0, "mask:PTV": 1.0, "dose": 1.0}
        assert 20 < s.dose_target_median_gy < 100 and -500 < s.hu_percentiles[50] < 300
        metrics = s.to_metrics()
        # only scalars, and no patient id anywhere
        assert all(isinstance(v, (int, float, str)) for v in metrics.values())
        text = " ".join(f"{k}={v}" for k, v in metrics.items())
        assert not any(pid in text for ids in sites["ids"].values() for pid in ids)
        assert SiteStatistics.from_metrics(metrics) == s


def test_a_site_with_cgy_doses_is_named_and_refused(sites, monkeypatch, tmp_path):
    # the cache's value checks already refuse a dose maximum above 200 Gy: the site reports the count by category
    stats = {site: site_statistics(sites["caches"][site], "default") for site in ("site_A", "site_B", "site_C", "site_cGy")}
    assert stats["site_cGy"].patients == 0 and stats["site_cGy"].refused == len(sites["ids"]["site_A"])
    # a cache shared by several sites: each counts only its own patients' refusals
    assert site_statistics(sites["caches"]["site_cGy"], "default", patients=["someone_else"]).refused == 0
    report = check_sites(stats)
    assert report.admitted == ["site_A", "site_B", "site_C"]
    assert "site_cGy" in report.refused and "cGy" in "; ".join(report.refused["site_cGy"])
    assert "site_cGy: refused" in report.format()
    with pytest.raises(Exception, match="site_cGy"):
        report.require(min_sites=4)
    # where the dose limit was raised (the cGy values got past the checks), the dose scale names it
    monkeypatch.setenv("DEEPDOSIMETRICS_MAX_DOSE_GY", "100000")
    cache = ensure_cache(sites["folders"]["site_cGy"], cache_dir=tmp_path / "cache")
    stats["site_cGy"] = site_statistics(cache, "default")
    assert stats["site_cGy"].patients == len(sites["ids"]["site_A"])
    report = check_sites(stats)
    assert report.admitted == ["site_A", "site_B", "site_C"]
    reasons = "; ".join(report.refused["site_cGy"])
    assert "dose scale" in reasons and "cGy" in reasons and "median target dose" in reasons
    # the reference is the admissible sites' (the cGy site does not move it)
    assert report.reference["dose_target_median_gy"] < 100


def test_a_site_with_another_hu_offset_is_named_and_refused(sites):
    stats = {site: site_statistics(sites["caches"][site], "default") for site in ("site_A", "site_B", "site_C", "site_HU")}
    assert stats["site_HU"].hu_percentiles[50] - stats["site_A"].hu_percentiles[50] > 900
    report = check_sites(stats)
    assert report.admitted == ["site_A", "site_B", "site_C"]
    reasons = "; ".join(report.refused["site_HU"])
    assert "HU offset" in reasons and "+1" in reasons  # the shift, about +1000 HU, is stated


def test_spacing_channels_and_thresholds_are_compared(sites):
    stats = {site: site_statistics(sites["caches"][site], "default") for site in ("site_A", "site_B", "site_C")}
    coarse = dataclasses.replace(stats["site_B"], spacing_mm=tuple(3 * v for v in stats["site_B"].spacing_mm))
    other_channels = site_statistics(sites["caches"]["site_C"], "window:lung,mask:PTV,dose")
    resampled = dataclasses.replace(stats["site_A"], cache_spacing_mm=(2.0, 2.0, 2.0))
    report = check_sites({"A": resampled, "B": coarse, "C": other_channels, "D": stats["site_C"], "E": stats["site_A"]})
    assert report.admitted == ["D", "E"]
    assert "resamples" in report.refused["A"][0]
    assert any("voxel spacing along x" in r for r in report.refused["B"])
    assert any("trains the channels window:lung" in r for r in report.refused["C"])
    # a wider limit admits the coarse site; the defaults are one dataclass
    loose = AdmissionThresholds(spacing_ratio_max=4.0)
    assert "B" in check_sites({"B": coarse, "D": stats["site_C"], "E": stats["site_A"]}, loose).admitted
    assert AdmissionThresholds().to_dict()["hu_shift_max"] == AdmissionThresholds.hu_shift_max
