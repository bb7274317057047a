#!/usr/bin/env bash
# Issue 15's measurements on the device machine, in stages that each fit one call's 600 s (run from the root of a
# snapshot of the repository, with PYTHONPATH holding <snapshot>/src; results go to the device tool's $OUT).
#   bash benchmarks/speed_device.sh train           # train_throughput: naive, then the variants in VARIANTS
#                                                   # (default mb16-fce, the GPU default; -irng and -cdt were
#                                                   # measured and not adopted: benchmarks/RESULTS.md), each
#                                                   # graph kind primed; profile with the GPU's idle time per
#                                                   # region of the step                          ~130 s (~260 s with 3)
#   bash benchmarks/speed_device.sh warm B          # a 12-step job fills the sweep's caches, then a later job   ~330 s
#   bash benchmarks/speed_device.sh B nofreeze      # a later job, then one with hardware.fast.freeze_heap=false ~380 s
#   EXTRA="hardware.eval_batch_size=1024" bash benchmarks/speed_device.sh B Bx   # a later job, then one with the
#                                                   # overrides in EXTRA (space-separated)                 ~380 s
#   EXTRA="hardware.fast.fold_lora=true" bash benchmarks/speed_device.sh warmx Bx   # the same for overrides that
#                                                   # change the compiled layers: warmx is `warm` with EXTRA, so
#                                                   # that Bx loads its layers from the cache as B does  ~320 s
#   ITEMS=<reference>/target_items.jsonl bash benchmarks/speed_device.sh battery   # the 54 published items   ~40 s
#   BATTERY_VARIANTS="--gc normal --fused-norm off on" ITEMS=... bash benchmarks/speed_device.sh battery   # the
#                                                   # battery's variants (default: --gc normal frozen; also
#                                                   # --sdpa-gqa off on, hardware.fast.sdpa_gqa)
# Stages run in the order given. `warm` leaves base, directions and compiled layers in /tmp/lbt-cache, as a
# sweep's first job does; the later jobs need it on the same (warm) machine. Every job runs with
# benchmarks/step_profile.py, which logs each step's time (and the part inside training_step), the full garbage
# collections, and, with STEP set, a CPU+GPU profile of steps STEP and STEP+1 (60 has no phase near it; a phase
# in a profiled step makes the profile huge).
set -uo pipefail
dest=${OUT:?OUT is the device tool\'s folder}
export PYTHONPATH=${PYTHONPATH:-}:$PWD/benchmarks PYTHONUNBUFFERED=1
cache=/tmp/lbt-cache
# No profiler unless STEP is set: its teardown (about 15 s) would count in the job's wall time.
profile=(+callbacks.steps._target_=step_profile.StepProfile "+callbacks.steps.profile_from=${STEP:-0}"
         "+callbacks.steps.profile_steps=$([ -n "${STEP:-}" ] && echo 2 || echo 0)")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for stage in "$@"; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    train)
      python3 benchmarks/train_throughput.py --model qwen --steps 8 --warmup 3 --naive-micro-batch 8 \
        --variants "${VARIANTS:-mb16-fce}" --profile --out "$dest/tt" 2>&1 | grep -v Warning \
        > "$dest/train_throughput.log"
      rm -rf "$dest/tt/adapter"
      grep -E "priming|lbt path|step [0-9]|profiled step|GPU idle" "$dest/train_throughput.log" ;;
    battery)
      read -ra variants <<< "${BATTERY_VARIANTS:---gc normal frozen}"
      python3 benchmarks/eval_battery.py --model qwen --random-init --device cuda --batch-size 512 --decode graph \
        --share-prefix on "${variants[@]}" --skip-reference --items "${ITEMS:?ITEMS names target_items.jsonl}" \
        --profile --repeats 5 --json "$dest/battery54.json" 2>&1 | grep -v Warn > "$dest/battery.log"
      grep -E "^battery|^profile|^fused_norm|vs |GPU kernel" "$dest/battery.log" ;;
    warm|warmx)
      # The same callbacks as the later jobs: they are part of the shared base's key (lbt.eval.base_cache).
      # 12 steps, short of the first epoch's short last step (44): before its micro-batches were filled to full
      # rows, its smaller batch compiled once more, and a later job after this warm job compiled it itself (24 s
      # inside its step 44, benchmarks/RESULTS.md); a fast step 44 in the later job shows that it no longer does.
      extra=()
      [ "$stage" = warmx ] && read -ra extra <<< "${EXTRA:?EXTRA holds the overrides of the warmx job}"
      LIMIT=230 bash benchmarks/full_job_device.sh "$stage" paths.cache_dir=$cache train.max_steps=12 \
        "train.checkpoint_fractions=[1.0]" "${extra[@]}" "${profile[@]}" > /dev/null
      grep -E "done:|Traceback" "/tmp/lbt-full-job-$stage/job.log" | tail -2 ;;
    B)
      LIMIT=280 bash benchmarks/full_job_device.sh B paths.cache_dir=$cache "${profile[@]}" | grep -v "^-\|^d\|^total"
      grep step_profile /tmp/lbt-full-job-B/job.log | grep -E "steps:|collections|profiled" ;;
    nofreeze)
      LIMIT=280 bash benchmarks/full_job_device.sh nofreeze paths.cache_dir=$cache hardware.fast.freeze_heap=false \
        "${profile[@]}" | grep -v "^-\|^d\|^total"
      grep step_profile /tmp/lbt-full-job-nofreeze/job.log | grep -E "steps:|collections|profiled" ;;
    Bx)
      read -ra extra <<< "${EXTRA:?EXTRA holds the overrides of the Bx job}"
      echo "Bx overrides: ${extra[*]}"
      LIMIT=280 bash benchmarks/full_job_device.sh Bx paths.cache_dir=$cache "${extra[@]}" "${profile[@]}" \
        | grep -v "^-\|^d\|^total"
      grep step_profile /tmp/lbt-full-job-Bx/job.log | grep -E "steps:|collections|profiled" ;;
    *) echo "unknown stage $stage (train, battery, warm, warmx, B, Bx, nofreeze)"; exit 2 ;;
  esac
done
echo "== end $(date -u +%H:%M:%S)"
