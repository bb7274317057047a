"""What a complete sweep would have that this one lacks: jobs, unfinished jobs, phases, rows, probe files."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from lbt.analyze.collect import Job
from lbt.study import STUDY_ARMS, phase_key


def missing_report(jobs: list[Job], descriptive: list[dict[str, Any]], probes: list[dict[str, Any]]) -> dict:
    """What a complete sweep would have that this one lacks: jobs, phases, measures, probe files."""
    study = [job for job in jobs if job.is_study_job]
    families = sorted({job.family for job in study})
    seeds = sorted({job.seed for job in study})
    present = {(job.family, job.arm, job.seed) for job in study}
    missing_jobs = [
        {"family": f, "arm": a, "seed": s}
        for f in families
        for a in STUDY_ARMS
        for s in seeds
        if (f, a, s) not in present
    ]
    incomplete = [
        {"job": str(job.path), "status": job.status, "done": job.done, "missing": card_missing(job)}
        for job in study
        if not job.done or job.status not in (None, "done")
    ]
    all_phases = sorted({ph for job in study for ph in job.phases}, key=phase_key)
    missing_phases = [
        {"job": job.label, "phases": [ph for ph in all_phases if ph not in job.phases]}
        for job in study
        if any(ph not in job.phases for ph in all_phases)
    ]
    measures_seen: dict[tuple, set] = defaultdict(set)
    by_job: dict[tuple, set] = defaultdict(set)
    for row in descriptive:
        if row["arm"] in STUDY_ARMS:
            measures_seen[(row["phase"], row["item_set"])].add(row["measure"])
            by_job[(row["family"], row["arm"], row["seed"])].add(
                (row["phase"], row["item_set"], row["measure"])
            )
    missing_measures = []
    for job in study:
        have = by_job[(job.family, job.arm, job.seed)]
        lacking = [
            f"{ph}/{iset}/{m}"
            for (ph, iset), ms in sorted(
                measures_seen.items(), key=lambda kv: (phase_key(kv[0][0]), kv[0][1])
            )
            if ph in job.phases
            for m in sorted(ms)
            if (ph, iset, m) not in have
        ]
        if lacking:
            missing_measures.append({"job": job.label, "rows": lacking})
    probe_phases = sorted({p["phase"] for p in probes}, key=phase_key)
    probe_have = defaultdict(set)
    for p in probes:
        probe_have[(p["family"], p["arm"], p["seed"])].add(p["phase"])
    missing_probes = [
        {
            "job": job.label,
            "phases": [ph for ph in probe_phases if ph not in probe_have[(job.family, job.arm, job.seed)]],
        }
        for job in study
        if probe_phases and any(ph not in probe_have[(job.family, job.arm, job.seed)] for ph in probe_phases)
    ]
    return {
        "jobs": missing_jobs,
        "incomplete_jobs": incomplete,
        "phases": missing_phases,
        "measures": missing_measures,
        "probe_phases": missing_probes,
        "expected": {"families": families, "arms": list(STUDY_ARMS), "seeds": seeds},
    }


def card_missing(job: Job) -> list[str]:
    """What the job's run card says is missing (status incomplete), or its error (status failed)."""
    missing = job.card.get("missing")
    if isinstance(missing, list):
        return [str(m) for m in missing]
    error = job.card.get("error")
    if isinstance(error, dict) and error.get("type"):
        return [f"{error['type']}: {error.get('message', '')}"]
    return []


def unfinished_line(entry: dict) -> str:
    line = (
        f"job {entry['job']} is not finished (status {entry['status']}, "
        f"DONE {'present' if entry['done'] else 'absent'})"
    )
    found = entry.get("missing") or []
    if found:
        line += ": " + "; ".join(found[:5]) + (f" (+{len(found) - 5} more)" if len(found) > 5 else "")
    return line


def missing_lines(missing: dict) -> list[str]:
    """The missing-data report as one line per gap (report.md and stderr)."""
    lines = [f"job ({m['family']}, {m['arm']}, seed {m['seed']}) is missing" for m in missing["jobs"]]
    lines += [unfinished_line(m) for m in missing["incomplete_jobs"]]
    lines += [f"job {m['job']} lacks phase(s) {', '.join(m['phases'])}" for m in missing["phases"]]
    lines += [f"job {m['job']} lacks rows {', '.join(m['rows'])}" for m in missing["measures"]]
    lines += [
        f"job {m['job']} lacks probe phase(s) {', '.join(m['phases'])}" for m in missing["probe_phases"]
    ]
    return lines
