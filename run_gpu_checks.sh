#!/usr/bin/env bash
# One device call: bench.py alone first (timings), then test_equivalence.py in 10 parallel pytest
# processes (the GPU suite is bound by Triton compilation + autotuning on the CPU, not by the GPU).
# Usage on the GPU machine: OUT=/some/dir bash run_gpu_checks.sh
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/out/tc}
OUT=${OUT:-out}
mkdir -p "$OUT"
if [ -z "$SKIP_BENCH" ]; then timeout ${BENCH_TIMEOUT:-240} python bench.py > "$OUT/bench.txt" 2>&1; echo "bench rc $?"; fi
groups=("test_lengths and prefill and True" "test_lengths and prefill and False" "test_lengths and decode"
        "unequal and True" "unequal and False" "head_dims and prefill" "head_dims and decode"
        "padding or noncontig or policy" "determin or bad or generation" "cudnn or int64")
pids=()
for i in "${!groups[@]}"; do
  timeout ${TEST_TIMEOUT:-330} python -m pytest -q --tb=short -p no:cacheprovider -k "${groups[$i]}" \
    test_equivalence.py > "$OUT/t$i.log" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do wait ${pids[$i]}; echo "group $i (${groups[$i]}) rc $? $(tail -1 $OUT/t$i.log)"; done
cat "$OUT"/t*.log > "$OUT/tests.log"; rm -f "$OUT"/t[0-9].log
