#!/usr/bin/env python3
"""Copy a trained model folder into the library as a shipped pre-trained model.

    .venv/bin/python Utilities/ship_model.py bench/results/shipped-hn/model openkbp-hn

Writes DeepDosimetrics/DeepDosimetricsLib/Resources/models/<name>/{model.json, model.pt}: the weights (as
they are, or in float16 with ``--float16``), and model.json with the SHA-256 of the weights (checked by ``load_model`` at every load), the
shipped name, and the training summary without this machine's paths. The model card (MODEL_CARD.md) is
written by hand beside them, from the benchmarks; run ``Utilities/update_cmake_lists.py`` afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DeepDosimetrics"))


def main(argv=None) -> int:
    from DeepDosimetricsLib.deep.model import (
        MODEL_JSON,
        MODEL_WEIGHTS,
        file_sha256,
        load_model,
        read_model_json,
    )
    from DeepDosimetricsLib.deep.shipped import SHIPPED_MODELS_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="trained model folder (model.json + model.pt)")
    parser.add_argument("name", help="the shipped model's name (a folder name: letters, digits, '-')")
    parser.add_argument("--float16", action="store_true",
                        help="store the weights in float16 (half the size; loaded into the float32 model)")
    args = parser.parse_args(argv)
    load_model(args.source)  # refuse a folder that does not load
    meta = read_model_json(args.source)
    target = SHIPPED_MODELS_DIR / args.name
    target.mkdir(parents=True, exist_ok=True)
    source = args.source / meta.get("weights", MODEL_WEIGHTS)
    if args.float16:
        import torch

        state = torch.load(source, map_location="cpu", weights_only=True)
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        torch.save(state, target / MODEL_WEIGHTS)
        meta["weights_dtype"] = "float16"
    else:
        shutil.copyfile(source, target / MODEL_WEIGHTS)
    training = dict(meta.get("training") or {})
    training.pop("cohort", None)  # a path on the training machine
    run = dict(training.get("run") or {})
    run.pop("cohort", None)
    if run:
        training["run"] = run
    meta.update(weights=MODEL_WEIGHTS, weights_sha256=file_sha256(target / MODEL_WEIGHTS), shipped_name=args.name,
                training=training)
    (target / MODEL_JSON).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    load_model(target)  # and the shipped copy loads, checksum included
    print(f"{target}: sha256 {meta['weights_sha256']}, {(target / MODEL_WEIGHTS).stat().st_size / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
