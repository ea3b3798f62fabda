#!/usr/bin/env bash
# The README's results table: the eight (model, guide) rows trained with the same step budget on
# one screen, then evaluated. Usage:
#   [ROWS="model:guide ..."] bash benchmarks/model_table.sh DATA.h5ad OUT_DIR STEPS "extra train args"
# e.g.
#   bash benchmarks/model_table.sh ../shared/data/norman2019_k562_crispra.h5ad runs/norman 1000 "--split ood_combinations"
set -euo pipefail
data=$1; out=$2; steps=$3; extra=${4:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$out"
rows=${ROWS:-"cvae:mean_field svae_plus:mean_field cpa_vae:mean_field cpa_vae:corr_basal sams_vae:mean_field sams_vae:corr_embedding sams_vae:corr_basal sams_vae:corr_both"}
for row in $rows; do
  model=${row%%:*}; guide=${row##*:}
  run="$out/${model}_${guide}"
  rm -rf "$run"
  python -m samsvae train "$data" --out "$run" --model "$model" --guide "$guide" \
      --max-steps "$steps" --lr 1e-3 --val-every 100 --no-progress --seed 0 $extra > "$run.train.log" 2>&1
  if ! python -m samsvae evaluate "$run" --iwelbo-particles 100 --ate-particles 1000 > "$run.eval.log" 2>&1; then
    echo "| $model | $guide | not evaluable: $(tail -n 1 "$run.eval.log" | sed 's/.*error: //') |"
    continue
  fi
  python - "$run" "$model" "$guide" <<'PY'
import json, sys
m = json.load(open(sys.argv[1] + "/metrics.json"))
f1 = m.get("mask_f1")
print(f"| {sys.argv[2]} | {sys.argv[3]} | {m['test_iwelbo']:.2f} | {m['ate_pearson']:.3f} | "
      f"{m['ate_pearson_top20']:.3f} | {'-' if f1 is None else f'{f1:.3f}'} |", flush=True)
PY
done
