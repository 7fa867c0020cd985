#!/usr/bin/env bash
# Issue 13's GPU measurements in one command (at most 9.5 minutes; see benchmarks/README.md).
# Here first: bash benchmarks/prepare_gpu_run.sh. Then, through the device tool, from the repository
# root: run(command="bash benchmarks/gpu_run.sh", carry=[".gpu"], timeout_s=600).
# Brings back under $OUT: gpu.txt (the card), harness-run.log and manifest.json (harness run of the
# random-weights Gemma-2-2B spec, N = 100: exit code and stage times) and bench.md (bench_pipeline
# at N = 100 and 2000). Each step has its own time limit, so one that hangs leaves the others' output.
# DRY_RUN=1: the same steps with the --tiny model, small N, no compiled parts and the local
# Python packages: a check of this script on a CPU (about 3 minutes).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # nothing outside is reachable
if [ -n "${DRY_RUN:-}" ]; then
    model_flags=(--tiny) bench_flags=(--config tiny --n-samples 4 8)
else
    model_flags=() bench_flags=(--n-samples 100 2000 --compiled 2000)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl || exit 3
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# 1. harness run of the random-weights Gemma-2-2B spec (item 6): exit 0 or 1 expected.
timeout 100 python3 benchmarks/make_random_gemma2.py "${model_flags[@]}"
start=$(date +%s)
timeout 150 python3 -m harness run benchmarks/random-gemma2-2b.yaml --runs-dir /tmp/gpu-runs > "$OUT/harness-run.log" 2>&1
echo "exit code $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/harness-run.log"
cat "$OUT/harness-run.log"
cp "$(ls -d /tmp/gpu-runs/random-gemma2-2b/*/ | tail -1)manifest.json" "$OUT/"
rm -rf benchmarks/random-gemma2-2b  # 5 GB: the benchmark makes its own model in memory

# 2. the benchmark (item 7): eager parts and the seed style at N = 100, eager and compiled at N = 2000.
timeout 300 python3 benchmarks/bench_pipeline.py --random-weights "${bench_flags[@]}" \
    --generation-batch-size auto --token-budget auto > "$OUT/bench.md" 2> "$OUT/bench-progress.log"
echo "bench_pipeline exit code $?" >> "$OUT/bench.md"
cat "$OUT/bench-progress.log" "$OUT/bench.md"
