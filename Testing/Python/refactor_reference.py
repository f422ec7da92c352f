"""The fixed pipeline whose outputs must not change when the code is reorganised.

Runs only the `deepdosimetrics` command line (whose interface is stable), on a tiny phantom cohort:
synth, radiomics, dvh, a few fixed-seed training steps and an encoding. `summarize` reduces the outputs to
digests (synth files) and numbers (tables, loss history, features) that `test_refactor_invariance.py`
compares with `data/refactor_reference.json`, written once from the code before the reorganisation (its synth
digests and DVH numbers again when the phantom dose became the same to the bit on every CPU). Training
passes `data/train-legacy.yaml`, the recipe of that time, so that later changes of the default recipe
(issue 13) leave the comparison meaningful:

    python Testing/Python/refactor_reference.py OUT_DIR --write Testing/Python/data/refactor_reference.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pandas as pd

#: the training recipe the reference was made with (the defaults before issue 13 changed them)
LEGACY_RECIPE = Path(__file__).parent / "data" / "train-legacy.yaml"


def run_pipeline(out: Path) -> None:
    """Run the commands into `out` (CPU, one thread, fixed seeds)."""
    import torch
    from DeepDosimetricsLib.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's arithmetic; the caller's setting comes back afterwards
    cohort, cache, model, enc = out / "cohort", out / "cache", out / "model", out / "enc"
    steps = [
        ["synth", "--out", str(cohort), "--patients", "3", "--shape", "40", "40", "24", "--seed", "3", "--quiet"],
        ["radiomics", "--cohort", str(cohort), "--out", str(out / "radiomics.csv"), "--quiet"],
        ["dvh", "--cohort", str(cohort), "--out", str(out / "dvh.csv"), "--quiet"],
        ["train", "--cohort", str(cohort), "--cache", str(cache), "--out", str(model), "--tile", "16",
         "--batch", "2", "--widths", "8", "8", "--steps", "30", "--device", "cpu", "--seed", "1",
         "--checkpoint-every", "15", "--config", str(LEGACY_RECIPE), "--quiet"],
        ["encode", "--model", str(model), "--cohort", str(cohort), "--cache", str(cache), "--out", str(enc),
         "--device", "cpu", "--quiet"],
    ]
    try:
        for argv in steps:
            code = main(argv)
            if code not in (0, 1):
                raise SystemExit(f"{argv[0]} failed with exit code {code}")
    finally:
        torch.set_num_threads(threads)


def _numbers(table: pd.DataFrame, keys: list[str]) -> dict[str, float]:
    table = table.dropna(subset=["value"])
    return {"/".join(str(row[k]) for k in keys): float(row["value"]) for _, row in table.iterrows()}


def summarize(out: Path) -> dict:
    """Digests of every synth file, and the numbers of each table."""
    cohort = out / "cohort"
    digests = {str(p.relative_to(cohort)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(cohort.rglob("*")) if p.is_file()}
    history = pd.read_csv(out / "model" / "loss_history.csv")
    return {
        "synth": digests,
        "radiomics": _numbers(pd.read_csv(out / "radiomics.csv"), ["patient", "structure", "feature"]),
        "dvh": _numbers(pd.read_csv(out / "dvh.csv"), ["patient", "structure", "feature"]),
        "loss": [float(v) for v in history["train_loss"].dropna()] + [float(v) for v in history["val_loss"].dropna()],
        "features": _numbers(pd.read_csv(out / "enc" / "features.csv"), ["patient", "structure", "feature"]),
    }


if __name__ == "__main__":
    target = Path(sys.argv[1])
    run_pipeline(target)
    summary = summarize(target)
    if len(sys.argv) > 3 and sys.argv[2] == "--write":
        Path(sys.argv[3]).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(json.dumps({k: len(v) for k, v in summary.items()}))
