#!/usr/bin/env bash
# Issue 17: the whole study on one host with 4 GPUs, timed. 18 jobs (model=qwen,llama x arm=plus,minus,neutral
# x seed=0,1,2, random-init weights) through hydra/launcher=local_gpus, one GPU per job, four at a time, every
# callback on (experiment=paper); then `python -m lbt.analyze <sweep dir> --exploratory` (target items scored
# without the preregistration lock: no prereg-lock needed, stamped on every output) and `python -m lbt.check
# <sweep dir>`. Run from the root of a snapshot of the repository (PYTHONPATH holding <snapshot>/src); a
# compact summary goes to the device tool's $OUT: study.txt (card, date, command, the times, the per-job table
# and overlap), report.json (benchmarks/study_report.py), sweep.log (the launcher's log, tail), analysis.txt,
# check.txt, failures.txt (only when a job failed).
#   bash benchmarks/study_device.sh
# The sweep (~15 min) outlasts one device call (600 s): it runs detached (setsid) with its own clock in
# $STATE, and one call waits for it at most WAIT s. Call the same command again while the machine is still
# warm (its idle window is 30 s; a fresh machine has lost the sweep); the call in which the sweep has ended
# runs the analysis, the check and the report. Exit 0: all done and complete; 3: the sweep is still running
# (call again); 2: refused before the sweep (a sweep dir from an earlier run, a missing package); 1: a part
# failed (the last line of study.txt says which).
# Knobs: SWEEP (sweep_name, default study4), MODELS (qwen,llama), HW (hardware=gpu), EXTRA (more overrides,
# space-separated), JOBS_PER_GPU (hydra.launcher.jobs_per_gpu, default 1: jobs sharing one GPU), LIMIT (the
# sweep's timeout in s, default 1500), WAIT (s one call waits, default 480),
# LBT_MAX_PARALLEL (jobs at once; default one per GPU), SWEEP_DIR (hydra.sweep.dir; default Hydra's own,
# multirun/$SWEEP), STATE (default /tmp/lbt-study-$SWEEP: the sweep's shared caches as paths.cache_dir, its
# log and clock; to start over, remove it and the sweep dir). W&B runs offline (WANDB_MODE); where wandb is
# not installed the jobs log with logger=csv and the analysis runs --no-wandb, and study.txt says so.
# A logic check on a CPU machine (the tiny model: 9 jobs, 2 at a time, 2 steps each, the quick battery, the
# base phase shared as on a GPU):
#   OUT=/tmp/study-out SWEEP=study-cpu SWEEP_DIR=/tmp/study-cpu/sweep MODELS=tiny HW="hardware=cpu" \
#   LBT_MAX_PARALLEL=2 EXTRA="model.dtype=null eval=quick train.max_steps=2 train.effective_batch=16 \
#   train.max_length=384 train.checkpoint_fractions=[0.5,1.0] hardware.fast.share_base=true" \
#   bash benchmarks/study_device.sh
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${OUT:?OUT is the device tool\'s folder}
sweep=${SWEEP:-study4}
state=${STATE:-/tmp/lbt-study-$sweep}
sweep_dir=${SWEEP_DIR:-multirun/$sweep}
models=${MODELS:-qwen,llama}
expect=$(($(tr ',' '\n' <<< "$models" | grep -c .) * 9))   # x 3 arms x 3 seeds
per_gpu=${JOBS_PER_GPU:-1}
read -ra hw <<< "${HW:-hardware=gpu}"
read -ra extra <<< "${EXTRA:-}"
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# The sweep's command is `python -m lbt.train`; the image has python3 only, and a symlink to a venv's python3
# loses the venv.
if ! command -v python >/dev/null; then
  mkdir -p /tmp/pybin
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > /tmp/pybin/python
  chmod +x /tmp/pybin/python
  export PATH=/tmp/pybin:$PATH
fi
mkdir -p "$state"

missing_modules() {  # those of the modules named that are not installed
  python - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}

versions() {
  python -c "import torch, transformers, peft, lightning
print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__,
      '| lightning', lightning.__version__, '| visible GPUs', torch.cuda.device_count())" 2>/dev/null
}

start_sweep() {
  if [ -n "$(ls -A "$sweep_dir" 2>/dev/null)" ]; then
    echo "refused: $sweep_dir exists from an earlier run: its finished jobs would be skipped and the"
    echo "wall time would not be the sweep's. Remove it, or pick another SWEEP."
    return 2
  fi
  local missing logger=()
  missing=$(missing_modules hydra omegaconf submitit hydra_plugins.hydra_submitit_launcher lightning peft \
    transformers sklearn scipy)
  if [ -n "$missing" ]; then
    echo "refused: not importable here: $missing (carry their wheels: the device tool's README)"
    return 2
  fi
  rm -rf "$state"/cache "$state"/sweep.* "$state"/analysis.* "$state"/{check.txt,no_wandb,notes}
  if [ -n "$(missing_modules wandb)" ]; then
    logger=(logger=csv)
    echo "NOTE: wandb is not installed: the jobs log with logger=csv, the analysis runs --no-wandb" \
      > "$state/no_wandb"
  fi
  [ -z "$(missing_modules matplotlib)" ] \
    || echo "WARNING: matplotlib is not installed: the analysis (its figures) will fail" > "$state/notes"
  local cmd=(python -m lbt.train -m hydra/launcher=local_gpus "hydra.launcher.jobs_per_gpu=$per_gpu"
             experiment=paper "model=$models"
             arm=plus,minus,neutral seed=0,1,2 model.random_init=true "${hw[@]}" "sweep_name=$sweep"
             "paths.cache_dir=$state/cache" ${SWEEP_DIR:+"hydra.sweep.dir=$SWEEP_DIR"} "${logger[@]}"
             "${extra[@]}")
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), $(nproc) CPU cores"
    echo "card: $(nvidia-smi -L 2>/dev/null | paste -sd ';' - | grep . || echo '(no nvidia-smi: no GPU)')"
    versions
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || cat COMMIT 2>/dev/null || echo '(unknown)')"
    cat "$state/no_wandb" "$state/notes" 2>/dev/null
    echo "LBT_MAX_PARALLEL=${LBT_MAX_PARALLEL:-(unset: one job per GPU)} LIMIT=${LIMIT:-1500} s"
    echo "command: ${cmd[*]}"
  } > "$state/env.txt" 2>&1
  # Detached, in a session of its own, so that it outlives this call; `timeout` ends its whole process group
  # (the launcher and its submitit jobs) at LIMIT.
  setsid bash -c '
    state=$1 limit=$2; shift 2
    echo $$ > "$state/sweep.pid"
    date +%s.%N > "$state/sweep.start"
    timeout -k 60 "$limit" "$@" > "$state/sweep.log" 2>&1
    rc=$?
    date +%s.%N > "$state/sweep.end"
    echo $rc > "$state/sweep.rc"
  ' study-sweep "$state" "${LIMIT:-1500}" "${cmd[@]}" < /dev/null > /dev/null 2>&1 &
  for _ in $(seq 50); do [ -s "$state/sweep.start" ] && break; sleep 0.2; done
  echo "sweep started: $(date -u +%H:%M:%S)"
}

progress() {
  local done_n started_n start
  done_n=$(find "$sweep_dir" -mindepth 2 -maxdepth 2 -name DONE 2>/dev/null | wc -l)
  started_n=$(find "$sweep_dir" -mindepth 2 -maxdepth 2 -name run.json 2>/dev/null | wc -l)
  start=$(cut -d. -f1 "$state/sweep.start")
  echo "$(date -u +%H:%M:%S) sweep at $(($(date +%s) - start)) s: $done_n/$expect DONE," \
    "$((started_n - done_n)) started and not done"
}

# Waits for the sweep's end, at most until WAIT s after this call's start; 3 if it is still running then.
wait_sweep() {
  local last=-60
  while [ ! -f "$state/sweep.rc" ]; do
    if ! kill -0 "$(cat "$state/sweep.pid" 2>/dev/null)" 2>/dev/null && [ ! -f "$state/sweep.rc" ]; then
      echo "the sweep's runner is gone without an exit status (killed?)"
      date +%s.%N > "$state/sweep.end"
      echo "?" > "$state/sweep.rc"
      break
    fi
    if ((SECONDS >= ${WAIT:-480})); then
      progress
      echo "still running: call again while the machine is warm"
      return 3
    fi
    if ((SECONDS - last >= 60)); then
      progress
      last=$SECONDS
    fi
    sleep 5
  done
}

# The launcher's lines: its start, each job's launch (time, cell, GPU) and its summary of the cells.
launcher_lines() {
  grep -E "local_gpus:|#[0-9]+ :|(done|failed|unfinished|skipped): |sweep: [0-9]+ cells" "$state/sweep.log" \
    | sed -E -e 's/^\[[0-9-]+ ([0-9:]+),[0-9]+\]\[[^]]*\] /  \1 /' \
        -e 's/(#[0-9]+ :).* (model=[^ ]+ arm=[^ ]+ seed=[^ ]+)[^(]*(\(GPU [0-9]+\))?$/\1 \2 \3/'
}

analyse_and_report() {
  local start end rc wall t0 args=() analysis_rc check_rc report_rc
  start=$(cat "$state/sweep.start") end=$(cat "$state/sweep.end") rc=$(cat "$state/sweep.rc")
  wall=$(python -c "print(round($end - $start, 1))")
  echo "== sweep: exit $rc (124: stopped at LIMIT), wall $wall s"
  launcher_lines
  # The analysis once per sweep: a later call prints its result again.
  [ -f "$state/no_wandb" ] && args=(--no-wandb)
  if [ ! -f "$state/analysis.rc" ]; then
    t0=$(date +%s.%N)
    python -m lbt.analyze "$sweep_dir" --exploratory "${args[@]}" > "$state/analysis.log" 2>&1
    echo $? > "$state/analysis.rc"
    python -c "print(round($(date +%s.%N) - $t0, 1))" > "$state/analysis.wall"
  fi
  analysis_rc=$(cat "$state/analysis.rc")
  echo
  echo "== analysis: python -m lbt.analyze $sweep_dir --exploratory ${args[*]}: exit $analysis_rc," \
    "wall $(cat "$state/analysis.wall") s"
  grep -v -i warn "$state/analysis.log" | tail -8
  echo
  if [ -z "$(missing_modules lbt.check)" ]; then
    echo "== check: python -m lbt.check $sweep_dir"
    python -m lbt.check "$sweep_dir" > "$state/check.txt" 2>&1
    check_rc=$?
    cat "$state/check.txt"
    echo "lbt.check exit $check_rc"
  else
    echo "== check: NOT RUN: this snapshot has no lbt.check module" | tee "$state/check.txt"
    check_rc="not run"
  fi
  echo
  echo "== jobs: python benchmarks/study_report.py $sweep_dir --expect $expect --sweep-wall $wall"
  python benchmarks/study_report.py "$sweep_dir" --expect "$expect" --sweep-wall "$wall" --jobs-per-gpu "$per_gpu" \
    --sweep-start "$start" --json "$dest/report.json"
  report_rc=$?
  pack "$rc" "$report_rc"
  echo
  echo "== end $(date -u +%H:%M:%S): sweep exit $rc, analysis exit $analysis_rc, check exit $check_rc," \
    "report exit $report_rc"
  [ "$rc" = 0 ] && [ "$analysis_rc" = 0 ] && [ "$report_rc" = 0 ] \
    && { [ "$check_rc" = 0 ] || [ "$check_rc" = "not run" ]; }
}

pack() {  # what comes back through $OUT (at most 8 files); $1, $2: the sweep's and the report's exit
  tail -n 400 "$state/sweep.log" > "$dest/sweep.log"
  {
    cat "$state/analysis.log"
    for report in "$sweep_dir"/analysis*/report.md; do
      [ -f "$report" ] && { echo "== $report"; head -c 200000 "$report"; }
    done
  } > "$dest/analysis.txt" 2>/dev/null
  cp "$state/check.txt" "$dest/check.txt"
  if [ "$1" != 0 ] || [ "$2" != 0 ]; then
    for job in "$sweep_dir"/*/; do
      [ -f "$job/DONE" ] || [ ! -f "$job/train.log" ] || { echo "== $job"; tail -n 30 "$job/train.log"; }
    done > "$dest/failures.txt"
    grep -l -E "Traceback|Error" "$sweep_dir"/.submitit/*/*.err 2>/dev/null | head -4 \
      | while read -r err; do echo "== $err"; tail -n 30 "$err"; done >> "$dest/failures.txt"
    [ -s "$dest/failures.txt" ] || rm -f "$dest/failures.txt"
  fi
}

main() {
  echo "== issue 17: the study sweep ($(date -u +%H:%M:%S)); state in $state, sweep dir $sweep_dir"
  if [ ! -f "$state/sweep.start" ]; then
    start_sweep || return $?
  else
    echo "the sweep started at $(date -u -d "@$(cut -d. -f1 "$state/sweep.start")" +%H:%M:%S) is found here"
  fi
  cat "$state/env.txt"
  echo
  wait_sweep || return $?
  echo
  analyse_and_report || return 1
}

main 2>&1 | tee "$dest/study.txt"
exit "${PIPESTATUS[0]}"
