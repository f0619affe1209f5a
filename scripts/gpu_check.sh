#!/usr/bin/env bash
# The GPU checks in one command (`make test-gpu`): the gpu-marked tests (CUDA against the CPU path),
# then the GPU benchmarks as JSON files, for BENCHMARKS.md. Usage: scripts/gpu_check.sh [OUT_DIR]
#   PYTHON=...   the interpreter (default: python3); run it in the environment that holds dgucdir
# Refuses to start without a CUDA device: on a CPU machine the gpu tests skip inside the default suite.
set -euo pipefail
PY=${PYTHON:-python3}
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device here")'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"

echo "== gpu tests"
tests=0  # a failing test fails the check, after the benchmarks have still been taken
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" || tests=$?

echo "== benchmarks"
photos="$OUT/photos"
[ -f "$photos/shards/manifest.json" ] || "$PY" -m dgucdir bench photos --out "$photos" --count 1000 >/dev/null
manifest="$photos/shards/manifest.json"
"$PY" -m dgucdir bench aug --image-size 224 --batch-size 128 --steps 10 | tee "$OUT/bench_aug.json"
"$PY" -m dgucdir bench loader --manifest "$manifest" --image-size 224 --batch-size 256 --steps 20 \
    | tee "$OUT/bench_loader.json"
# ResNet-50 at 224 px as configs/pacs.yaml, on the photo set, random weights (throughput does not care)
for precision in bf16 no; do
    for batch in 128 256; do
        "$PY" -m dgucdir bench train "data.manifest=$manifest" \
            "data.train_domains=[warm,cool]" "data.eval_domains=[dim,bright]" data.num_threads=8 \
            model.moco_init=none model.channels_last=true "train.mixed_precision=$precision" \
            "train.batch_size=$batch" --config configs/pacs.yaml --steps 30 --warmup 5 | tee "$OUT/bench_train_${precision}_${batch}.json"
    done
done
echo "== results in $OUT"
exit "$tests"
