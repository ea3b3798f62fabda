#!/usr/bin/env bash
# One prepared GPU check (issue 13). On the GPU machine (no network; torch + Triton there):
#   bash benchmarks/gpu_check.sh            # everything under $OUT (default ./gpu_check_out), < 8 min
#   bash benchmarks/gpu_check.sh --dry-run  # CPU-side parts at tiny sizes (CI), ~20 s
# Steps: build the package in place without network; CUDA tests twice, compared (races show
# as results that move); NB / encoder / head / step timings (samsvae bench --device cuda,
# Triton vs reference, IWELBO per cell at 100 particles); a short train/evaluate on cuda, then
# the model loaded on the CPU and evaluated there. A short table is printed last.
set -u
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-$PWD/gpu_check_out}"; mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
PY="${PYTHON:-python}"
declare -a ROWS=()
row() { ROWS+=("$(printf '%-34s %-6s %s' "$1" "$2" "$3")"); }
run() {  # run NAME LIMIT_S CMD...: log to $OUT/NAME.log, record pass/fail
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then row "$name" ok "$((SECONDS - t0)) s"
  else row "$name" FAIL "$((SECONDS - t0)) s, see $name.log"; fi
}
if [ $DRY = 1 ]; then
  DEV=cpu; G=40; T=6; B=16; K=4; STEPS=2; CELLS=200
else
  DEV=cuda; G=8000; T=10000; B=512; K=100; STEPS=20; CELLS=4000
  # build without network: the extension from the tree as copied, no dependency resolution
  run build 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
  run cuda_tests_1 150 "$PY" -m pytest -q -p no:cacheprovider tests/ops tests/models/test_models_gpu_path.py -k "cuda or triton"
  run cuda_tests_2 150 "$PY" -m pytest -q -p no:cacheprovider tests/ops tests/models/test_models_gpu_path.py -k "cuda or triton"
  if diff <(grep -E "passed|failed" "$OUT/cuda_tests_1.log") <(grep -E "passed|failed" "$OUT/cuda_tests_2.log") >/dev/null
  then row cuda_tests_repeat ok same; else row cuda_tests_repeat FAIL "results moved"; fi
fi
TF=""; [ $DEV = cuda ] && TF=""
run bench_step 200 "$PY" -m samsvae bench --device $DEV --genes $G --perturbations $T \
  --cells-per-batch $B --steps $STEPS --warmup 1 --iwelbo-particles $K --iwelbo-cells 16 \
  --backends reference,auto --json "$OUT/bench_step.json"
if [ $DRY = 0 ]; then
  run bench_small 120 "$PY" -m samsvae bench --device cuda --genes 722 --perturbations 1187 \
    --steps $STEPS --iwelbo-particles 0 --backends reference,auto \
    --json "$OUT/bench_small.json"
fi
"$PY" -m samsvae simulate --help >/dev/null 2>&1 && \
run simulate 60 "$PY" -m samsvae simulate "$OUT/screen.h5ad" --cells $CELLS --genes $G --perturbations 12
run train 150 "$PY" -m samsvae train "$OUT/screen.h5ad" --out "$OUT/run" --device $DEV \
  --max-steps 30 --batch-size 64 --latent 8 --hidden 32 --no-progress
run evaluate 120 "$PY" -m samsvae evaluate "$OUT/run" --device $DEV --iwelbo-particles 20 --ate-particles 50
cp "$OUT/run/metrics.json" "$OUT/metrics_$DEV.json" 2>/dev/null
run evaluate_on_cpu 120 "$PY" -m samsvae evaluate "$OUT/run" --device cpu --iwelbo-particles 20 --ate-particles 50
run same_metrics_cpu 30 "$PY" -c "
import json, sys
a = json.load(open('$OUT/metrics_$DEV.json')); b = json.load(open('$OUT/run/metrics.json'))
d = abs(a['test_iwelbo'] - b['test_iwelbo'])
print('test_iwelbo', a['test_iwelbo'], b['test_iwelbo'], 'diff', d)
sys.exit(0 if d < 0.05 * abs(a['test_iwelbo']) + 1.0 else 1)"
echo
echo "== gpu_check ($DEV$([ $DRY = 1 ] && echo ', dry run')) -> $OUT"
printf '%-34s %-6s %s\n' step result detail
printf '%s\n' "${ROWS[@]}"
for r in "${ROWS[@]}"; do case "$r" in *" FAIL "*) exit 1;; esac; done
exit 0
