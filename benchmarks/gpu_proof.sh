#!/usr/bin/env bash
# GPU proof of the README's commands (random-init weights: no download) and the stance-battery benchmark.
# Run on a GPU machine from the repo root; OUT is where logs go (default /tmp/lbt-proof).
#   bash benchmarks/gpu_proof.sh            # SKIP_BATTERY=1: without the stance-battery benchmark
set -uo pipefail
OUT=${OUT:-/tmp/lbt-proof}
mkdir -p "$OUT"
export WANDB_MODE=offline HYDRA_FULL_ERROR=1
common=(model.random_init=true hardware=gpu logger=csv eval=none probe=none)
run() {  # name, overrides...
  local name=$1; shift
  local t0=$SECONDS
  if python -m lbt.train "$@" hydra.run.dir="$OUT/jobs/$name" > "$OUT/$name.log" 2>&1; then
    echo "ok   $name ($((SECONDS - t0)) s): $(python -c "import json,sys; r=json.load(open(sys.argv[1])); \
print(r['job'], 'steps', r['data']['total_steps'], 'tokens/s', r['tokens_per_s'], 'loss', round(r['final_loss'], 4))" \
      "$OUT/jobs/$name/run.json")"
  else
    echo "FAIL $name ($((SECONDS - t0)) s)"; tail -20 "$OUT/$name.log"
  fi
}
run qwen_minus_s1 model=qwen arm=minus seed=1 "${common[@]}"
run llama_local_path model=llama model.path=/models/Llama-3.2-3B-Instruct "${common[@]}"
run qwen_dry_run model=qwen train.max_steps=20 "${common[@]}"
run paper_qwen_plus experiment=paper model=qwen arm=plus seed=0 "${common[@]}"
ls "$OUT/jobs/qwen_minus_s1" "$OUT/jobs/qwen_minus_s1/checkpoints"
[ -n "${SKIP_BATTERY:-}" ] && exit 0   # SKIP_BATTERY=1: the README commands only
python benchmarks/eval_battery.py --model qwen --random-init --device cuda ${ITEMS:+--items "$ITEMS"} \
  --json "$OUT/eval_battery_h100.json" 2>&1 | grep -v -i warn | tail -25
