#!/usr/bin/env bash
# GPU proof of the scale-out layer (issue 7), on one machine with 2 GPUs:
#   1. one 2-GPU DDP job (hardware=multi_gpu), its two ranks started from outside by torchrun, as SLURM
#      starts them (Lightning does not re-execute the command line);
#   2. a 2-job sweep through hydra/launcher=local_gpus: both jobs at once, one GPU each.
# Both train a random-init Qwen2.5-3B (no download) for 5 optimizer steps.
#
#   bash benchmarks/multi_gpu_proof.sh [OUT_DIR]          # default outputs/multi_gpu_proof
#   EXTRA="hardware.fast.compile_layers=true" bash benchmarks/multi_gpu_proof.sh    # with per-layer torch.compile
#
# PYTHON picks the interpreter (default python3). OUT_DIR must not hold an earlier proof: finished jobs
# are skipped, by design. A logic check on a CPU machine (gloo ranks, the tiny model):
#   MODEL="model=tiny" DDP_HW="hardware=cpu hardware.devices=2 hardware.strategy=ddp" \
#   ONE_HW="hardware=cpu hydra.launcher.max_parallel=2" bash benchmarks/multi_gpu_proof.sh /tmp/proof
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-outputs/multi_gpu_proof}
PY=${PYTHON:-python3}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
read -r -a MODEL_ARGS <<< "${MODEL:-model=qwen model.random_init=true}"
read -r -a DDP_ARGS <<< "${DDP_HW:-hardware=multi_gpu}"
read -r -a ONE_ARGS <<< "${ONE_HW:-hardware=gpu}"
COMMON=("${MODEL_ARGS[@]}" train.max_steps=5 train.effective_batch=16 eval=none probe=none logger=csv
        data.require_validation=false "train.checkpoint_fractions=[0.4,1.0]" "${EXTRA_ARGS[@]}")
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
nvidia-smi -L || echo "(no nvidia-smi)"
"$PY" -c "import torch, lightning; print('torch', torch.__version__, '| lightning', lightning.__version__, \
'| visible GPUs', torch.cuda.device_count())"

echo
echo "== 1. DDP: torchrun --standalone --nproc_per_node=2 -m lbt.train ${DDP_ARGS[*]} ${COMMON[*]}"
start=$(date +%s)
"$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m lbt.train "${DDP_ARGS[@]}" \
    "${COMMON[@]}" arm=plus seed=0 "hydra.run.dir=$OUT_DIR/ddp" > "$OUT_DIR/ddp.log" 2>&1 \
    || { tail -50 "$OUT_DIR/ddp.log"; exit 1; }
echo "wall: $(( $(date +%s) - start )) s (model build included)"
grep -E "Initializing distributed|MEMBER|done:" "$OUT_DIR/ddp.log" | sed 's/^/  /' || true

echo
echo "== 2. sweep: python -m lbt.train -m hydra/launcher=local_gpus ${ONE_ARGS[*]} arm=plus,minus ${COMMON[*]}"
start=$(date +%s)
"$PY" -m lbt.train -m hydra/launcher=local_gpus "${ONE_ARGS[@]}" "${COMMON[@]}" arm=plus,minus seed=0 \
    sweep_name=proof "hydra.sweep.dir=$OUT_DIR/sweep" > "$OUT_DIR/sweep.log" 2>&1 \
    || { tail -50 "$OUT_DIR/sweep.log"; find "$OUT_DIR/sweep/.submitit" -name '*.err' -exec tail -30 {} \; ; exit 1; }
echo "wall: $(( $(date +%s) - start )) s"
grep -E "local_gpus|#[0-9]+ :" "$OUT_DIR/sweep.log" | sed 's/^/  /' || true

echo
echo "== what ran"
"$PY" - "$OUT_DIR" <<'EOF'
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
spans = {}
for job in [out / "ddp", *sorted(p for p in (out / "sweep").glob("*-s*") if p.is_dir())]:
    card = json.loads((job / "run.json").read_text())
    log = (job / "train.log").read_text() if (job / "train.log").exists() else ""
    gpu = re.findall(r"this job runs on GPU (\S+)", log)
    end = (job / "DONE").stat().st_mtime            # DONE is written last; wall_time_s counts from job start
    spans[job.name] = (end - card["wall_time_s"], end)
    print(f"{job.parent.name}/{job.name}: status={card['status']} DONE={(job / 'DONE').exists()} "
          f"devices={card['config']['hardware']['devices']} strategy={card['config']['hardware']['strategy']} "
          f"steps={card['data']['total_steps']} final_loss={card['final_loss']:.4f} "
          f"tokens/s={card['tokens_per_s']} wall={card['wall_time_s']} s"
          + (f" GPU={gpu[0]}" if gpu else "")
          + f" adapters={sorted(p.name for p in (job / 'checkpoints').glob('adapter_step_*'))}")
sweep = [v for k, v in spans.items() if k != "ddp"]
if len(sweep) == 2:
    overlap = min(e for _, e in sweep) - max(s for s, _ in sweep)
    print(f"sweep jobs overlapped for {overlap:.0f} s of their {max(e - s for s, e in sweep):.0f} s (> 0: in parallel)")
EOF
