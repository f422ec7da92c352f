"""Harmonisation across sites: each site's input statistics, compared before training (issue 19 item 4).

A site computes :func:`site_statistics` from its cache: aggregate scalars only (medians over its patients
of HU percentiles inside the body, of the dose maximum and the target's median dose in Gy, of the voxel
spacing; the modality, the channels its patients provide, how many patients its cache refused and why, by
category). No voxel, tile or patient id is in them (:meth:`SiteStatistics.to_metrics` is what travels).

The server compares the sites with :func:`check_sites`: each site against the federation's median
(robust to one odd site) and against plausible absolute ranges, with the limits of
:class:`AdmissionThresholds`. A site whose doses look like cGy, whose CT has another HU offset, whose voxel
spacing or channels differ, or whose cache refused most patients is NAMED with the reason and refused (not
averaged in); the others are admitted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from DeepDosimetricsLib.runtime.errors import InputError

#: HU percentiles measured inside the body
HU_PERCENTILES = (5, 25, 50, 75, 95)
#: the body voxels read per patient at most (a regular stride beyond it)
MAX_VOXELS = 2_000_000
#: categories of the reasons a cache refuses a patient (keyword in its message -> category): only the
#: category and a count leave the site, never the message (it names files and patients)
REFUSAL_CATEGORIES = (
    ("cGy", "dose above the Gy limit (cGy?)"),
    ("un-rescaled", "CT not in HU (un-rescaled)"),
    ("not a CT", "image not a CT"),
    ("no dose", "no dose"),
    ("negative", "negative dose"),
)
OTHER_REFUSAL = "unreadable or failing the value checks"


@dataclass(frozen=True)
class AdmissionThresholds:
    """How far a site's statistics may lie from the federation's (its median over sites) and from
    plausible values before the site is refused. The defaults are the one definition."""

    hu_shift_max: float = 150.0  # HU: |site's body HU percentiles (25, 50, 75) - federation's|, median of the three
    hu_median_range: tuple[float, float] = (-500.0, 300.0)  # HU: plausible median HU inside a CT's body
    dose_ratio_max: float = 20.0  # site's median target dose / federation's (or its inverse): cGy is x100
    dose_target_max_gy: float = 150.0  # Gy: a median target dose above this looks like cGy
    spacing_ratio_max: float = 2.0  # site's median voxel spacing / federation's, per axis (or its inverse)
    min_channel_share: float = 0.5  # share of a site's patients that must provide each trained channel
    max_refused_share: float = 0.5  # share of a site's patients its cache may refuse
    min_patients: int = 1  # usable patients a site needs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SiteStatistics:
    """What a site reports about its inputs: aggregate scalars, no voxels, tiles or patient ids."""

    patients: int  # usable (cached) patients
    refused: int = 0  # patients its cache refused
    refused_reasons: dict[str, int] = field(default_factory=dict)  # category -> count
    modality: str = "CT"
    channels: list[str] = field(default_factory=list)  # the channels it trains (labels)
    channel_share: dict[str, float] = field(default_factory=dict)  # label -> share of patients providing it
    hu_percentiles: dict[int, float] = field(default_factory=dict)  # percentile -> median over patients (HU)
    dose_max_gy: float = float("nan")  # median over patients of the dose maximum
    dose_target_median_gy: float = float("nan")  # median over patients of the median dose inside the target
    prescription_gy: float = float("nan")  # median of the known prescriptions
    spacing_mm: tuple[float, float, float] = (float("nan"),) * 3  # median voxel spacing (x, y, z) of the CTs
    cache_spacing_mm: Optional[tuple[float, float, float]] = None  # the cache's resampling (None: native)

    def to_metrics(self) -> dict[str, Union[int, float, str]]:
        """A flat dictionary of scalars (what a transport sends: Flower's MetricRecord/ConfigRecord)."""
        out: dict[str, Union[int, float, str]] = {
            "patients": int(self.patients), "refused": int(self.refused), "modality": self.modality,
            "channels": ",".join(self.channels), "dose_max_gy": float(self.dose_max_gy),
            "dose_target_median_gy": float(self.dose_target_median_gy), "prescription_gy": float(self.prescription_gy),
            "cache_spacing_mm": "native" if self.cache_spacing_mm is None else ",".join(map(str, self.cache_spacing_mm)),
        }
        out.update({f"refused_reason:{k}": int(v) for k, v in self.refused_reasons.items()})
        out.update({f"channel_share:{k}": float(v) for k, v in self.channel_share.items()})
        out.update({f"hu_p{k:02d}": float(v) for k, v in self.hu_percentiles.items()})
        out.update({f"spacing_{axis}_mm": float(v) for axis, v in zip("xyz", self.spacing_mm)})
        return out

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> SiteStatistics:
        """The inverse of :meth:`to_metrics`."""
        try:
            cache = str(metrics.get("cache_spacing_mm", "native"))
            return cls(
                patients=int(metrics["patients"]), refused=int(metrics.get("refused", 0)),
                refused_reasons={k.split(":", 1)[1]: int(v) for k, v in metrics.items() if k.startswith("refused_reason:")},
                modality=str(metrics.get("modality", "CT")),
                channels=[c for c in str(metrics.get("channels", "")).split(",") if c],
                channel_share={k.split(":", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("channel_share:")},
                hu_percentiles={int(k[4:]): float(v) for k, v in metrics.items() if k.startswith("hu_p")},
                dose_max_gy=float(metrics.get("dose_max_gy", "nan")),
                dose_target_median_gy=float(metrics.get("dose_target_median_gy", "nan")),
                prescription_gy=float(metrics.get("prescription_gy", "nan")),
                spacing_mm=tuple(float(metrics.get(f"spacing_{a}_mm", "nan")) for a in "xyz"),
                cache_spacing_mm=None if cache == "native" else tuple(float(v) for v in cache.split(",")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"site statistics are incomplete or malformed ({error})") from error


def refusal_category(reason: str) -> str:
    """The category of a cache's refusal message (the message itself stays at the site)."""
    for keyword, category in REFUSAL_CATEGORIES:
        if keyword.lower() in str(reason).lower():
            return category
    return OTHER_REFUSAL


def _median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(values)) if values else float("nan")


def _sample(array: np.ndarray) -> np.ndarray:
    """The array itself, or every k-th voxel along each axis when it holds more than MAX_VOXELS."""
    stride = max(1, math.ceil((array.size / MAX_VOXELS) ** (1 / 3)))
    return array[::stride, ::stride, ::stride] if stride > 1 else array


def site_statistics(cache: Any, channels: Union[str, Sequence[str]] = "default",
                    patients: Optional[Sequence[str]] = None) -> SiteStatistics:
    """A site's input statistics from its cache (``ensure_cache``'s result, or a list of cached patients
    with a ``failed`` mapping): only aggregate scalars.

    Args:
        cache: the site's cache.
        channels: the channels the federation trains (a set name or labels).
        patients: limit to these patients (default: all of the cache).
    """
    from DeepDosimetricsLib.deep.cache.store import TARGET_NAME
    from DeepDosimetricsLib.deep.channels import channel_labels, parse_channels

    specs = parse_channels(channels if isinstance(channels, str) else ",".join(channels))
    labels = channel_labels(specs)
    wanted = None if patients is None else {str(p) for p in patients}
    chosen = [p for p in cache if wanted is None or p.id in wanted]
    failed = {k: v for k, v in (getattr(cache, "failed", None) or {}).items() if wanted is None or str(k) in wanted}
    reasons: dict[str, int] = {}
    for reason in failed.values():
        category = refusal_category(reason)
        reasons[category] = reasons.get(category, 0) + 1
    provides = {label: 0 for label in labels}
    hu_rows, dose_max, dose_target, prescriptions, spacings = [], [], [], [], []
    for patient in chosen:
        for spec, label in zip(specs, labels):
            try:
                patient.check_channels([spec])
                provides[label] += 1
            except InputError:
                pass
        body = _sample(np.asarray(patient.body)) > 0
        hu = _sample(np.asarray(patient.hu))[body]
        if hu.size:
            hu_rows.append(np.percentile(hu, HU_PERCENTILES))
        if patient.has_dose:
            dose = _sample(np.asarray(patient.dose)).astype(np.float32)
            dose_max.append(float(dose.max()) if dose.size else float("nan"))
            if patient.has_structure(TARGET_NAME):
                inside = _sample(np.asarray(patient.mask(TARGET_NAME))) > 0
                if inside.any():
                    dose_target.append(float(np.median(dose[inside])))
        if patient.prescription_gy is not None:
            prescriptions.append(patient.prescription_gy)
        spacings.append(tuple(patient.original_geometry.spacing))
        if hasattr(patient, "release"):
            patient.release()
    count = len(chosen)
    config = getattr(cache, "config", None)
    return SiteStatistics(
        patients=count, refused=len(failed), refused_reasons=reasons, modality="CT",
        channels=labels, channel_share={k: (v / count if count else 0.0) for k, v in provides.items()},
        hu_percentiles={p: float(v) for p, v in zip(HU_PERCENTILES, np.median(hu_rows, axis=0))} if hu_rows else {},
        dose_max_gy=_median(dose_max), dose_target_median_gy=_median(dose_target),
        prescription_gy=_median(prescriptions),
        spacing_mm=tuple(float(v) for v in np.median(spacings, axis=0)) if spacings else (float("nan"),) * 3,
        cache_spacing_mm=None if config is None or config.spacing is None else tuple(config.spacing),
    )


def cohort_statistics(cohort_dir, cache_dir=None, channels: Union[str, Sequence[str]] = "default") -> SiteStatistics:
    """``site_statistics`` of a cohort folder (its cache built when missing)."""
    from DeepDosimetricsLib.deep.cache.build import ensure_cache

    return site_statistics(ensure_cache(cohort_dir, cache_dir=cache_dir), channels)


@dataclass
class AdmissionReport:
    """The server's verdict: the admitted sites, and each refused site with its reasons."""

    admitted: list[str]
    refused: dict[str, list[str]]
    reference: dict[str, float]  # the federation's medians the sites were compared with
    thresholds: AdmissionThresholds

    def format(self) -> str:
        """One line per site: admitted, or refused with its reasons."""
        lines = [f"{site}: admitted" for site in self.admitted]
        lines += [f"{site}: refused: {'; '.join(reasons)}" for site, reasons in self.refused.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"admitted": list(self.admitted), "refused": dict(self.refused), "reference": dict(self.reference),
                "thresholds": self.thresholds.to_dict()}

    def require(self, min_sites: int = 1) -> None:
        """InputError naming the refused sites when fewer than ``min_sites`` are admitted."""
        if len(self.admitted) < min_sites:
            refused = "; ".join(f"{site} ({', '.join(reasons)})" for site, reasons in self.refused.items())
            raise InputError(f"only {len(self.admitted)} site(s) admitted, {min_sites} needed; refused: {refused}")


def _ratio(value: float, reference: float) -> float:
    """value / reference, or NaN when either is not a positive number."""
    if not (math.isfinite(value) and math.isfinite(reference)) or value <= 0 or reference <= 0:
        return float("nan")
    return value / reference


def _outside(ratio: float, limit: float) -> bool:
    return math.isfinite(ratio) and (ratio > limit or ratio < 1.0 / limit)


def check_sites(statistics: Mapping[str, SiteStatistics],
                thresholds: Optional[AdmissionThresholds] = None) -> AdmissionReport:
    """Compare the sites' statistics; a site that differs beyond ``thresholds`` is refused with its reasons.

    Each site is compared with the federation's median over the sites whose own values are plausible (so
    one odd site does not move it), and with the absolute limits.
    """
    limits = thresholds or AdmissionThresholds()
    reasons: dict[str, list[str]] = {site: [] for site in statistics}
    for site, s in statistics.items():
        if s.patients < limits.min_patients:
            reasons[site].append(f"{s.patients} usable patient(s), {limits.min_patients} needed")
        total = s.patients + s.refused
        if s.refused and total and s.refused / total > limits.max_refused_share:
            why = ", ".join(f"{n} {category}" for category, n in sorted(s.refused_reasons.items()))
            reasons[site].append(f"its cache refused {s.refused} of {total} patients ({why})")
        if s.modality.upper() != "CT":
            reasons[site].append(f"modality {s.modality}, not CT")
        median_hu = s.hu_percentiles.get(50, float("nan"))
        low, high = limits.hu_median_range
        if math.isfinite(median_hu) and not low <= median_hu <= high:
            reasons[site].append(f"median HU inside the body {median_hu:.0f} lies outside [{low:.0f}, {high:.0f}] "
                                 "(another HU offset, or values not in HU?)")
        if math.isfinite(s.dose_target_median_gy) and s.dose_target_median_gy > limits.dose_target_max_gy:
            reasons[site].append(f"median target dose {s.dose_target_median_gy:.4g} Gy is above "
                                 f"{limits.dose_target_max_gy:g} Gy (doses in cGy?)")
        for label, share in s.channel_share.items() if s.patients else ():
            if share < limits.min_channel_share:
                reasons[site].append(f"only {share:.0%} of its patients provide the channel {label}")
    plausible = [site for site, found in reasons.items() if not found]
    basis = plausible or list(statistics)
    channel_sets = {site: tuple(statistics[site].channels) for site in statistics}
    common = max(set(channel_sets[s] for s in basis), key=lambda c: sum(channel_sets[s] == c for s in basis))
    caches = [statistics[s].cache_spacing_mm for s in basis]
    cache_spacing = max(set(caches), key=caches.count, default=None)
    reference = {f"hu_p{p:02d}": _median(statistics[s].hu_percentiles.get(p, float("nan")) for s in basis)
                 for p in HU_PERCENTILES}
    reference["dose_target_median_gy"] = _median(statistics[s].dose_target_median_gy for s in basis)
    reference["dose_max_gy"] = _median(statistics[s].dose_max_gy for s in basis)
    for index, axis in enumerate("xyz"):
        reference[f"spacing_{axis}_mm"] = _median(statistics[s].spacing_mm[index] for s in basis)
    for site, s in statistics.items():
        if tuple(s.channels) != common:
            reasons[site].append(f"trains the channels {','.join(s.channels)}, the federation {','.join(common)}")
        if s.cache_spacing_mm != cache_spacing:
            reasons[site].append(f"its cache resamples to {s.cache_spacing_mm or 'native'} mm, the federation's to "
                                 f"{cache_spacing or 'native'} mm")
        shifts = [s.hu_percentiles.get(p, float("nan")) - reference[f"hu_p{p:02d}"] for p in (25, 50, 75)]
        shift = _median(shifts)
        if math.isfinite(shift) and abs(shift) > limits.hu_shift_max:
            reasons[site].append(f"its body HU lie {shift:+.0f} HU from the federation's (more than "
                                 f"{limits.hu_shift_max:g}): another HU offset?")
        ratio = _ratio(s.dose_target_median_gy, reference["dose_target_median_gy"])
        if not math.isfinite(ratio):
            ratio = _ratio(s.dose_max_gy, reference["dose_max_gy"])
        if _outside(ratio, limits.dose_ratio_max):
            hint = " (doses in cGy?)" if ratio > 1 else " (doses in Gy where the others use cGy, or per fraction?)"
            reasons[site].append(f"its dose scale is {ratio:.3g} x the federation's{hint}")
        for index, axis in enumerate("xyz"):
            ratio = _ratio(s.spacing_mm[index], reference[f"spacing_{axis}_mm"])
            if _outside(ratio, limits.spacing_ratio_max):
                reasons[site].append(f"its voxel spacing along {axis} is {s.spacing_mm[index]:.3g} mm, "
                                     f"{ratio:.2g} x the federation's {reference[f'spacing_{axis}_mm']:.3g} mm")
    refused = {site: found for site, found in reasons.items() if found}
    return AdmissionReport(admitted=[site for site in statistics if site not in refused], refused=refused,
                           reference=reference, thresholds=limits)


__all__ = ["AdmissionThresholds", "SiteStatistics", "AdmissionReport", "site_statistics", "cohort_statistics",
           "check_sites", "refusal_category", "HU_PERCENTILES"]
