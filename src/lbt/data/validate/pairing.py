"""Gate 0, pairing: every scenario_id is in all three arms exactly once, with the same domain and user."""

from __future__ import annotations

from pathlib import Path

from lbt.data.records import CorpusRecord
from lbt.data.validate.gate import MAX_LISTED, gate_result, where


def gate_pairing(arms: dict[str, list[CorpusRecord]], paths: dict[str, Path]) -> dict:
    by_arm = {arm: {} for arm in arms}
    repeated = []
    for arm, records in arms.items():
        for r in records:
            if r.scenario_id in by_arm[arm]:
                repeated.append({"where": where(paths[arm], r), "scenario_id": r.scenario_id})
            by_arm[arm][r.scenario_id] = r
    all_ids = sorted(set().union(*[set(d) for d in by_arm.values()]))
    missing, mismatched = [], []
    for sid in all_ids:
        present = {arm: by_arm[arm][sid] for arm in arms if sid in by_arm[arm]}
        if len(present) < len(arms):
            missing.append({"scenario_id": sid, "missing_in": [a for a in arms if a not in present]})
        first = next(iter(present.values()))
        for arm, r in present.items():
            if r.user != first.user or r.domain != first.domain:
                field = "user" if r.user != first.user else "domain"
                mismatched.append({"scenario_id": sid, "where": where(paths[arm], r), "field": field})
    domains: dict[str, int] = {}
    for r in next(iter(arms.values())):  # the first arm's scenarios (all arms' when pairing passes)
        domains[r.domain] = domains.get(r.domain, 0) + 1
    passed = not (missing or mismatched or repeated)
    return gate_result(
        passed,
        n_scenarios=len(all_ids),
        scenarios_per_domain=domains,
        missing=missing[:MAX_LISTED],
        mismatched=mismatched[:MAX_LISTED],
        repeated=repeated[:MAX_LISTED],
    )
