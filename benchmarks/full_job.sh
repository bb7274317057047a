#!/usr/bin/env bash
# One whole job of the study's matrix, timed end to end on one GPU: random-init Qwen2.5-3B, a corpus with
# the shipped corpora's length distribution replicated to 3,000 examples, 2 epochs, evaluation (stance
# battery on source + target items, capability checks) at base + 4 checkpoints + final, probes.
#   bash benchmarks/full_job.sh            # OUT=/tmp/lbt-full-job by default
set -euo pipefail
OUT=${OUT:-/tmp/lbt-full-job}
mkdir -p "$OUT"
python - "$OUT/corpus3000.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open("data/corpora/frame_plus.jsonl")]
with open(sys.argv[1], "w") as out:
    for i in range(3000):
        r = dict(records[i % len(records)], id=f"rep{i:04d}-{records[i % len(records)]['id']}")
        out.write(json.dumps(r) + "\n")
PY
export WANDB_MODE=offline HYDRA_FULL_ERROR=1
t0=$SECONDS
python -m lbt.train model=qwen model.random_init=true hardware=gpu logger=csv arm.corpus="$OUT/corpus3000.jsonl" \
  data.require_validation=false hydra.run.dir="$OUT/job" "$@" > "$OUT/job.log" 2>&1 || { tail -40 "$OUT/job.log"; exit 1; }
echo "wall $((SECONDS - t0)) s"
python - "$OUT/job" <<'PY'
import json, os, sys
from pathlib import Path
job = Path(sys.argv[1])
card = json.loads((job / "run.json").read_text())
print("steps", card["data"]["total_steps"], "train examples", card["data"]["n_train"], "run.json wall",
      card["wall_time_s"], "train tokens/s", card["tokens_per_s"], "final loss", round(card["final_loss"], 4))
marks = sorted((p.stat().st_mtime, str(p.relative_to(job))) for p in job.rglob("*")
               if p.is_file() and (p.name in ("summary.json", "capability.json") or p.parent.name == "probe"))
for t, name in marks:
    print(f"{t - marks[0][0]:8.1f} s  {name}")
PY
grep -E "directions|phase|took" "$OUT/job.log" | grep -v -i warn | tail -30 || true
