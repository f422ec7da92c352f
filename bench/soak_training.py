"""Soak: kill `train` (and a cohort `encode`) with SIGKILL at N random moments, resume each time, and check
that the result equals an uninterrupted run's exactly (CPU).

Training: a reference run of S steps, then a soaked run in a fresh model folder: each attempt is
``deepdosimetrics train ... --resume`` (a new run the first time), killed at a random moment until N kills
have happened, then resumed to the end. The final weights (checkpoint and model.pt) and the loss history
(train and validation losses) must equal the reference's bit for bit.

Encode (``--encode-kills M``): the same with ``deepdosimetrics encode --resume --reconstruct`` on the
cohort; the final tables (features, tiles, metrics) and every patient's files must equal the reference's,
with no ``.partial-*`` folder left.

Kill moments, by attempt: one in five uniform from the process start to the time the reference took to
reach its first step or patient (imports, cache check, checkpoint loading); for training one in five just
after the progress line of a checkpoint step (while the checkpoint is written), the others after a random
number (1 to 2 checkpoint intervals) of steps plus a random fraction of a step; for encode a random moment
within 0.8 patient times after the attempt's first (or, one time in three, second) patient starts.

Both runs use a snapshot of the library at the checked-out commit (``git archive HEAD``), so edits made to
the working tree meanwhile cannot make the reference and the soaked run differ.

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


#: the library the runs use: [path]; snapshot_library replaces it with a copy of the committed code
LIBRARY = [str(REPO / "DeepDosimetrics")]


def snapshot_library(folder: Path) -> str:
    """Copy the library at HEAD into ``folder`` and use it here and in every run; returns the commit (or
    "working tree" when this is not a git checkout)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        archive = subprocess.run(["git", "archive", "HEAD", "DeepDosimetrics/DeepDosimetricsLib"], cwd=REPO,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO / "DeepDosimetrics" / "DeepDosimetricsLib", folder / "DeepDosimetrics" / "DeepDosimetricsLib",
                        dirs_exist_ok=True)
        commit = "working tree"
    LIBRARY[0] = str(folder / "DeepDosimetrics")
    sys.path.insert(0, LIBRARY[0])
    return commit


def cli(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "DeepDosimetricsLib.cli", *arguments]


class Attempt:
    """One run of a command, with the time of its first progress line."""

    def __init__(self, command: list[str]) -> None:
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": LIBRARY[0]}
        self.started = time.monotonic()
        self.first_progress = threading.Event()
        self.progress_lines = 0
        self.last_done = -1  # the "done" field of the last progress line
        self.last_line = self.started  # when it came
        self.process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            if line.startswith("@progress "):
                try:
                    self.last_done = int(json.loads(line[len("@progress "):]).get("done") or 0)
                except (ValueError, TypeError):
                    pass
                self.progress_lines += 1
                self.last_line = time.monotonic()
                self.first_progress.set()

    def wait(self) -> int:
        code = self.process.wait()
        time.sleep(0.05)  # let the readers drain
        return code


def run_to_end(command: list[str]) -> tuple[float, float, float]:
    """Run a command uninterrupted: seconds to its first progress line, to its last one, and in all."""
    attempt = Attempt(command)
    attempt.first_progress.wait(timeout=600)
    first = time.monotonic() - attempt.started
    if attempt.wait() != 0:
        raise SystemExit("reference run failed:\n" + "".join(attempt.stderr)[-4000:])
    return first, attempt.last_line - attempt.started, time.monotonic() - attempt.started


def soak(command: list[str], kills: int, startup_s: float, unit_s: float, rng: random.Random,
         checkpoint_every: int = 0) -> dict:
    """Run ``command`` (which resumes) until ``kills`` SIGKILLs have landed, then once more to the end.

    ``unit_s``: the reference's time per step (training, ``checkpoint_every`` > 0) or per patient (encode).
    """
    landed, attempts, moments = 0, 0, []
    while landed < kills:
        attempts += 1
        attempt = Attempt(command)
        if attempts % 5 == 0:
            phase = "start-up"
            deadline = attempt.started + rng.uniform(0.0, startup_s)
        else:
            if checkpoint_every and attempts % 5 == 1:
                phase = "checkpoint write"
                ready = lambda a: a.last_done > 0 and a.last_done % checkpoint_every == 0  # noqa: E731
                delay = rng.uniform(0.0, 0.05)
            elif checkpoint_every:
                phase, lines = "mid-step", rng.randint(1, 2 * checkpoint_every)
                ready = lambda a, lines=lines: a.progress_lines >= lines  # noqa: E731
                delay = rng.uniform(0.0, unit_s)
            else:  # one attempt in three finishes a patient first
                phase, lines = "mid-patient", 1 + int(rng.random() < 0.35)
                ready = lambda a, lines=lines: a.progress_lines >= lines  # noqa: E731
                delay = rng.uniform(0.0, 0.8 * unit_s)
            limit = time.monotonic() + 600
            while not ready(attempt) and attempt.process.poll() is None:
                if time.monotonic() > limit:
                    raise SystemExit("no progress in 600 s:\n" + "".join(attempt.stderr)[-4000:])
                time.sleep(0.002)
            deadline = time.monotonic() + delay
        while time.monotonic() < deadline and attempt.process.poll() is None:
            time.sleep(0.002)
        if attempt.process.poll() is None:
            attempt.process.send_signal(signal.SIGKILL)
            attempt.wait()
            landed += 1
            moments.append({"phase": phase, "after_s": round(time.monotonic() - attempt.started, 2),
                            "last_progress": attempt.last_done})
        elif attempt.wait() != 0:
            raise SystemExit("a resumed run failed:\n" + "".join(attempt.stderr)[-4000:])
        else:
            break  # finished before the kill: no more moments to kill
    attempts += 1
    final = Attempt(command)
    if final.wait() != 0:
        raise SystemExit("the final resume failed:\n" + "".join(final.stderr)[-4000:])
    phases = {}
    for moment in moments:
        phases[moment["phase"]] = phases.get(moment["phase"], 0) + 1
    return {"kills": landed, "attempts": attempts, "kills_by_phase": phases, "moments": moments}


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
    left = sorted(p.name for p in soaked.glob(".*.tmp*"))  # atomic-write temporaries of killed runs
    return {"weights_identical": bool(weights), "loss_history_identical": bool(history),
            "steps": int(history_a["step"].iloc[-1]), "temporaries_left": left}


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
    parser.add_argument("--patients", type=int, default=10, help="phantom patients (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--keep", default=None, metavar="DIR", help="work in DIR (kept) instead of a temporary one")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    commit = snapshot_library(work / "src")
    from DeepDosimetricsLib.data.phantoms import synthesize_cohort
    from DeepDosimetricsLib.deep.cache.build import ensure_cache

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
            first, last, total = run_to_end(cli(*train, "--out", str(work / "train-reference")))
            step_s = max(0.01, (last - first) / max(1, args.steps - 1))
            soaked = soak(cli(*train, "--out", str(work / "train-soaked"), "--resume"), args.kills, first,
                          step_s, rng, checkpoint_every=args.checkpoint_every)
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
            first, last, total = run_to_end(cli(*encode, "--out", str(work / "encode-reference")))
            per_patient = max(0.05, (last - first) / args.patients)  # the last line comes after the last patient
            soaked = soak(cli(*encode, "--out", str(work / "encode-soaked"), "--resume"), args.encode_kills,
                          first, per_patient, rng)
            results["encode"] = {**soaked, **same_encoding(work / "encode-reference", work / "encode-soaked"),
                                 "reference_s": round(total, 1), "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(results["encode"]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"commit": commit, **{name: {k: v for k, v in r.items() if k != "moments"}
                                           for name, r in results.items()}}))


if __name__ == "__main__":
    main()
