#!/usr/bin/env bash
# The prepared run for a session that has a CUDA machine (the H200 lease is 15 minutes in all):
#   1. the runtime's CUDA parity tests (real copy stream, events, pinned store vs the CPU reference;
#      hybrimoe with no cache slots runs every prefetch through the staging buffers), the cache
#      computing from copied int8/int4 bytes, continuous batching on CUDA (joins, chunked prefill,
#      cancel; plain, hybrimoe and ktransformers) and int8/int4 dense linears on CUDA;
#   2. a calibrated cost profile of the machine (`hybrimoe calibrate`, DeepSeek-V2-Lite expert shape);
#   3. benchmarks/bench_policies_gpu.py: dummy DeepSeek-V2-Lite bf16 weights, a replayed real trace,
#      prefill time and decode tokens/s per policy with the all-resident bound, measured next to the
#      cost model's prediction for the same plans.
# Everything lands in $OUT (default out/device). Usage on the device tool:
#   run(command="bash benchmarks/device_check.sh", timeout_s=540)
# The step timeouts (30 + 180 + 100 + 220 s) add up to 530 s, inside that limit; the benchmark writes its
# JSON after every policy, so a benchmark stopped by its timeout still leaves the policies it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() { echo "== $(date -u +%H:%M:%S) $*"; }

step environment
timeout 30 $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')" | tee "$OUT/env.txt"

step cuda parity tests
timeout 180 $PY -m pytest -q -p no:cacheprovider --continue-on-collection-errors tests/test_runtime_parity.py tests/test_format_parity.py \
    tests/test_batch_parity.py tests/test_dense_cuda.py -k cuda \
    2>&1 | tee "$OUT/cuda_tests.log"

step calibrate
timeout 100 $PY -m hybrimoe calibrate --model-shape deepseek-v2-lite --dtype bf16 --device cuda \
    --out "$OUT/calibrated.json" 2>&1 | tail -n 8 | tee "$OUT/calibrate.log"

step policies benchmark
profile=()
[ -f "$OUT/calibrated.json" ] && profile=(--predict-profile "$OUT/calibrated.json")
timeout 220 $PY benchmarks/bench_policies_gpu.py --device cuda --dtype bf16 "${profile[@]}" \
    --out "$OUT/bench_policies_gpu.json" 2>&1 | tee "$OUT/bench.log"
step done
