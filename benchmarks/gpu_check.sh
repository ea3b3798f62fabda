#!/usr/bin/env bash
# One prepared GPU check (issue 13). On the GPU machine (no network; torch + Triton there):
#   bash benchmarks/gpu_check.sh            # everything under $OUT (default ./gpu_check_out), < 8 min
#   bash benchmarks/gpu_check.sh --dry-run  # CPU-side parts at tiny sizes (CI), ~20 s
# Steps, each with its own time limit and all within one budget (GPU_CHECK_BUDGET_S, default
# 460 s): a step that fails or runs out of time is noted and the next one runs.
#   build            the package in place without network (no dependency resolution)
#   cuda_tests_1/2   the CUDA / Triton tests twice, compared (races show as results that move)
#   nb_table         benchmarks/bench_triton_gpu.py: NB Triton vs eager vs torch.compile of the
#                    eager and the sparsity-aware forms (triton.testing.do_bench), the training
#                    shape (5, 512, G) with counts shared by the particles, B x G up to
#                    25,600 x 8,000, G = 7,993 (not a multiple of 16), bytes moved and the
#                    fraction of a device-to-device copy measured in the same run; the encoder
#                    op and the decoder head; masked_embedding_sum
#   bench_step       samsvae bench --device cuda at 8,000 genes x 10,000 perturbations and
#   bench_small      1,187 x 722: fused vs reference, IWELBO per cell at 100 particles
#   train, evaluate  a short samsvae train / evaluate --device cuda
#   load_on_cpu      SAMSVAE.load(run_dir, adata, map_location="cpu") evaluated on the CPU to
#                    the GPU's metrics within Monte Carlo noise (benchmarks/gpu_check_cpu_load.py)
#   evaluate_on_cpu  samsvae evaluate --device cpu of the same run
# A short table is printed last; exit 1 when a step failed or was skipped.
# --dry-run: CPU device, tiny sizes, the Triton benchmark under TRITON_INTERPRET=1, no build
# and no tests (CI runs them itself).
set -u
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-$PWD/gpu_check_out}"; mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
PY="${PYTHON:-python}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUDGET="${GPU_CHECK_BUDGET_S:-460}"
DEADLINE=$((SECONDS + BUDGET))
ROWS="$OUT/.rows"; rm -rf "$ROWS"; mkdir -p "$ROWS"
ORDER=(build cuda_tests_1 nb_table bench_step bench_small simulate train evaluate load_on_cpu
       evaluate_on_cpu cuda_tests_2 cuda_tests_repeat)
row() { printf '%-18s %-7s %s\n' "$1" "$2" "$3" >"$ROWS/$1"; }  # a file per step: steps may run side by side
run() {  # run NAME LIMIT_S CMD...: log to $OUT/NAME.log, record ok / FAIL / SKIP
  local name="$1" limit="$2"; shift 2
  local left=$((DEADLINE - SECONDS)) t0=$SECONDS rc
  if [ "$left" -lt 5 ]; then row "$name" SKIP "budget of ${BUDGET} s spent"; return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1; rc=$?
  if [ $rc = 0 ]; then row "$name" ok "$((SECONDS - t0)) s"; return 0; fi
  if [ $rc = 124 ] || [ $rc = 137 ]; then row "$name" FAIL "timed out after ${limit} s, see $name.log"
  else row "$name" FAIL "exit $rc after $((SECONDS - t0)) s, see $name.log"; fi
  return 1
}
if [ $DRY = 1 ]; then
  DEV=cpu; G=37; T=6; B=16; K=0; STEPS=1; CELLS=200; LAT=4; HID=16; MINC=1
  NB_ARGS=(--device cpu --cases 2x6x37 --zero-fractions 0.9 --no-compile --copy-mib 1
           --hidden 8 --no-embedding)  # the embedding kernels: tests/ops, tests/test_triton_bench_script.py
  export TRITON_INTERPRET=1  # only the nb_table step imports triton
else
  DEV=cuda; G=8000; T=10000; B=512; K=100; STEPS=20; CELLS=4000; LAT=10; HID=128; MINC=1
  NB_ARGS=(--device cuda --cases 5x512x8000 1x2560x8000 1x25600x8000 5x512x7993
           --zero-fractions 0.9 --quick --compile-max-elements 3e7)
  # build without network: the extension from the tree as copied, no dependency resolution
  run build 150 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
  TESTS=(tests/ops tests/models/test_models_gpu_path.py)
  run cuda_tests_1 75 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" -k "cuda or triton"
fi
kernels() {  # the Triton table and the step benchmark (no dependence on the training run)
  run nb_table 150 "$PY" "$HERE/bench_triton_gpu.py" "${NB_ARGS[@]}" --no-csv \
    --out "$OUT/nb_table.json"
  grep -E "^(\||#|device-to-device|$)" "$OUT/nb_table.log" >"$OUT/nb_table.md" 2>/dev/null
  run bench_step 60 "$PY" -m samsvae bench --device $DEV --genes $G --perturbations $T \
    --cells-per-batch $B --steps $STEPS --warmup 1 --iwelbo-particles $K --iwelbo-cells 16 \
    $([ $DRY = 1 ] && echo "--latent 4 --hidden 16 --particles 2") \
    --backends reference,auto --json "$OUT/bench_step.json"
}
# the dry run checks code, not figures: the kernels group runs beside the training run there
if [ $DRY = 1 ]; then kernels & KPID=$!; else kernels; fi
if [ $DRY = 0 ]; then
  run bench_small 40 "$PY" -m samsvae bench --device cuda --genes 722 --perturbations 1187 \
    --steps $STEPS --iwelbo-particles $K --iwelbo-cells 64 --backends reference,auto \
    --json "$OUT/bench_small.json"
fi
run simulate 20 "$PY" -m samsvae simulate "$OUT/screen.h5ad" --cells $CELLS --genes $G \
  --perturbations 12
run train 60 "$PY" -m samsvae train "$OUT/screen.h5ad" --out "$OUT/run" --device $DEV \
  --max-steps 30 --batch-size 64 --latent $LAT --hidden $HID --no-progress
EVAL=(--iwelbo-particles 20 --ate-particles 50 --min-cells $MINC)
run evaluate 40 "$PY" -m samsvae evaluate "$OUT/run" --device $DEV "${EVAL[@]}" && \
  cp "$OUT/run/metrics.json" "$OUT/metrics_$DEV.json"
run load_on_cpu 40 "$PY" "$HERE/gpu_check_cpu_load.py" "$OUT/run" "$OUT/screen.h5ad" \
  "$OUT/metrics_$DEV.json" "${EVAL[@]}" --out "$OUT/metrics_cpu_loaded.json"
[ $DRY = 1 ] && wait "$KPID"
if [ $DRY = 0 ]; then  # (in the dry run the device is the CPU already)
  run evaluate_on_cpu 40 "$PY" -m samsvae evaluate "$OUT/run" --device cpu "${EVAL[@]}"
  run cuda_tests_2 75 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" -k "cuda or triton"
  if [ -f "$OUT/cuda_tests_1.log" ] && [ -f "$OUT/cuda_tests_2.log" ]; then
    if diff <(grep -E "passed|failed|error" "$OUT/cuda_tests_1.log" | sed 's/ in [0-9.]*s.*//') \
            <(grep -E "passed|failed|error" "$OUT/cuda_tests_2.log" | sed 's/ in [0-9.]*s.*//') \
            >"$OUT/cuda_tests_repeat.diff"
    then row cuda_tests_repeat ok same; else row cuda_tests_repeat FAIL "results moved"; fi
  fi
fi
echo
[ -s "$OUT/nb_table.md" ] && { echo "== NB forward+backward, ms (all tables: nb_table.md)"; \
  awk '/^## nb_log_prob/{on=1; next} /^##/{on=0} on && (/^\| P/ || /fwd\+bwd/)' "$OUT/nb_table.md"; }
[ -s "$OUT/load_on_cpu.log" ] && { echo "== GPU run evaluated on the CPU"; cat "$OUT/load_on_cpu.log"; }
echo "== gpu_check ($DEV$([ $DRY = 1 ] && echo ', dry run')) -> $OUT  ($SECONDS s)"
printf '%-18s %-7s %s\n' step result detail
for name in "${ORDER[@]}"; do [ -f "$ROWS/$name" ] && cat "$ROWS/$name"; done
! grep -qE " (FAIL|SKIP) " "$ROWS"/* 2>/dev/null
