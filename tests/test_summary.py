"""Phase summaries: means, parse rates and validity worked out by hand; the metric's sum states make
sharded (DDP) aggregation equal to aggregation in one process."""

from __future__ import annotations

import math

import pytest

from lbt.eval.items import ItemSet
from lbt.eval.summary import StanceMetric, flat_metrics, measure_summary, measure_validity, summarize_phase
from tests.eval_reference import make_items


def row(item, domain, order, stance, **extra):
    return {"item_id": item, "domain": domain, "order": order, "stance": stance, **extra}


ROWS = [
    row("a", "park", "original", 1.0),
    row("a", "park", "swapped", 3.0),
    row("b", "park", "original", -2.0),
    row("b", "park", "swapped", math.nan, parsed=False),
    row("c", "bus", "original", 0.5),
    row("c", "bus", "swapped", 1.5),
]


def test_stance_metric_means_by_domain_and_order():
    metric = StanceMetric(["bus", "park"])
    metric.update_rows(ROWS)
    stats = measure_summary(metric, "likert")
    assert stats["mean_stance"] == pytest.approx((1 + 3 - 2 + 0.5 + 1.5) / 5)
    assert stats["by_domain"] == {"bus": pytest.approx(1.0), "park": pytest.approx(2 / 3)}
    assert stats["by_order"] == {"original": pytest.approx(-0.5 / 3), "swapped": pytest.approx(4.5 / 2)}
    assert (stats["n_rows"], stats["n_scored"]) == (6, 5)
    assert stats["parse_rate"] == pytest.approx(5 / 6)
    assert measure_summary(metric, "letter_logprob")["parse_rate"] == 1.0


def test_sharded_metrics_add_up_to_the_whole():
    """What DDP does: each rank updates its shard; the sum-reduced states equal one process's."""
    items = ItemSet("t", make_items(per_domain=3))
    shards = [items.shard(rank, 2) for rank in range(2)]
    ids = [i["id"] for s in shards for i in s]
    assert sorted(ids) == sorted(i["id"] for i in items) and len(set(ids)) == len(ids)
    rows = [
        row(i["id"], i["domain"], o, float(k) / 7 - 0.3)
        for k, i in enumerate(items)
        for o in ("original", "swapped")
    ]
    domains = sorted({i["domain"] for i in items})
    whole = StanceMetric(domains)
    whole.update_rows(rows)
    parts = []
    for shard in shards:
        metric = StanceMetric(domains)
        metric.update_rows([r for r in rows if r["item_id"] in {i["id"] for i in shard}])
        parts.append(metric)
    parts[0].merge_state(parts[1])
    merged, single = measure_summary(parts[0], "x"), measure_summary(whole, "x")
    assert merged["mean_stance"] == pytest.approx(single["mean_stance"]) == pytest.approx(2.5 / 7 - 0.3)
    assert merged["by_domain"] == pytest.approx(single["by_domain"])
    assert (merged["n_rows"], merged["n_scored"]) == (single["n_rows"], single["n_scored"]) == (12, 12)


def test_measure_validity_by_hand():
    choice = [
        row("a", "d", "original", 1.0),
        row("a", "d", "swapped", 1.0),  # decided: pro
        row("b", "d", "original", -1.0),
        row("b", "d", "swapped", 0.0),  # decided: anti
        row("c", "d", "original", 1.0),
        row("c", "d", "swapped", -1.0),  # position bias: undecided
        row("e", "d", "original", 1.0),
        row("e", "d", "swapped", 1.0),
    ]
    letters = [
        row("a", "d", "original", 2.0),
        row("a", "d", "swapped", -0.5),  # mean +0.75: agrees
        row("b", "d", "original", 0.2),
        row("b", "d", "swapped", 0.1),  # +0.15 vs anti: disagrees
        row("c", "d", "original", 5.0),
        row("c", "d", "swapped", 5.0),  # undecided choice: left out
        row("e", "d", "original", math.nan),
        row("e", "d", "swapped", math.nan),
    ]  # no value: left out
    table = measure_validity({"forced_choice": choice, "letter_logprob": letters})
    assert table == {"letter_logprob": {"agreement": 0.5, "n_items": 2}}
    assert measure_validity({"letter_logprob": letters}) == {}


def test_summarize_phase_and_flat_metrics():
    rows = {"target": {"likert": ROWS, "forced_choice": [dict(r, stance=1.0) for r in ROWS]}}
    summary = summarize_phase(rows, "final")
    assert summary["phase"] == "final" and summary["item_sets"]["target"]["n_items"] == 3
    flat = flat_metrics(summary)
    assert flat["eval/target/likert/stance"] == pytest.approx(0.8)
    assert flat["eval/target/likert/domain/bus"] == pytest.approx(1.0)
    assert flat["eval/target/validity/likert"] == pytest.approx(2 / 3)  # item b: likert −2 vs choice +1


def test_metric_rejects_unknown_domain():
    with pytest.raises(ValueError, match="tram"):
        StanceMetric(["bus"]).update_rows([row("a", "tram", "original", 1.0)])
