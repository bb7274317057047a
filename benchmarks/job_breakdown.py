"""Where one whole job's time went, from its own files: the run card's wall time, each phase's stance
battery (summary.json: wall_s and seconds per item set and measure), capability checks (capability.json
wall_s), probe projections (probe/<phase>.json wall_time_s; the base one includes fitting the directions,
whose own time the job log gives), and the rest (model build, data, training, adapter saves). Base files
copied from the sweep's base cache (hardware.fast.share_base; the job log names the evaluators served) carry
the first job's times: they count 0 s here, the copy's time falls in the rest.

    python benchmarks/job_breakdown.py <job dir> <job.log> [--summaries all_summaries.json]
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]")


# The base-cache log line names the evaluators it served; each is one column of the breakdown.
SERVED = {"stance": "StanceEvaluator", "capability": "CapabilityEvaluator", "probe": "ProbeEvaluator"}


def phase_order(name: str) -> tuple[int, int]:
    if name == "base":
        return (0, 0)
    if name.startswith("step_"):
        return (1, int(name.split("_")[1]))
    return (2, 0)


def log_events(log: Path) -> list[tuple[float, str]]:
    """(seconds since the first stamped line, message) of the job log's lines that mark a part's end."""
    events, first = [], None
    keep = ("eval ", "capability ", "probe ", "directions ", "done:", "decode=", "base phase:")
    for line in log.read_text(errors="replace").splitlines():
        m = STAMP.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        first = t if first is None else first
        msg = line.split("] - ", 1)[-1]
        if msg.startswith(keep):
            events.append((t - first, msg))
    return events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", type=Path)
    ap.add_argument("log", type=Path)
    ap.add_argument("--summaries", type=Path, help="write every phase's summary.json into this one file")
    args = ap.parse_args()
    job = args.job
    card = json.loads((job / "run.json").read_text()) if (job / "run.json").exists() else {}
    phases = sorted((p.name for p in (job / "eval").iterdir() if p.is_dir()), key=phase_order) \
        if (job / "eval").exists() else []
    events = log_events(args.log) if args.log.exists() else []
    served = "".join(msg for _, msg in events if msg.startswith("base phase:"))
    cached = {part for part, name in SERVED.items() if name in served}
    summaries, rows = {}, []
    total_eval = total_cap = total_probe = 0.0
    for phase in phases:
        d = job / "eval" / phase
        s = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else None
        c = json.loads((d / "capability.json").read_text()) if (d / "capability.json").exists() else None
        p_path = job / "probe" / f"{phase}.json"
        p = json.loads(p_path.read_text()) if p_path.exists() else None
        if s:
            summaries[phase] = s
        from_cache = cached if phase == "base" else set()
        stance = s["wall_s"] if s and "stance" not in from_cache else 0.0
        cap = c["wall_s"] if c and "capability" not in from_cache else 0.0
        probe = p["wall_time_s"] if p and "probe" not in from_cache else 0.0
        total_eval, total_cap, total_probe = total_eval + stance, total_cap + cap, total_probe + probe
        per_measure: dict[str, float] = {}
        # Seconds per engine call, pooled over the item sets ({measures: s}); jobs before the pooling kept
        # them per item set ({item set: {measures: s}}).
        for key, value in (s or {}).get("seconds", {}).items() if "stance" not in from_cache else ():
            for measure, sec in (value.items() if isinstance(value, dict) else [(key, value)]):
                per_measure[measure] = per_measure.get(measure, 0.0) + sec
        rows.append((phase, stance, cap, probe, per_measure))
    wall = card.get("wall_time_s")
    print(f"job {job}: status {card.get('status')}, run.json wall {wall} s, train tokens/s "
          f"{card.get('tokens_per_s')}, steps {card.get('trained_steps')}, final loss {card.get('final_loss')}")
    print(f"{'phase':<9} {'stance s':>9} {'capab. s':>9} {'probe s':>8}  stance by engine call (both item sets, s)")
    for phase, stance, cap, probe, per_measure in rows:
        parts = ", ".join(f"{m} {v:.1f}" for m, v in per_measure.items())
        print(f"{phase:<9} {stance:9.1f} {cap:9.1f} {probe:8.1f}  {parts}")
    print(f"{'all':<9} {total_eval:9.1f} {total_cap:9.1f} {total_probe:8.1f}")
    if cached:
        print(f"base from the sweep's base cache (0 s above): {', '.join(sorted(cached))}")
    directions = [float(re.search(r"([\d.]+) s$", msg).group(1)) for _, msg in events
                  if msg.startswith("directions ") and re.search(r"([\d.]+) s$", msg)]
    if directions:
        print(f"directions (inside probe base): {sum(directions):.1f} s")
    if wall:
        rest = wall - total_eval - total_cap - total_probe
        print(f"rest (model build, data, training, saves): {rest:.1f} s of {wall:.1f} s")
    if card.get("startup_s") is not None:
        print(f"before the job (process start to run.json's start: Python, imports, Hydra's compose, the config "
              f"check): {card['startup_s']:.1f} s, outside run.json's wall")
    print("timeline (s since the job log's first line):")
    for t, msg in events:
        print(f"  {t:7.1f}  {msg[:150]}")
    if args.summaries:
        args.summaries.write_text(json.dumps(summaries, indent=1))


if __name__ == "__main__":
    main()
