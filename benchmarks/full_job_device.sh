#!/usr/bin/env bash
# One `full_job.sh` run on the device machine, packed so that what matters comes back through the device
# tool's $OUT (at most 8 files, at most 2 folders down): the job runs under /tmp, then job.log, run.json,
# the phases' summaries (one file), the per-part breakdown and a tarball of every row file are copied to
# $OUT/<label>*. Run from the root of a snapshot of the repository (full_job.sh reads data/corpora there).
#   bash benchmarks/full_job_device.sh eager                            # full_job.sh's defaults
#   bash benchmarks/full_job_device.sh graph hardware.fast.decode=graph   # extra args go to lbt.train
# LIMIT (seconds, default 540) stops the job before the device tool's 600 s limit, so the files come back.
# IMPORTTIME=1 adds the job's slowest imports to the breakdown (what its startup_s is made of).
set -uo pipefail
label=$1; shift
dest=${OUT:?OUT is the device tool\'s folder}
job_out=/tmp/lbt-full-job-$label
rm -rf "$job_out"
# full_job.sh calls `python`; the image has python3 only, and a symlink to a venv's python3 loses the venv.
if ! command -v python >/dev/null; then
  mkdir -p /tmp/pybin
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > /tmp/pybin/python
  chmod +x /tmp/pybin/python
  export PATH=/tmp/pybin:$PATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
echo "job $label: full_job.sh $*"
t0=$SECONDS
# IMPORTTIME=1: Python reports every import's time into the job log (PYTHONPROFILEIMPORTTIME, in each of the
# job's Python processes); the slowest top-level imports go to the breakdown and the rest of those lines out.
OUT=$job_out PYTHONPROFILEIMPORTTIME=${IMPORTTIME:+1} timeout "${LIMIT:-540}" bash benchmarks/full_job.sh "$@"
echo "full_job.sh exit $? after $((SECONDS - t0)) s"
job=$job_out/job
imports=
if [ -n "${IMPORTTIME:-}" ]; then
  imports=$(grep "^import time:" "$job_out/job.log" | awk -F'|' '$3 ~ /^ [^ ]/ {printf "%.3f %s\n", $2 / 1e6, $3}' \
    | sort -rn | head -15)
  grep -v "^import time:" "$job_out/job.log" > "$job_out/job.log.tmp" && mv "$job_out/job.log.tmp" "$job_out/job.log"
fi
cp "$job_out/job.log" "$dest/$label.job.log" 2>/dev/null
cp "$job/run.json" "$dest/$label.run.json" 2>/dev/null
{
  python3 benchmarks/job_breakdown.py "$job" "$job_out/job.log" --summaries "$dest/$label.summaries.json"
  [ -n "$imports" ] && printf 'slowest top-level imports (s, cumulative; every Python process of the job):\n%s\n' "$imports"
} | tee "$dest/$label.breakdown.txt"
# Every row, summary, capability and probe file (small: ~2 MB) for the comparison of two jobs.
(cd "$job_out" && tar --exclude="*.pt" -czf "$dest/$label.eval.tar.gz" job/run.json job/eval job/probe job.log 2>/dev/null)
grep -E "decode=|Traceback|Error" "$job_out/job.log" | grep -v -i warn | head -5
ls -la "$dest"
