"""Federated vs central vs each site alone, at equal total steps (issue 19 item 5).

Two federations of 3 hospitals: the phantom sites (``synth --sites 3``: each patient's scanner site, with its
HU offset, noise and slice thickness) and OpenKBP split at random into 3 pseudo-hospitals. Each site holds
out some of its patients for testing. Three ways to train the same model with the same total number of
optimisation steps S (tiles seen S x batch):

- central: one Trainer on the pooled training patients of every site, S steps;
- each site alone: one Trainer on that site's training patients, S steps;
- federated: FedAvg over one Trainer per site, R rounds of L local steps (3 R L = S), the global weights the
  average of the sites' weights weighted by tiles seen (``deep/federated/averaging.py``); with the PCA start
  (the recipe's), the start is fitted federatedly from the sites' sums (``deep/federated/pca_rounds.py``).

Every model is evaluated on every site's held-out patients through ``encode --reconstruct`` (metrics.csv, the
PSNR per channel that ``bench/fidelity_openkbp.py`` reads). ``--transport flower`` runs the federated arm through
``deepdosimetrics federated local`` (Flower) instead of the in-process loop.

    OMP_NUM_THREADS=1 nice .venv/bin/python bench/federated.py [--datasets phantom openkbp] [--steps 600]
        [--local-steps 10] [--tile 32] [--workdir bench/results/federated]

Last line: JSON with, per dataset and channel, the median PSNR of each arm over all held-out patients and
``fed_minus_central_db`` / ``fed_minus_best_site_db``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "DeepDosimetrics"))
sys.path.insert(0, str(HERE))

from fidelity_openkbp import Subset, metric, usable_patients  # noqa: E402

SITES = 3


def phantom_sites(work: Path, patients: int, shape: list[int], seed: int) -> tuple[Path, dict[str, list[str]]]:
    """A phantom cohort with 3 scanner sites and its patient ids by site (clinical.csv ``site``)."""
    import pandas as pd
    from DeepDosimetricsLib.data.phantoms import synthesize_cohort

    cohort = work / f"phantom-cohort-{patients}-{'x'.join(map(str, shape))}-s{seed}"
    if not (cohort / "clinical.csv").is_file():
        synthesize_cohort(cohort, patients=patients, shape=shape, seed=seed, sites=SITES, quiet=True)
    clinical = pd.read_csv(cohort / "clinical.csv")
    return cohort, {site: sorted(group["patient"].astype(str)) for site, group in clinical.groupby("site")}


def openkbp_sites(source: Path, patients: int, seed: int) -> tuple[Path, dict[str, list[str]]]:
    """The first ``patients`` OpenKBP patients with a dose, dealt at random to 3 pseudo-hospitals."""
    ids = sorted((p.name for p in source.iterdir() if (p / "dose.nrrd").is_file()), key=lambda s: int(s.split("_")[-1]))
    ids = ids[:patients]
    order = np.random.default_rng([seed, 19]).permutation(len(ids))
    return source, {f"hospital_{'ABC'[k]}": sorted(ids[i] for i in order[k::SITES]) for k in range(SITES)}


def hold_out(by_site: dict[str, list[str]], test: int, seed: int) -> tuple[dict, dict]:
    """Per site: (training ids, held-out test ids), ``test`` patients held out at random."""
    train, held = {}, {}
    for k, (site, ids) in enumerate(sorted(by_site.items())):
        order = np.random.default_rng([seed, 23, k]).permutation(len(ids))
        held[site] = sorted(ids[i] for i in order[:test])
        train[site] = sorted(ids[i] for i in order[test:])
    return train, held


def make_trainer(cohort: Path, out: Path, config, patients: list):
    from DeepDosimetricsLib.deep.distributed import DistributedContext
    from DeepDosimetricsLib.deep.train.training import Trainer

    if out.exists():
        shutil.rmtree(out)
    trainer = Trainer(cohort, out, config, DistributedContext.from_environment(), quiet=True)
    trainer.setup(cache=Subset(patients))
    return trainer


def save(trainer, folder: Path, extra: dict) -> Path:
    from DeepDosimetricsLib.deep.model import save_model

    save_model(folder, trainer.model, trainer.model_config, extra=extra)
    return folder


def train_alone(cohort: Path, out: Path, config, patients: list, steps: int) -> tuple[Path, float]:
    """A Trainer on ``patients`` for ``steps`` steps; the final weights saved in out/model."""
    started = time.perf_counter()
    trainer = make_trainer(cohort, out, config, patients)
    batches = iter(trainer.batches())
    for _ in range(steps):
        trainer.step(next(batches))
    trainer.bar.close()
    return save(trainer, out / "model", {"arm": out.name, "steps": steps}), time.perf_counter() - started


def train_federated(cohort: Path, out: Path, config, site_patients: dict[str, list], rounds: int, local_steps: int,
                    pca_tiles: int) -> tuple[Path, float, dict]:
    """FedAvg in this process: one Trainer per site, ``rounds`` x ``local_steps`` each, averaged by tiles seen."""
    from DeepDosimetricsLib.deep.federated.averaging import average_state_dicts
    from DeepDosimetricsLib.deep.federated.pca_rounds import federated_pca
    from DeepDosimetricsLib.deep.train.pca import sampler_batches

    started = time.perf_counter()
    trainers = {site: make_trainer(cohort, out / site, config, patients) for site, patients in site_patients.items()}
    info = {}
    if config.pca_start:  # the PCA start from the sites' sums (each site's tiles never leave it)
        share = -(-pca_tiles // len(trainers))
        passes = {site: sampler_batches(t.sampler, share) for site, t in trainers.items()}
        basis = federated_pca([passes[site] for site in trainers], config.features, seed=config.seed)
        for trainer in trainers.values():
            trainer.model.set_pca_basis(basis.mean, basis.axes, basis.variances)
        info["pca_tiles"] = basis.tiles
    first = next(iter(trainers.values()))
    global_state = {k: v.detach().clone() for k, v in first.model.state_dict().items()}
    streams = {site: iter(t.batches()) for site, t in trainers.items()}
    for _ in range(rounds):
        states, weights = [], []
        for site, trainer in trainers.items():
            trainer.model.load_state_dict(global_state)
            for _ in range(local_steps):
                trainer.step(next(streams[site]))
            states.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
            weights.append(local_steps * config.batch)
        global_state = average_state_dicts(states, weights)
    first.model.load_state_dict(global_state)
    for trainer in trainers.values():
        trainer.bar.close()
    info.update(rounds=rounds, local_steps=local_steps)
    return save(first, out / "model", {"arm": "federated", **info}), time.perf_counter() - started, info


def require_flower_command() -> None:
    """SystemExit with a clear message when this checkout has no ``deepdosimetrics federated`` command."""
    from DeepDosimetricsLib.commands import __path__ as command_path

    if not (Path(command_path[0]) / "federated.py").is_file():
        raise SystemExit("--transport flower needs the `deepdosimetrics federated` command (issue 19, the Flower "
                         "transport), which this checkout does not have; use --transport inprocess")


def train_federated_flower(cohort: Path, out: Path, site_ids: dict[str, list[str]], rounds: int,
                           args) -> tuple[Path, float, dict]:
    """The federated arm through ``deepdosimetrics federated local`` (Flower, real processes)."""
    require_flower_command()
    folders = {}
    for site, ids in site_ids.items():  # one cohort folder per site: links to its training patients
        folder = out / "cohorts" / site
        folder.mkdir(parents=True, exist_ok=True)
        for pid in ids:
            link = folder / pid
            if not link.exists():
                link.symlink_to((cohort / pid).resolve(), target_is_directory=True)
        folders[site] = folder
    command = [sys.executable, "-m", "DeepDosimetricsLib.cli", "federated", "local",
               *[item for site, folder in folders.items() for item in ("--site", f"{site}={folder}")],
               "--out", str(out / "model"), "--rounds", str(rounds), "--local-steps", str(args.local_steps),
               "--tile", str(args.tile), "--features", str(args.features), "--batch", str(args.batch),
               "--widths", *map(str, args.widths), "--channels", args.channels, "--seed", str(args.seed),
               "--cache-root", str(out / "caches"), "--device", "cpu", "--threads", "1"]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO / "DeepDosimetrics")})
    return out / "model", time.perf_counter() - started, {"transport": "flower"}


def reuse_or_train(out: Path, key: dict, reuse: bool, train) -> tuple[Path, float, bool]:
    """``train()`` -> (model folder, seconds), or the earlier run's when ``reuse`` and out/arm.json has ``key``."""
    record = out / "arm.json"
    if reuse and record.is_file() and (out / "model" / "model.json").is_file():
        saved = json.loads(record.read_text())
        if saved.get("key") == key:
            return out / "model", float(saved["seconds"]), True
    model, seconds = train()[:2]
    record.write_text(json.dumps({"key": key, "seconds": seconds}) + "\n")
    return model, seconds, False


def evaluate(model_dir: Path, cohort: Path, cache_dir: Path, test_ids: list[str], out: Path, labels,
             overwrite: bool = True) -> dict:
    """PSNR per channel and patient of ``model_dir`` on ``test_ids`` through encode --reconstruct (``overwrite``
    False: patients already encoded by this model are kept)."""
    import pandas as pd
    from DeepDosimetricsLib.deep.encode.job import EncodeSettings, encode_cohort

    settings = EncodeSettings(reconstruct=True, residuals=False, patients=list(test_ids), device="cpu",
                              quiet=True, progress_json=False)
    encode_cohort(model_dir, cohort, out, cache_dir, settings, overwrite=overwrite, resume=not overwrite)
    frame = pd.read_csv(out / "metrics.csv")
    return {label: metric(frame, label, "psnr") for label in labels}


def run_dataset(name: str, cohort: Path, by_site: dict[str, list[str]], args, work: Path) -> dict:
    from DeepDosimetricsLib.deep.cache.build import ensure_cache
    from DeepDosimetricsLib.deep.cache.store import CacheConfig
    from DeepDosimetricsLib.deep.channels import channel_labels, parse_channels
    from DeepDosimetricsLib.deep.train.training import make_config

    t0 = time.perf_counter()
    cache_dir = work / f"{name}-cache"
    every = sorted(i for ids in by_site.values() for i in ids)
    cache = ensure_cache(cohort, CacheConfig(), cache_dir=cache_dir, ids=every, jobs=1, quiet=True)
    specs = parse_channels(args.channels)
    labels = channel_labels(specs)
    usable = {p.id: p for p in usable_patients(cache, specs)}
    by_site = {site: [i for i in ids if i in usable] for site, ids in by_site.items()}
    train_ids, test_ids = hold_out(by_site, args.test_per_site, args.seed)
    print(f"[{name}] cache of {len(usable)} patients in {time.perf_counter() - t0:.0f} s; sites: "
          + ", ".join(f"{s} {len(train_ids[s])} train + {len(test_ids[s])} test" for s in sorted(by_site)), flush=True)

    # harmonisation: the sites' input statistics compared before training (every site must be admitted)
    from DeepDosimetricsLib.deep.federated.admission import check_sites, site_statistics

    admission = check_sites({site: site_statistics(cache, args.channels, patients=ids) for site, ids in by_site.items()})
    print(f"[{name}] admission:\n" + admission.format(), flush=True)
    rounds = args.steps // (SITES * args.local_steps)
    steps = rounds * SITES * args.local_steps  # S, the same for every arm
    base = dict(channels=args.channels, tile=args.tile, features=args.features, batch=args.batch,
                widths=args.widths, val_fraction=0.0, val_tiles=4, skip_incomplete=True, patience=0,
                pca_tiles=args.pca_tiles, pca_start=args.pca_start, device="cpu", seed=args.seed, threads=1,
                log_every=10**6, steps_per_epoch=10**6, checkpoint_every=10**6)
    arms: dict[str, tuple[Path, float]] = {}
    reused: set[str] = set()
    out = work / name
    pooled = [usable[i] for s in sorted(train_ids) for i in train_ids[s]]

    def arm(label: str, folder: Path, key: dict, train) -> None:
        model, seconds, again = reuse_or_train(folder, {**base, **key, "ids": train_ids}, args.reuse, train)
        arms[label] = (model, seconds)
        if again:
            reused.add(label)
        print(f"[{name}] {label}: {key} in {seconds:.0f} s" + (" (reused)" if again else ""), flush=True)

    arm("central", out / "central", {"steps": steps},
        lambda: train_alone(cohort, out / "central", make_config(None, **base, steps=steps), pooled, steps))
    sites = {s: [usable[i] for i in train_ids[s]] for s in sorted(train_ids)}
    variants = [("federated", rounds)] + ([("federated x3", steps // args.local_steps)] if args.per_site_steps else [])
    for label, count in variants:
        folder = out / label.replace(" ", "-")
        if args.transport == "flower":
            arm(label, folder, {"rounds": count, "transport": "flower"},
                lambda folder=folder, count=count: train_federated_flower(cohort, folder, train_ids, count, args))
        else:
            arm(label, folder, {"rounds": count, "local_steps": args.local_steps},
                lambda folder=folder, count=count: train_federated(
                    cohort, folder, make_config(None, **base, steps=count * args.local_steps), sites, count,
                    args.local_steps, args.pca_tiles))
    for site in sorted(train_ids):
        arm(f"alone:{site}", out / f"alone-{site}", {"steps": steps},
            lambda site=site: train_alone(cohort, out / f"alone-{site}", make_config(None, **base, steps=steps),
                                          sites[site], steps))

    every_test = sorted(i for ids in test_ids.values() for i in ids)
    site_of = {i: s for s, ids in test_ids.items() for i in ids}
    psnr = {}
    for which, (model_dir, _) in arms.items():
        psnr[which] = evaluate(model_dir, cohort, cache_dir, every_test,
                               out / f"encode-{which.replace(':', '-').replace(' ', '-')}", labels,
                               overwrite=which not in reused)
    rows, summary = [], {}
    for label in labels:
        def median(arm, ids, label=label):
            values = [psnr[arm][label][i] for i in ids if i in psnr[arm][label]]
            return float(np.median(values)) if values else float("nan")

        overall = {arm: median(arm, every_test) for arm in arms}
        per_site = {site: {arm: median(arm, ids) for arm in arms} for site, ids in test_ids.items()}
        alone = [a for a in arms if a.startswith("alone:")]
        summary[label] = {
            "all": overall, "per_site": per_site,
            "fed_minus_central_db": overall["federated"] - overall["central"],
            "fed_minus_best_site_db": overall["federated"] - max(overall[a] for a in alone),
            # each hospital on its own patients: federated against what it would get alone
            "fed_minus_own_site_db": {s: per_site[s]["federated"] - per_site[s][f"alone:{s}"] for s in test_ids},
        }
        if "federated x3" in overall:
            summary[label].update({
                "fed3_minus_central_db": overall["federated x3"] - overall["central"],
                "fed3_minus_best_site_db": overall["federated x3"] - max(overall[a] for a in alone)})
        rows.append(label)
    return {"dataset": name, "sites": {s: [len(train_ids[s]), len(test_ids[s])] for s in sorted(train_ids)},
            "steps": steps, "rounds": rounds, "local_steps": args.local_steps,
            "seconds": {arm: round(t, 1) for arm, (_, t) in arms.items()}, "psnr": summary,
            "test_sites": {i: site_of[i] for i in every_test}, "admission": admission.to_dict()}


def print_table(result: dict) -> None:
    name = result["dataset"]
    arms = list(next(iter(result["psnr"].values()))["all"])
    print(f"\n{name}: {result['steps']} steps per arm ({result['rounds']} rounds x {result['local_steps']} local "
          f"steps x {SITES} sites); median PSNR (dB) over all held-out patients")
    print(f"{'channel':<20}" + "".join(f"{a:>18}" for a in arms) + f"{'fed-central':>13}{'fed-best site':>15}")
    for label, s in result["psnr"].items():
        print(f"{label:<20}" + "".join(f"{s['all'][a]:18.2f}" for a in arms)
              + f"{s['fed_minus_central_db']:+13.2f}{s['fed_minus_best_site_db']:+15.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=("phantom", "openkbp"), default=["phantom", "openkbp"])
    parser.add_argument("--openkbp", type=Path, default=REPO.parent / "shared" / "data" / "openkbp" / "train")
    parser.add_argument("--phantom-patients", type=int, default=18)
    parser.add_argument("--phantom-shape", type=int, nargs=3, default=[64, 64, 48])
    parser.add_argument("--openkbp-patients", type=int, default=24)
    parser.add_argument("--test-per-site", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600, help="total optimisation steps of every arm")
    parser.add_argument("--local-steps", type=int, default=10, help="federated: local steps per site and round")
    parser.add_argument("--tile", type=int, default=16)
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--channels", default="default")
    parser.add_argument("--pca-start", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--pca-tiles", type=int, default=192)
    parser.add_argument("--transport", choices=("inprocess", "flower"), default="inprocess")
    parser.add_argument("--per-site-steps", action="store_true",
                        help="also a federated arm whose every site takes --steps steps ('federated x3': 3x the tiles)")
    parser.add_argument("--reuse", action="store_true", help="reuse arms (and their encodings) trained by an "
                        "earlier run with the same options")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=HERE / "results" / "federated")
    args = parser.parse_args(argv)
    args.rounds = args.steps // (SITES * args.local_steps)
    if args.rounds < 1:
        parser.error(f"--steps {args.steps} is fewer than one round ({SITES} sites x {args.local_steps} local steps)")
    if args.transport == "flower":
        require_flower_command()
    import torch

    torch.set_num_threads(1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), list(os.getloadavg())
    results = []
    for name in args.datasets:
        if name == "phantom":
            cohort, by_site = phantom_sites(args.workdir, args.phantom_patients, args.phantom_shape, args.seed)
        else:
            if not args.openkbp.is_dir():
                print(f"skipped openkbp: {args.openkbp} is absent")
                continue
            cohort, by_site = openkbp_sites(args.openkbp, args.openkbp_patients, args.seed)
        result = run_dataset(name, cohort, by_site, args, args.workdir)
        results.append(result)
        print_table(result)
        load = [max(a, b) for a, b in zip(load, os.getloadavg())]
    report = {"results": results, "minutes": round((time.perf_counter() - started) / 60, 1), "load_average_max": load,
              "arguments": {k: str(v) for k, v in vars(args).items()}}
    (args.workdir / "federated.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({r["dataset"]: {label: {"fed_minus_central_db": round(s["fed_minus_central_db"], 2),
                                              "fed_minus_best_site_db": round(s["fed_minus_best_site_db"], 2)}
                                      for label, s in r["psnr"].items()} for r in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
