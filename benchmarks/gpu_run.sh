#!/usr/bin/env bash
# Issue 23's GPU measurements in one command (at most 6.3 minutes; see benchmarks/README.md).
# Here first: bash benchmarks/prepare_gpu_run.sh. Then, through the device tool, from the repository
# root: run(command="bash benchmarks/gpu_run.sh", carry=[".gpu"], timeout_s=400).
# Brings back under $OUT: gpu.txt (the card); harness-eager.log, harness-auto.log and their
# manifest-*.json (cold `harness run` of the random-weights Gemma-2-2B spec at N = 100: eager
# decoding measured while decoding, then runtime.compile auto; exit code, wall time and stage
# times); bench.md (bench_pipeline at N = 100 and 2000: harness eager, measured while decoding,
# compiled, auto; the eager and compiled floors; the roofline of each part). Each step has its own
# time limit, so one that hangs leaves the others' output.
# DRY_RUN=1: the same steps with the --tiny model, small N and the local Python packages: a check
# of this script on a CPU.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # nothing outside is reachable
if [ -n "${DRY_RUN:-}" ]; then
    model_flags=(--tiny) bench_flags=(--config tiny --n-samples 4 8 --compiled 4 --device cpu --card H200) limit=(--limit 4)
else
    model_flags=() bench_flags=(--n-samples 100 2000 --compiled) limit=()
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl || exit 3
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# 1. cold `harness run` of the random-weights Gemma-2-2B spec, N = 100 (exit 0 or 1 expected: random
#    weights), each in a fresh cache: eager decoding (measured while decoding), then the default (auto).
timeout 60 python3 benchmarks/make_random_gemma2.py "${model_flags[@]}"
for mode in eager auto; do
    settings=(); [ "$mode" = eager ] && settings=(--set runtime.compile=false)
    start=$(date +%s.%N)
    limit_s=60; [ "$mode" = auto ] && limit_s=90  # auto compiles decoding at N = 100
    HARNESS_CACHE_DIR=/tmp/gpu-cache-$mode timeout $limit_s python3 -m harness run benchmarks/random-gemma2-2b.yaml \
        --runs-dir /tmp/gpu-runs-$mode "${settings[@]}" "${limit[@]}" > "$OUT/harness-$mode.log" 2>&1
    echo "exit code $? after $(python3 -c "import time; print(f'{time.time() - $start:.1f}')") s" | tee -a "$OUT/harness-$mode.log"
    cat "$OUT/harness-$mode.log"
    cp "$(ls -d /tmp/gpu-runs-$mode/random-gemma2-2b/*/ | tail -1)manifest.json" "$OUT/manifest-$mode.json"
done
rm -rf benchmarks/random-gemma2-2b  # 5 GB: the benchmark makes its own model in memory

# 2. the benchmark: at N = 100 and 2000, harness eager, measured while decoding, compiled and auto,
#    the eager and compiled floors, each part against the card's roofline (no seed style: issue 13 measured it).
timeout 170 python3 benchmarks/bench_pipeline.py --random-weights "${bench_flags[@]}" --skip-seed \
    --generation-batch-size auto --token-budget auto > "$OUT/bench.md" 2> "$OUT/bench-progress.log"
echo "bench_pipeline exit code $?" >> "$OUT/bench.md"
cat "$OUT/bench-progress.log" "$OUT/bench.md"
