"""`python -m lbt.analyze` on an 18-job sweep, design check included: wall time on this machine.

    python benchmarks/analyze_sweep.py [--items 48] [--phases base,final] [--keep DIR]

Writes a synthetic sweep shaped like the study (2 families × 3 arms × 3 seeds = 18 job directories, each
with run.json and DONE; per phase and item set (target, source) the rows of letter_logprob, forced_choice
(±1, 10 % unparsed), likert and open_ended; 48 base items × 2 paraphrases × 2 option orders), then runs the
whole analysis in this process with the defaults (10,000 bootstrap resamples, design check of 400
simulated studies × 1,000 resamples per family × headline measure, W&B off) and prints the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from lbt.analyze import main as analyze

SHIFT = {"frame_plus": -0.4, "frame_minus": 0.2, "neutral": 0.0}


def write_sweep(root: Path, n_items: int, phases: list[str], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sweep = root / "sweep"
    for family in ("qwen", "llama"):
        item_effect = rng.normal(0, 1.0, n_items)
        for arm, shift in SHIFT.items():
            for s in range(3):
                job = sweep / f"{family}-{arm}-s{s}"
                job.mkdir(parents=True)
                card = {"job": {"model": family, "arm": arm, "seed": s, "sweep": "bench"}, "status": "done"}
                (job / "run.json").write_text(json.dumps(card))
                (job / "DONE").write_text("done\n")
                seed_effect = rng.normal(0, 0.3)
                for phase in phases:
                    for item_set in ("target", "source"):
                        folder = job / "eval" / phase / item_set
                        folder.mkdir(parents=True)
                        for measure in ("letter_logprob", "forced_choice", "likert", "open_ended"):
                            lines = []
                            for i in range(n_items):
                                for para in range(2):
                                    for order in ("original", "swapped"):
                                        value = item_effect[i] + seed_effect + shift + rng.normal(0, 0.7)
                                        parsed = True
                                        if measure == "forced_choice":
                                            parsed = rng.random() > 0.1
                                            value = (1.0 if value > 0 else -1.0) if parsed else float("nan")
                                        elif measure == "likert":
                                            value = float(np.clip(np.round(value * 2), -3, 3)) / 3
                                        elif measure == "open_ended":
                                            value = float("nan")
                                        lines.append(
                                            json.dumps(
                                                {
                                                    "measure": measure,
                                                    "phase": phase,
                                                    "item_set": item_set,
                                                    "item_id": f"{family}-{i}-p{para}",
                                                    "base_item": f"b{i}",
                                                    "domain": "urban_transit",
                                                    "order": order,
                                                    "stance": value,
                                                    "parsed": parsed,
                                                }
                                            )
                                        )
                            (folder / f"{measure}.jsonl").write_text("\n".join(lines) + "\n")
    return sweep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--phases", default="base,final")
    parser.add_argument("--keep", help="write the sweep and analysis here instead of a temporary directory")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lbt-bench-"))
    try:
        sweep = write_sweep(root, args.items, args.phases.split(","))
        os.environ["WANDB_MODE"] = "disabled"
        started, cpu = time.perf_counter(), time.process_time()
        code = analyze([str(sweep), "--exploratory", "--no-wandb", "--out", str(root / "analysis")])
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        report = json.loads((root / "analysis" / "report.json").read_text())
        checks = [c for c in report["design_check"] if not c.get("skipped")]
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; exit {code}")
        print(
            f"18 jobs × {args.items} items, phases {args.phases}: analysis {wall:.1f} s wall, {cpu:.1f} s CPU; "
            f"{len(checks)} design checks of {checks[0]['n_studies'] if checks else 0} studies × "
            f"{checks[0]['n_resamples'] if checks else 0} resamples"
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
