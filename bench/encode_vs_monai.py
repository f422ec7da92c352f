"""Tiled reconstruction: DeepDosimetrics versus MONAI's ``sliding_window_inference`` on a full-size phantom.

Both run the same (untrained) TileAutoencoder, tile size and overlap, with Gaussian blending
(sigma_scale 0.125), each in its own process, on the same volume: a phantom patient's cache built
WITHOUT the body crop, so both see the whole ``X x Y x Z`` grid (7 channels: 5 CT windows, PTV, dose).

- MONAI: the whole 7-channel float32 input tensor is built from the cache, then
  ``sliding_window_inference(..., mode="gaussian")`` with the predictor ``decode(encode(x))`` (model and
  input channels_last_3d, inference mode: the same as ours). ``sw_batch_size`` is tuned first on a
  slab of the volume (one row of tiles in z) among ``--sw-batch-sizes``; the fastest is used.
- DeepDosimetrics: ``encoding.encode_patient`` (tiles read from the memory-mapped cache, body-free tiles
  skipped, features kept) streaming the blended planes to one ``.npy`` per channel.

Timed: from the opened cache and loaded model to the finished output (imports and model loading are
outside). Peak RSS: ``ru_maxrss`` of each process at the end of its timed part. Agreement: max
absolute difference of the two outputs over the body voxels, on the [0, 1] scale.
With ``--pipeline``, a third process runs the whole ``encode --reconstruct`` job on the patient
(NRRD volumes + residuals + metrics on the original grid, the job's default batch unless ``--batch``) and
reports its peak RSS. With ``--previous DIR`` (a checkout of an older version) its encoder runs in the same
rounds (and its job after ours), side by side.

The last line is ``time_ratio=<ours/monai> max_abs_diff=<d> rss_ours_mb=<a> rss_monai_mb=<b> body_fraction=<f>``.

    .venv/bin/python bench/encode_vs_monai.py                    # 512 512 350 (long on 2 cores)
    .venv/bin/python bench/encode_vs_monai.py --shape 192 192 128  # a quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHANNELS = "full"  # 5 windows + PTV + dose
from benchlib import peak_rss_mb  # noqa: E402


def _load(workdir: Path, threads: int):
    import torch
    from DeepDosimetricsLib.deep.cache.store import open_cache
    from DeepDosimetricsLib.deep.channels import parse_channels
    from DeepDosimetricsLib.deep.model import load_model

    torch.set_num_threads(threads)
    info = json.loads((workdir / "info.json").read_text())
    cache = open_cache(workdir / "cache")
    cp = cache[info["patient"]]
    model, config = load_model(workdir / "model", device="cpu")
    return info, cp, model, config, parse_channels(config.channels)


# ------------------------------------------------------------------------------------------ workers
def prepare(args) -> dict:
    """Phantom patient, its uncropped cache, the untrained model; body fraction."""
    import numpy as np
    import torch
    from DeepDosimetricsLib.data.phantoms import synthesize_cohort
    from DeepDosimetricsLib.deep.cache.build import ensure_cache
    from DeepDosimetricsLib.deep.cache.store import CacheConfig
    from DeepDosimetricsLib.deep.channels import parse_channels
    from DeepDosimetricsLib.deep.model import ModelConfig, TileAutoencoder, save_model

    workdir = Path(args.workdir)
    cohort = synthesize_cohort(workdir / "cohort", patients=1, shape=tuple(args.shape), seed=0)
    cache = ensure_cache(cohort, CacheConfig(margin_mm=1e5), cache_dir=workdir / "cache")  # no crop
    cp = cache[cache.ids[0]]
    if cp.shape != tuple(reversed(args.shape)):
        raise SystemExit(f"cache grid {cp.shape} is not the whole phantom grid {tuple(reversed(args.shape))}")
    torch.manual_seed(0)
    labels = [spec.label for spec in parse_channels(CHANNELS)]
    config = ModelConfig(channels=labels, tile=args.tile, features=10, widths=args.widths, groups=4)
    save_model(workdir / "model", TileAutoencoder(config), config)
    body = cp.body
    inside = sum(int(np.count_nonzero(body[z : z + 16])) for z in range(0, body.shape[0], 16))
    info = {"patient": cp.id, "shape_zyx": list(cp.shape), "body_fraction": inside / float(np.prod(cp.shape))}
    (workdir / "info.json").write_text(json.dumps(info))
    return info


def run_ours(args) -> dict:
    """The project's path: encode_patient streaming the stitched channels to .npy files."""
    from DeepDosimetricsLib.deep.encode.encoder import TileModel, encode_patient
    from DeepDosimetricsLib.deep.encode.reconstruction import air_values
    from DeepDosimetricsLib.deep.tiling import NpyChannelSink

    workdir = Path(args.workdir)
    info, cp, model, config, specs = _load(workdir, args.threads)
    runner = TileModel(model, "cpu")
    start = time.perf_counter()
    sink = NpyChannelSink([workdir / "ours" / f"channel{c}.npy" for c in range(len(specs))], cp.shape)
    encoded = encode_patient(runner, cp, specs, args.overlap, args.batch, sink, air_values(cp, specs), quiet=True)
    sink.close()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_mb": peak_rss_mb(), "tiles": len(encoded.positions), "grid": len(encoded.grid)}


def run_monai(args) -> dict:
    """MONAI's sliding window over the whole input tensor; optionally compare with ours inside the body."""
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    workdir = Path(args.workdir)
    info, cp, model, config, specs = _load(workdir, args.threads)
    z0, z1 = (0, cp.shape[0]) if args.zrange is None else args.zrange
    tile = config.tile

    def predictor(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        return model.decode(model.encode(x))

    start = time.perf_counter()
    depth, height, width = z1 - z0, cp.shape[1], cp.shape[2]
    inputs = np.empty((1, len(specs), depth, height, width), np.float32)
    step = 16
    for z in range(0, depth, step):  # the channels of the whole volume, as a MONAI user holds them
        n = min(step, depth - z)
        cp.read_tile(specs, (z0 + z, 0, 0), (n, height, width), out=inputs[0, :, z : z + n])
    with torch.inference_mode():
        output = sliding_window_inference(
            torch.from_numpy(inputs), (tile, tile, tile), args.sw_batch, predictor, overlap=args.overlap,
            mode="gaussian", sigma_scale=0.125, device="cpu", sw_device="cpu",
        )
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "rss_mb": peak_rss_mb(), "sw_batch": args.sw_batch}
    if args.compare:
        del inputs
        values = output[0].numpy()
        body = cp.body
        worst = 0.0
        for channel in range(len(specs)):
            ours = np.load(workdir / "ours" / f"channel{channel}.npy", mmap_mode="r")
            for z in range(0, depth, step):
                inside = np.asarray(body[z : z + step]) != 0
                if inside.any():
                    difference = np.abs(np.asarray(ours[z : z + step])[inside] - values[channel, z : z + step][inside])
                    worst = max(worst, float(difference.max()))
        result["max_abs_diff"] = worst
    return result


def run_pipeline(args) -> dict:
    """The whole `encode --reconstruct` job on the patient (NRRDs, residuals, metrics)."""
    from DeepDosimetricsLib.deep.encode.job import EncodeSettings, encode_cohort

    workdir = Path(args.workdir)
    import torch

    torch.set_num_threads(args.threads)
    settings = EncodeSettings(overlap=args.overlap, batch=args.batch, device="cpu", reconstruct=True,
                              quiet=True, progress_json=False)
    start = time.perf_counter()
    encode_cohort(workdir / "model", workdir / "cohort", workdir / "pipeline", workdir / "cache", settings,
                  overwrite=True)
    return {"seconds": time.perf_counter() - start, "rss_mb": peak_rss_mb()}


WORKERS = {"prepare": prepare, "ours": run_ours, "monai": run_monai, "pipeline": run_pipeline}


# ------------------------------------------------------------------------------------------ driver
def child(mode: str, args, *extra: str, library: Path | None = None) -> dict:
    """Run one worker in a fresh process; its result is the JSON on its last stdout line.

    ``library``: the DeepDosimetrics folder to import instead (a checkout of the previous version)."""
    import os

    env = dict(os.environ)
    if library is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(library), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    command = [sys.executable, __file__, "--worker", mode, "--workdir", str(args.workdir),
               "--shape", *map(str, args.shape), "--tile", str(args.tile), "--overlap", str(args.overlap),
               "--batch", str(args.batch), "--threads", str(args.threads),
               "--widths", ",".join(map(str, args.widths)), *extra]
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-2000:] + completed.stderr[-4000:])
        raise SystemExit(f"worker {mode} failed with exit code {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=3, type=int, default=[512, 512, 350], metavar=("X", "Y", "Z"))
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--widths", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 32, 32],
                        help="encoder widths of the untrained network (default 8,16,32,32)")
    parser.add_argument("--batch", type=int, default=0,
                        help="tiles per model call for DeepDosimetrics (default 0: MONAI's tuned sw_batch_size)")
    parser.add_argument("--sw-batch-sizes", default="2,4,8,16", help="MONAI sw_batch_size candidates")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each (the ratio of medians)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each process")
    parser.add_argument("--workdir", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--pipeline", action="store_true", help="also measure the whole encode --reconstruct job")
    parser.add_argument("--previous", type=Path, default=None,
                        help="a checkout of the previous version (its repository root): its encoder (and with "
                             "--pipeline its job) runs in the same rounds, side by side")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--sw-batch", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--zrange", type=lambda s: tuple(int(v) for v in s.split(":")), default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0

    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dd-bench-monai-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {args.workdir}", flush=True)
    if (args.workdir / "info.json").is_file() and (args.workdir / "model").is_dir():
        info = json.loads((args.workdir / "info.json").read_text())
    else:
        info = child("prepare", args)
    print(f"phantom {args.shape} -> cache grid (z,y,x) {info['shape_zyx']}, body fraction {info['body_fraction']:.3f}",
          flush=True)

    slab = f"0:{min(args.tile, info['shape_zyx'][0])}"  # one row of tiles
    timings = {}
    for size in [int(v) for v in args.sw_batch_sizes.split(",")]:
        timings[size] = child("monai", args, "--sw-batch", str(size), "--zrange", slab)["seconds"]
        print(f"MONAI tuning on z {slab}: sw_batch_size {size}: {timings[size]:.1f} s", flush=True)
    best = min(timings, key=timings.get)
    batch_given = args.batch if args.batch > 0 else 0
    if args.batch <= 0:
        args.batch = best  # the same batch for both

    previous_library = args.previous / "DeepDosimetrics" if args.previous else None
    runs_ours, runs_monai, runs_previous = [], [], []
    for repeat in range(args.repeats):  # interleaved, so both see the same machine load on average
        last = repeat == args.repeats - 1
        ours = child("ours", args)
        runs_ours.append(ours["seconds"])
        print(f"DeepDosimetrics run {repeat + 1}: {ours['seconds']:.1f} s, peak RSS {ours['rss_mb']:.0f} MB, "
              f"{ours['tiles']} of {ours['grid']} tiles (batch {args.batch})", flush=True)
        if previous_library is not None:
            previous = child("ours", args, library=previous_library)
            runs_previous.append(previous["seconds"])
            print(f"previous version ({args.previous}) run {repeat + 1}: {previous['seconds']:.1f} s, peak RSS "
                  f"{previous['rss_mb']:.0f} MB", flush=True)
        monai = child("monai", args, "--sw-batch", str(best), *(["--compare"] if last else []))
        runs_monai.append(monai["seconds"])
        print(f"MONAI sliding_window_inference run {repeat + 1}: {monai['seconds']:.1f} s, peak RSS "
              f"{monai['rss_mb']:.0f} MB, {ours['grid']} tiles (sw_batch_size {best})", flush=True)
    ratio = statistics.median(runs_ours) / statistics.median(runs_monai)
    print(f"medians: DeepDosimetrics {statistics.median(runs_ours):.1f} s, MONAI {statistics.median(runs_monai):.1f} s",
          flush=True)
    extra = ""
    if runs_previous:
        previous_ratio = statistics.median(runs_previous) / statistics.median(runs_monai)
        print(f"previous version: median {statistics.median(runs_previous):.1f} s, time_ratio {previous_ratio:.3f}",
              flush=True)
        extra += f" previous_time_ratio={previous_ratio:.3f}"
    if args.pipeline:  # the job as a user runs it: the default batch (the tuned one only when --batch is given)
        from DeepDosimetricsLib.deep.encode.settings import DEFAULT_BATCH

        args.batch = batch_given or DEFAULT_BATCH
        pipeline = child("pipeline", args)
        print(f"whole encode --reconstruct job (NRRDs, residuals, metrics): {pipeline['seconds']:.1f} s, "
              f"peak RSS {pipeline['rss_mb']:.0f} MB", flush=True)
        extra += f" pipeline_rss_mb={pipeline['rss_mb']:.0f}"
        if previous_library is not None:
            before = child("pipeline", args, library=previous_library)
            print(f"previous version's job: {before['seconds']:.1f} s, peak RSS {before['rss_mb']:.0f} MB", flush=True)
            extra += f" previous_pipeline_rss_mb={before['rss_mb']:.0f}"
    print(f"time_ratio={ratio:.3f} max_abs_diff={monai['max_abs_diff']:.3g} "
          f"rss_ours_mb={ours['rss_mb']:.0f} rss_monai_mb={monai['rss_mb']:.0f} "
          f"body_fraction={info['body_fraction']:.3f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
