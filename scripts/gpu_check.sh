#!/usr/bin/env bash
# The GPU checks in one command: the gpu-marked tests (CUDA against the CPU path), then the GPU
# benchmarks, every result as a file under OUT_DIR and each phase's time printed as it ends.
#
#   scripts/gpu_check.sh [--wheelhouse DIR] [OUT_DIR]        (default OUT_DIR: runs/gpu-check)
#
#   make test-gpu                 in the full environment of scripts/setup_env.sh
#   --wheelhouse DIR              on a node with only PyTorch: first installs DIR (scripts/wheelhouse.py)
#                                 offline: into PYTHON's venv when it runs in one, else into
#                                 OUT_DIR/venv, a new venv that sees the system's torch
#   PYTHON=...                    the node's interpreter (default: python3)
#
# The DALI half of the GPU checks (scripts/device_check.py is the half without DALI; docs/INSTALL.md,
# "The GPU checks", says how DALI's wheel travels in parts). Each phase's time is printed as it ends;
# no GPU has timed it yet. Refuses to start the GPU phases without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
wheelhouse=""
if [ "${1:-}" = "--wheelhouse" ]; then wheelhouse="$2"; shift 2; fi
OUT=${1:-runs/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
start=$SECONDS
phase_start=$SECONDS
phase() {  # phase NAME: closes the previous phase (prints its time) and opens the next
    [ -n "${current:-}" ] && printf '== %-14s %4d s\n' "$current" $((SECONDS - phase_start)) | tee -a "$OUT/phases.txt"
    current=$1
    phase_start=$SECONDS
    [ "$current" = done ] || echo "== $current ..."
}

if [ -n "$wheelhouse" ]; then
    phase install
    if ! "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
        "$PY" -m venv --system-site-packages "$OUT/venv"
        PY="$OUT/venv/bin/python"
    fi
    "$PY" "$wheelhouse/install_wheelhouse.py" "$wheelhouse" --python "$PY" | tee "$OUT/install.log"
fi

phase device
"$PY" -c 'import sys
try:
    import torch
except ImportError:
    sys.exit(f"gpu_check: no torch in {sys.executable}")
sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device here")'
"$PY" -c 'import torch, json; print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
    "device": torch.cuda.get_device_name(0)}))' | tee "$OUT/device.json"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt" || true

phase gpu-tests
tests=0  # a failing test fails the check, after the benchmarks have still been taken
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" || tests=$?

phase photos
photos="$OUT/photos"
[ -f "$photos/shards/manifest.json" ] || "$PY" -m dgucdir bench photos --out "$photos" --count 400 >/dev/null
manifest="$photos/shards/manifest.json"

phase bench-aug
"$PY" -m dgucdir bench aug --image-size 224 --batch-size 128 --steps 10 | tee "$OUT/bench_aug.json"

phase bench-loader
"$PY" -m dgucdir bench loader --manifest "$manifest" --image-size 224 --batch-size 256 --steps 10 \
    | tee "$OUT/bench_loader.json"

# ResNet-50 at 224 px as configs/pacs.yaml, on the photo set, random weights (throughput does not care)
for run in bf16:128 no:128 bf16:256; do
    precision=${run%%:*} batch=${run##*:}
    phase "train-$precision-$batch"
    "$PY" -m dgucdir bench train "data.manifest=$manifest" \
        "data.train_domains=[warm,cool]" "data.eval_domains=[dim,bright]" data.num_threads=8 \
        model.moco_init=none model.channels_last=true "train.mixed_precision=$precision" \
        "train.batch_size=$batch" --config configs/pacs.yaml --steps 20 --warmup 5 \
        | tee "$OUT/bench_train_${precision}_${batch}.json"
done
phase done
echo "== total          $((SECONDS - start)) s; results in $OUT" | tee -a "$OUT/phases.txt"
exit "$tests"
