"""Training speed: voxels per second of autoencoder training steps, by device and memory layout.

Same model (the default TileAutoencoder), same tiles, in one process: on the CPU in float32 with the
default (contiguous) layout and with ``channels_last_3d``; on CUDA (when present) in float32 and with
bf16 autocast. Also the tile sampler alone (reading tiles from a phantom cache), so the share of the
step spent on data is visible. Medians of several steps after warm-up.

    .venv/bin/python bench/train_speed.py [--channels full] [--tile 64] [--batch 2] [--steps 5] [--threads N]
        [--recipe] [--widths 16 32 32] [--cuda-only] [--compile]

``--recipe`` times the default training recipe (Resources/train-default.yaml: residual blocks and the
fidelity loss terms) instead of the plain model and MSE; ``--compile`` adds torch.compile rows on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "DeepDosimetrics"))


def time_steps(model, batch, steps: int, warmup: int, device, layout, bf16: bool, terms=None,
               compile: bool = False) -> list[float]:
    import torch
    from DeepDosimetricsLib.deep.model import reconstruction_loss

    model = model.to(device=device, memory_format=layout)
    x = batch.to(device).contiguous(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compile else model
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits, _ = forward(x)
        loss, _ = reconstruction_loss(logits, x, terms=terms)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", default="full")
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-sampler", action="store_true", help="skip the tile-reading measurement")
    parser.add_argument("--recipe", action="store_true", help="the default recipe's model and loss terms")
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    parser.add_argument("--cuda-only", action="store_true", help="skip the CPU rows")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (CUDA)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from DeepDosimetricsLib.deep.channels import channel_labels, parse_channels
    from DeepDosimetricsLib.deep.model import ModelConfig, TileAutoencoder

    if args.threads:
        torch.set_num_threads(args.threads)
    specs = parse_channels(args.channels)
    labels = channel_labels(specs)
    extra = {"widths": args.widths} if args.widths else {}
    terms = None
    if args.recipe:
        from DeepDosimetricsLib.deep.model import LossTerms
        from DeepDosimetricsLib.deep.train.training import make_config

        recipe = make_config()
        extra.update(residual=recipe.residual, decoder_convs=recipe.decoder_convs)
        masks = [i for i, label in enumerate(labels) if label.startswith("mask:")]
        terms = LossTerms(dose_channels=[i for i, label in enumerate(labels) if label.startswith("dose")],
                          mask_channels=masks, target_channel=labels.index("mask:PTV") if "mask:PTV" in labels else None,
                          dice=recipe.mask_dice_weight, dose_in_target=recipe.dose_target_weight,
                          gradient=recipe.dose_gradient_weight)
    config = ModelConfig(channels=labels, tile=args.tile, **extra)
    voxels = args.batch * args.tile**3
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.random((args.batch, len(specs)) + (args.tile,) * 3, dtype=np.float32))
    for index in config.mask_channels:
        batch[:, index] = (batch[:, index] > 0.7).float()
    print(f"model: {config.channels}, tile {args.tile}^3, batch {args.batch}, widths {config.widths}, "
          f"K={config.features}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    runs = [] if args.cuda_only else [("cpu", "float32, contiguous", torch.contiguous_format, False, False),
                                      ("cpu", "float32, channels_last_3d", torch.channels_last_3d, False, False)]
    if torch.cuda.is_available():
        runs += [("cuda", "float32", torch.contiguous_format, False, False),
                 ("cuda", "bf16 autocast", torch.contiguous_format, True, False)]
        if args.compile:
            runs += [("cuda", "bf16 autocast + compile", torch.contiguous_format, True, True)]
        torch.backends.cudnn.benchmark = True
    else:
        print("CUDA: not available on this machine (GPU rows skipped)")
    results = {}
    for device_name, label, layout, bf16, compiled in runs:
        torch.manual_seed(0)
        model = TileAutoencoder(config)
        warmup = args.warmup + (3 if compiled else 0)
        times = time_steps(model, batch, args.steps, warmup, torch.device(device_name), layout, bf16, terms, compiled)
        median = statistics.median(times)
        results[(device_name, label)] = voxels / median
        print(f"{device_name:>4} {label:<28} step {median:7.3f} s (min {min(times):.3f})  "
              f"{voxels / median / 1e6:7.3f} M voxels/s", flush=True)
    cpu = [v for (d, _), v in results.items() if d == "cpu"]
    if len(cpu) == 2:
        print(f"channels_last_3d speed-up on CPU: {cpu[1] / cpu[0]:.2f}x")
    if torch.cuda.is_available():
        print(f"cuda peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    if not args.no_sampler:
        from DeepDosimetricsLib.data.phantoms import synthesize_cohort
        from DeepDosimetricsLib.deep.cache.build import ensure_cache
        from DeepDosimetricsLib.deep.cache.store import CacheConfig
        from DeepDosimetricsLib.deep.train.sampling import SamplingConfig, TileSampler

        with tempfile.TemporaryDirectory() as tmp:
            cohort = synthesize_cohort(Path(tmp) / "cohort", patients=2, shape=(160, 160, 96), seed=0)
            cache = ensure_cache(cohort, CacheConfig(), cache_dir=Path(tmp) / "cache")
            sampler = TileSampler(list(cache), specs, SamplingConfig(tile=args.tile, batch=args.batch), seed=0)
            sampler.batch(0)
            times = []
            for step in range(1, 1 + max(5, args.steps)):
                start = time.perf_counter()
                sampler.batch(step)
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            print(f"tile sampler (phantom cache, {args.channels}): {median * 1000:.1f} ms per batch, "
                  f"{voxels / median / 1e6:.1f} M voxels/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
