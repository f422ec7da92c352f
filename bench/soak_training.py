"""Soak: kill `train` (and a cohort `encode`) with SIGKILL at N random moments, resume each time, and check
that the result equals an uninterrupted run's exactly (CPU).

Training: a reference run of S steps, then a soaked run in a fresh model folder: each attempt is
``deepdosimetrics train ... --resume`` (a new run the first time), killed at a random moment until N kills
have happened, then resumed to the end. The final weights (checkpoint and model.pt) and the loss history
(train and validation losses) must equal the reference's bit for bit.

Encode (``--encode-kills M``): the same with ``deepdosimetrics encode --resume --reconstruct`` on the
cohort; the final tables (features, tiles, metrics) and every patient's files must equal the reference's,
with no ``.partial-*`` folder left.

A kill moment is, for one attempt in five, uniform from the process start to the time the reference took to
reach its first step or patient (imports, cache check, checkpoint loading); otherwise uniform within two
checkpoint intervals after the attempt's first progress line (mid-step, mid-checkpoint write, mid-patient).

    OMP_NUM_THREADS=1 .venv/bin/python bench/soak_training.py --kills 20 --encode-kills 20 [--seed 0]

Prints one JSON line per soak (kills, attempts, identical, seconds) and a last line with both.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "DeepDosimetrics"))

TRAIN_OPTIONS = ["--tile", "16", "--batch", "2", "--features", "4", "--widths", "4", "8", "--device", "cpu",
                 "--seed", "3", "--threads", "1", "--lr", "0.002", "--schedule", "cosine", "--patience", "0"]


def cli(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "DeepDosimetricsLib.cli", *arguments]


class Attempt:
    """One run of a command, with the time of its first progress line."""

    def __init__(self, command: list[str]) -> None:
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "DeepDosimetrics")}
        self.started = time.monotonic()
        self.first_progress = threading.Event()
        self.progress_lines = 0
        self.process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            if line.startswith("@progress "):
                self.progress_lines += 1
                self.first_progress.set()

    def wait(self) -> int:
        code = self.process.wait()
        time.sleep(0.05)  # let the readers drain
        return code


def run_to_end(command: list[str]) -> tuple[float, float]:
    """Run a command uninterrupted: (seconds to its first progress line, seconds in all)."""
    attempt = Attempt(command)
    attempt.first_progress.wait(timeout=600)
    first = time.monotonic() - attempt.started
    if attempt.wait() != 0:
        raise SystemExit("reference run failed:\n" + "".join(attempt.stderr)[-4000:])
    return first, time.monotonic() - attempt.started


def soak(command: list[str], kills: int, startup_s: float, window_s: float, rng: random.Random) -> dict:
    """Run ``command`` (which resumes) until ``kills`` SIGKILLs have landed, then once more to the end."""
    landed, attempts, moments = 0, 0, []
    while landed < kills:
        attempts += 1
        attempt = Attempt(command)
        if rng.random() < 0.2:
            delay, phase = rng.uniform(0.0, startup_s), "start-up"
            deadline = attempt.started + delay
        else:
            limit = time.monotonic() + 600
            while not attempt.first_progress.wait(0.02) and attempt.process.poll() is None:
                if time.monotonic() > limit:
                    raise SystemExit("no progress line in 600 s:\n" + "".join(attempt.stderr)[-4000:])
            delay, phase = rng.uniform(0.0, window_s), "running"
            deadline = time.monotonic() + delay
        while time.monotonic() < deadline and attempt.process.poll() is None:
            time.sleep(0.005)
        if attempt.process.poll() is None:
            attempt.process.send_signal(signal.SIGKILL)
            attempt.wait()
            landed += 1
            moments.append({"phase": phase, "after_s": round(time.monotonic() - attempt.started, 2),
                            "progress_lines": attempt.progress_lines})
        elif attempt.wait() != 0:
            raise SystemExit("a resumed run failed:\n" + "".join(attempt.stderr)[-4000:])
        else:
            break  # finished before the kill: no more moments to kill
    attempts += 1
    final = Attempt(command)
    if final.wait() != 0:
        raise SystemExit("the final resume failed:\n" + "".join(final.stderr)[-4000:])
    return {"kills": landed, "attempts": attempts, "moments": moments}


def same_training(reference: Path, soaked: Path) -> dict:
    import pandas as pd
    import torch

    def states(folder: Path) -> dict:
        checkpoint = torch.load(folder / "checkpoint.pt", weights_only=False, map_location="cpu")
        return {"checkpoint": checkpoint["model"], "model.pt": torch.load(folder / "model.pt", weights_only=True)}

    mine, theirs = states(reference), states(soaked)
    weights = all(set(mine[k]) == set(theirs[k]) and all(torch.equal(mine[k][n], theirs[k][n]) for n in mine[k])
                  for k in mine)
    columns = ["step", "train_loss", "val_loss"]
    history_a = pd.read_csv(reference / "loss_history.csv")
    history_b = pd.read_csv(soaked / "loss_history.csv")
    history = history_a[columns].equals(history_b[columns])
    return {"weights_identical": bool(weights), "loss_history_identical": bool(history),
            "steps": int(history_a["step"].iloc[-1])}


def same_encoding(reference: Path, soaked: Path) -> dict:
    different = []
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file()
                   and p.name not in ("encode.json", ".deepdosimetrics.lock"))
    for relative in files:
        other = soaked / relative
        if not other.is_file() or other.read_bytes() != (reference / relative).read_bytes():
            different.append(str(relative))
    extra = sorted(str(p.relative_to(soaked)) for p in soaked.rglob("*") if p.is_file()
                   and not (reference / p.relative_to(soaked)).exists())
    partial = sorted(p.name for p in soaked.glob(".partial-*"))
    return {"files": len(files), "different": different[:10], "extra": extra[:10], "partial_left": partial,
            "outputs_identical": not different and not extra and not partial}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of the training run (default 20)")
    parser.add_argument("--encode-kills", type=int, default=20, help="SIGKILLs of the encode run (0: none)")
    parser.add_argument("--steps", type=int, default=120, help="training steps (default 120)")
    parser.add_argument("--checkpoint-every", type=int, default=4, help="steps between checkpoints (default 4)")
    parser.add_argument("--patients", type=int, default=8, help="phantom patients (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--keep", default=None, metavar="DIR", help="work in DIR (kept) instead of a temporary one")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    from DeepDosimetricsLib.data.phantom import synthesize_cohort
    from DeepDosimetricsLib.deep.cache.build import ensure_cache

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    cohort = synthesize_cohort(work / "cohort", patients=args.patients, shape=(48, 48, 32), seed=0, quiet=True)
    ensure_cache(cohort, cache_dir=work / "cache")
    results = {}
    try:
        config = work / "soak.yaml"  # a progress line every step: the kill window is timed from the first
        config.write_text("log_every: 1\n")
        if args.kills > 0:
            train = ["train", "--cohort", str(cohort), "--cache", str(work / "cache"), "--config", str(config),
                     "--steps", str(args.steps),
                     "--checkpoint-every", str(args.checkpoint_every), "--quiet", *TRAIN_OPTIONS]
            started = time.perf_counter()
            first, total = run_to_end(cli(*train, "--out", str(work / "train-reference")))
            step_s = max(0.01, (total - first) / args.steps)
            soaked = soak(cli(*train, "--out", str(work / "train-soaked"), "--resume"), args.kills, first,
                          2 * args.checkpoint_every * step_s, rng)
            results["train"] = {**soaked, **same_training(work / "train-reference", work / "train-soaked"),
                                "checkpoint_every": args.checkpoint_every, "reference_s": round(total, 1),
                                "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(results["train"]), flush=True)
        if args.encode_kills > 0:
            model = work / "train-reference"
            if not (model / "model.pt").is_file():
                run_to_end(cli("train", "--cohort", str(cohort), "--cache", str(work / "cache"), "--steps", "8",
                               "--quiet", *TRAIN_OPTIONS, "--out", str(model)))
            encode = ["encode", "--model", str(model), "--cohort", str(cohort), "--cache", str(work / "cache"),
                      "--device", "cpu", "--reconstruct", "--quiet"]
            started = time.perf_counter()
            first, total = run_to_end(cli(*encode, "--out", str(work / "encode-reference")))
            per_patient = max(0.05, (total - first) / args.patients)
            soaked = soak(cli(*encode, "--out", str(work / "encode-soaked"), "--resume"), args.encode_kills,
                          first, 2 * per_patient, rng)
            results["encode"] = {**soaked, **same_encoding(work / "encode-reference", work / "encode-soaked"),
                                 "reference_s": round(total, 1), "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(results["encode"]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({name: {k: v for k, v in r.items() if k != "moments"} for name, r in results.items()}))


if __name__ == "__main__":
    main()
