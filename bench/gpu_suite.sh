#!/usr/bin/env bash
# Issue 13's GPU checks in one short run (< 8 minutes; every step has its own timeout):
#   1. training-step throughput of the default recipe (residual blocks + fidelity loss terms) on CUDA:
#      float32, bf16 autocast, bf16 + torch.compile; tile 32 (batch 64) and tile 64 (batch 16);
#   2. bench/fidelity_openkbp.py on CUDA with bf16, a 1-minute training budget, end to end (tile sampling
#      included), with the tiles cut on the GPU from the resident cache (--sampler device) and read by CPU
#      DataLoader workers into pinned memory (--sampler host): its "training:" line gives the end-to-end
#      M voxels/s to set beside step 1's bare step (issue 17's goal: >= 70%); on OpenKBP when
#      shared/data/openkbp/train travelled with the tree, else on synthetic phantoms.
# Usage (device machine, repository root):  bash bench/gpu_suite.sh   -> compact summary at the end;
# full logs in $OUT (or /tmp/gpu_suite). Uses the machine's python3 and its torch (any 2.x with CUDA);
# packages the library needs but the image lacks (SimpleITK) are installed from ./.whl when that folder
# was carried (.venv/bin/pip download SimpleITK==2.5.7 --only-binary=:all: --no-deps --python-version 3.12
# --platform manylinux2014_x86_64 -d .whl), else step 2 is skipped with the reason.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-/tmp/gpu_suite}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD/DeepDosimetrics${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SUMMARY="$LOGS/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# 0. environment --------------------------------------------------------------------------------------
timeout 60 "$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}; CUDA {torch.cuda.is_available()} ({gpu}); "
      f"bf16 {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
EOF
missing=$("$PY" - <<'EOF'
import importlib.util
names = {"numpy": "numpy", "scipy": "scipy", "pandas": "pandas", "yaml": "PyYAML", "skimage": "scikit-image",
         "matplotlib": "matplotlib", "tqdm": "tqdm", "psutil": "psutil", "threadpoolctl": "threadpoolctl",
         "SimpleITK": "SimpleITK"}
print(" ".join(pip for module, pip in names.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$missing" ]; then
  if [ -d .whl ]; then
    timeout 120 "$PY" -m pip install -q --no-index --find-links .whl $missing >"$LOGS/pip.log" 2>&1 \
      && note "installed from .whl: $missing" || note "could not install from .whl: $missing (see pip.log)"
  else
    note "missing packages (no .whl folder carried): $missing"
  fi
fi

# 1. throughput ---------------------------------------------------------------------------------------
timeout 150 "$PY" bench/train_speed.py --channels default --tile 32 --batch 64 --widths 16 32 32 --recipe \
  --cuda-only --compile --no-sampler --steps 10 --warmup 3 >"$LOGS/speed_t32.log" 2>&1
rc=$?
note "== speed, tile 32, batch 64, widths 16 32 32, default recipe (rc $rc)"
grep -E "^ *cuda|peak" "$LOGS/speed_t32.log" | tee -a "$SUMMARY"
timeout 100 "$PY" bench/train_speed.py --channels default --tile 64 --batch 16 --recipe \
  --cuda-only --no-sampler --steps 8 --warmup 2 >"$LOGS/speed_t64.log" 2>&1
rc=$?
note "== speed, tile 64, batch 16, widths 16 32 64 64, default recipe (rc $rc)"
grep -E "^ *cuda|peak" "$LOGS/speed_t64.log" | tee -a "$SUMMARY"

# 2. fidelity on CUDA ---------------------------------------------------------------------------------
if ! "$PY" -c "import SimpleITK" 2>/dev/null; then
  note "== fidelity: skipped (SimpleITK is missing: carry a .whl folder, see the header)"
else
  DATA=shared/data/openkbp/train
  EXTRA=(--max-train 60 --max-test 6)
  if [ ! -d "$DATA" ]; then
    DATA="$LOGS/phantoms"
    timeout 90 "$PY" -m DeepDosimetricsLib.cli synth --out "$DATA" --patients 16 --shape 96 96 64 --seed 0 \
      --quiet >"$LOGS/synth.log" 2>&1 || note "synth failed (see synth.log)"
    EXTRA=(--max-test 4)
  fi
  for sampler in device host; do
    timeout 170 "$PY" bench/fidelity_openkbp.py --train "$DATA" --budget-minutes 1 --device cuda --batch 64 \
      --tile 32 --features 10 --widths 16 32 32 --encode-batch 64 --pca-tiles 1024 --cache "$LOGS/cache" \
      --sampler "$sampler" --workdir "$LOGS/fidelity-$sampler" --fresh "${EXTRA[@]}" >"$LOGS/fidelity_$sampler.log" 2>&1
    rc=$?
    note "== fidelity on $DATA, 1-min budget, bf16, tiles cut on the $sampler, end to end (rc $rc)"
    [ $rc -ne 0 ] && tail -3 "$LOGS/fidelity_$sampler.log" | tee -a "$SUMMARY"
    grep -E "^training:|^psnr_margin" "$LOGS/fidelity_$sampler.log" | tee -a "$SUMMARY"
  done
fi
echo; echo "==== summary ($SUMMARY)"; cat "$SUMMARY"
