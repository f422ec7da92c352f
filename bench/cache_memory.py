"""Peak memory (RSS) of building the preprocessing cache for one phantom patient.

Issue 4's bar: building the cache of one 512x512x350 patient peaks at no more than 1.5 GB RSS.
The phantom is generated first (in its own process), then the cache is built in a fresh process whose
peak RSS (``ru_maxrss``) is reported, beside the RSS of a process that only imports the library.

    .venv/bin/python bench/cache_memory.py                        # 512x512x350, keep spacing
    .venv/bin/python bench/cache_memory.py --shape 128 128 128 --spacing 1.5 1.5 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DeepDosimetrics"))
from benchlib import peak_rss_mb, run_script  # noqa: E402

BAR_MB = 1536.0


def folder_mb(folder: Path) -> float:
    """Size on disk of the files under a folder, MiB."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


def run_child(*arguments: str) -> dict:
    """Run this script's child entry in a fresh Python process (see benchlib.run_script)."""
    return run_script(__file__, *arguments)


def make_phantom_cohort(work: Path, shape) -> Path:
    """A one-patient phantom cohort of the given (x, y, z) shape under ``work`` (generated once)."""
    cohort = work / f"cohort-{'x'.join(map(str, shape))}"
    if not (cohort / ".done").exists():
        shutil.rmtree(cohort, ignore_errors=True)
        info = run_child("--child-synth", str(cohort), *map(str, shape))
        (cohort / ".done").write_text(json.dumps(info))
    return cohort


def simple_phantom(cohort: Path, shape) -> None:
    """A plain CT-like patient (used only when the library's phantom module is absent): an elliptic body
    with lungs and a spine in air, a PTV sphere, a heart, and a Gaussian dose; no BODY structure."""
    import numpy as np
    import SimpleITK as sitk

    nx, ny, nz = shape
    spacing = (500.0 / nx, 500.0 / ny, 2.5 * 128 / nz if nz < 128 else 2.5)
    y, x = np.meshgrid(np.arange(ny, dtype=np.float32) / ny, np.arange(nx, dtype=np.float32) / nx, indexing="ij")
    body = ((x - 0.5) / 0.38) ** 2 + ((y - 0.5) / 0.27) ** 2 <= 1
    lungs = (((np.abs(x - 0.5) - 0.16) / 0.11) ** 2 + ((y - 0.47) / 0.16) ** 2) <= 1
    spine = ((x - 0.5) / 0.04) ** 2 + ((y - 0.7) / 0.04) ** 2 <= 1
    plane = np.where(body, 40, -1000).astype(np.int16)
    plane[lungs & body] = -800
    plane[spine] = 700
    z = np.arange(nz)[:, None, None]
    inside_z = (z >= nz // 10) & (z < nz - nz // 10)
    ct = np.where(inside_z, plane[None], np.int16(-1000)).astype(np.int16)
    centre = np.array([nz / 2, ny * 0.45, nx * 0.45])
    radius = nx * 0.08
    zz, yy, xx = (np.arange(n, dtype=np.float32) - c for n, c in zip(ct.shape, centre))
    r2 = (zz[:, None, None] * spacing[2]) ** 2 + (yy[None, :, None] * spacing[1]) ** 2 + (xx[None, None] * spacing[0]) ** 2
    ptv = (r2 <= (radius * spacing[0]) ** 2).astype(np.uint8)
    dose = (70.0 * np.exp(-r2 / (2 * (2 * radius * spacing[0]) ** 2))).astype(np.float32)
    del r2
    heart = np.zeros(ct.shape, np.uint8)
    heart[nz // 3: nz // 2, int(ny * 0.45): int(ny * 0.6), int(nx * 0.5): int(nx * 0.62)] = 1

    def write(array, path):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        sitk.WriteImage(image, str(path))

    folder = cohort / "phantom_000"
    (folder / "structures").mkdir(parents=True)
    write(ct, folder / "ct.nrrd")
    write(dose, folder / "dose.nrrd")
    write(ptv, folder / "structures" / "PTV.nrrd")
    write(heart, folder / "structures" / "Heart.nrrd")


def child_synth(cohort: Path, shape) -> dict:
    """Generate the phantom cohort (the library's phantom module, else ``simple_phantom``)."""
    started = time.perf_counter()
    try:
        from DeepDosimetricsLib.data.phantoms import synthesize_cohort
    except ImportError:
        simple_phantom(cohort, shape)
        generator = "bench simple_phantom"
    else:
        synthesize_cohort(cohort, patients=1, shape=tuple(shape), seed=0, quiet=True)
        generator = "DeepDosimetricsLib.data.phantoms"
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(), "generator": generator}


def child_build(cohort: Path, cache: Path, spacing) -> dict:
    """Build the cache of the cohort in this process and report its peak RSS."""
    from DeepDosimetricsLib.deep.cache.build import ensure_cache
    from DeepDosimetricsLib.deep.cache.store import CacheConfig

    baseline = peak_rss_mb()
    started = time.perf_counter()
    built = ensure_cache(cohort, CacheConfig(spacing=tuple(spacing) if spacing else None), cache_dir=cache)
    seconds = time.perf_counter() - started
    patient = built[built.ids[0]]
    return {
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": baseline,
        "cache_mb": folder_mb(cache),
        "cropped_shape_zyx": list(patient.shape),
        "original_size_xyz": patient.manifest["original_geometry"]["size"],
        "structures": patient.structure_names,
    }


def child_imports() -> dict:
    """RSS of a process that imports what a build imports, and builds nothing."""
    import DeepDosimetricsLib.data.cohort  # noqa: F401
    import DeepDosimetricsLib.deep.cache.build  # noqa: F401
    import DeepDosimetricsLib.deep.cache.store  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import SimpleITK  # noqa: F401

    return {"peak_rss_mb": peak_rss_mb()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=3, type=int, default=[512, 512, 350], metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", nargs=3, type=float, default=None, metavar=("SX", "SY", "SZ"),
                        help="resample while building (default: keep the phantom's spacing)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (kept; default: a temporary one)")
    parser.add_argument("--child-synth", nargs=4, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-build", nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-imports", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    if args.child_synth:
        print(json.dumps(child_synth(Path(args.child_synth[0]), [int(v) for v in args.child_synth[1:]])))
        return 0
    if args.child_build:
        spacing = [float(v) for v in args.child_build[2:]] or None
        print(json.dumps(child_build(Path(args.child_build[0]), Path(args.child_build[1]), spacing)))
        return 0
    if args.child_imports:
        print(json.dumps(child_imports()))
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="dd-bench-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cohort = make_phantom_cohort(work, args.shape)
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        imports = run_child("--child-imports")
        build = run_child("--child-build", str(cohort), str(cache), *map(str, args.spacing or []))
        ct_mb = args.shape[0] * args.shape[1] * args.shape[2] * 2 / 2**20
        generator = json.loads((cohort / ".done").read_text())["generator"]
        print(f"cache build of one {'x'.join(map(str, args.shape))} phantom ({generator}) "
              f"(spacing: {'keep' if not args.spacing else args.spacing})")
        print(f"  CT alone as int16:            {ct_mb:8.0f} MiB; 7 float32 channels: {ct_mb * 14:8.0f} MiB")
        print(f"  RSS of the imports only:      {imports['peak_rss_mb']:8.0f} MiB")
        print(f"  peak RSS of the build:        {build['peak_rss_mb']:8.0f} MiB "
              f"({'within' if build['peak_rss_mb'] <= BAR_MB else 'ABOVE'} the {BAR_MB:.0f} MiB bar)")
        print(f"  build time:                   {build['seconds']:8.1f} s")
        print(f"  cache on disk:                {build['cache_mb']:8.0f} MiB "
              f"(cropped z,y,x {build['cropped_shape_zyx']}, structures {build['structures']})")
        print(json.dumps({"shape": args.shape, "spacing": args.spacing, "imports": imports, "build": build}))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
