"""primary_report (vectorised bootstrap) against a plain loop over resamples of the same algorithm.

    python benchmarks/stats.py [--resamples 10000] [--repeats 3]

Synthetic rows shaped like the study: 2 families × 3 arms × 3 seeds × 18 base items × 3 paraphrases
× 2 option orders (324 rows per family-arm, 162 per order), one measure. Both implementations run in
this process on the same rows: the same cell aggregation, the same point-estimate formulas, the same
resampling scheme (seeds with replacement, base items with replacement within each drawn seed, one
draw for all arms), different random draws. Prints both times, the ratio, the largest point-estimate
difference (must be exactly 0) and the largest CI difference next to its Monte-Carlo error.

The loop baseline is deliberately a good loop, not a strawman: rows are aggregated to cells once, and
each resample is a handful of numpy operations on a (3, seeds, items) array.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections import defaultdict

import numpy as np
from scipy import stats as sps

from lbt.stats import primary_report

ARMS = ("frame_plus", "frame_minus", "neutral")
SHIFT = {"frame_plus": -0.4, "frame_minus": 0.3, "neutral": 0.0}


def synthetic_rows(
    seed: int = 0,
    families=("qwen", "llama"),
    n_seeds: int = 3,
    n_items: int = 18,
    n_paraphrases: int = 3,
    orders=("original", "swapped"),
) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for family in families:
        item_effect = rng.normal(0, 1.0, n_items)
        for arm in ARMS:
            for s in range(n_seeds):
                seed_effect = rng.normal(0, 0.3)
                for i in range(n_items):
                    for p in range(n_paraphrases):
                        for order in orders:
                            stance = SHIFT[arm] + item_effect[i] + seed_effect + rng.normal(0, 0.8)
                            rows.append(
                                {
                                    "family": family,
                                    "arm": arm,
                                    "seed": s,
                                    "base_item": f"b{i:02d}",
                                    "domain": f"d{i % 6}",
                                    "measure": "letter_logprob",
                                    "item_id": f"b{i:02d}-p{p}",
                                    "order": order,
                                    "stance": float(stance),
                                }
                            )
    return rows


# ----------------------------------------------------------------------------- the plain loop baseline


def loop_cells(rows: list[dict]) -> dict[str, np.ndarray]:
    """Cell means per family as a (3 arms, seeds, items) array; fsum like the definition."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["family"], r["arm"], r["seed"], r["base_item"])].append(r["stance"])
    out = {}
    for family in sorted({k[0] for k in groups}):
        seeds = sorted({k[2] for k in groups if k[0] == family})
        items = sorted({k[3] for k in groups if k[0] == family})
        arr = np.empty((3, len(seeds), len(items)))
        for a, arm in enumerate(ARMS):
            for si, s in enumerate(seeds):
                for ii, item in enumerate(items):
                    values = groups[(family, arm, s, item)]
                    arr[a, si, ii] = math.fsum(values) / len(values)
        out[family] = arr
    return out


def loop_point(cells: np.ndarray) -> dict[str, float]:
    flat = [[float(v) for v in cells[a].ravel()] for a in range(3)]
    mean = [math.fsum(x) / len(x) for x in flat]
    sd = math.sqrt(math.fsum((v - mean[2]) ** 2 for v in flat[2]) / (len(flat[2]) - 1))
    d_plus, d_minus = (mean[0] - mean[2]) / sd, (mean[1] - mean[2]) / sd
    return {"frame_plus": d_plus, "frame_minus": d_minus, "combined": (d_minus - d_plus) / 2}


def loop_bootstrap(cells: np.ndarray, n_resamples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n_seeds, n_items = cells.shape[1:]
    draws = {key: np.empty(n_resamples) for key in ("frame_plus", "frame_minus", "combined")}
    for b in range(n_resamples):  # one resample at a time
        seeds = rng.integers(0, n_seeds, n_seeds)
        items = rng.integers(0, n_items, (n_seeds, n_items))  # within each drawn seed
        sample = cells[:, seeds[:, None], items]  # the same draw for every arm
        neutral_mean = sample[2].mean()
        sd = sample[2].std(ddof=1)
        d_plus = (sample[0].mean() - neutral_mean) / sd
        d_minus = (sample[1].mean() - neutral_mean) / sd
        draws["frame_plus"][b], draws["frame_minus"][b] = d_plus, d_minus
        draws["combined"][b] = (d_minus - d_plus) / 2
    return draws


def loop_tost(x: np.ndarray, y: np.ndarray, sesoi_d: float) -> tuple[float, float]:
    bound = sesoi_d * y.std(ddof=1)
    se = math.sqrt(x.var(ddof=1) / x.size + y.var(ddof=1) / y.size)
    df = x.size + y.size - 2
    diff = x.mean() - y.mean()
    return float(sps.t.sf((diff + bound) / se, df)), float(sps.t.cdf((diff - bound) / se, df))


def loop_report(rows: list[dict], n_resamples: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for family, cells in loop_cells(rows).items():
        draws = loop_bootstrap(cells, n_resamples, rng)
        point = loop_point(cells)
        out[family] = {
            "point": point,
            "ci": {k: np.percentile(v, [2.5, 97.5]) for k, v in draws.items()},
            "p": float(np.mean(draws["combined"] <= 0)),
            "tost": {
                arm: loop_tost(cells[a].ravel(), cells[2].ravel(), 0.2) for a, arm in enumerate(ARMS[:2])
            },
            "draws": draws,
        }
    return out


# ------------------------------------------------------------------------------------------ comparison


def quantile_mc_se(draws: np.ndarray, q: float) -> float:
    """Monte-Carlo SE of a percentile estimate from B draws (order-statistic interval / (2 × 1.96))."""
    x = np.sort(draws)
    n = x.size
    half = 1.96 * math.sqrt(n * q * (1 - q))
    lo, hi = int(max(0, math.floor(n * q - half))), int(min(n - 1, math.ceil(n * q + half)))
    return float((x[hi] - x[lo]) / (2 * 1.96))


def timed_interleaved(fns: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Run the implementations alternately, so that both see the same background load of a shared machine."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return times, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median reported)")
    args = parser.parse_args(argv)
    rows = synthetic_rows()
    primary_report(rows, n_resamples=100)  # warm-up (imports, first-call overheads) for both sides
    loop_report(rows, 100)
    times, results = timed_interleaved(
        {
            "vectorised": lambda: primary_report(rows, n_resamples=args.resamples),
            "loop": lambda: loop_report(rows, args.resamples),
        },
        args.repeats,
    )
    vec, loop = results["vectorised"], results["loop"]
    t_vec, t_loop = statistics.median(times["vectorised"]), statistics.median(times["loop"])
    per_cell = len(rows) // 6
    print(
        f"rows: {len(rows)} ({per_cell} per family-arm), 2 families, {args.resamples} resamples; "
        f"python {platform.python_version()}, numpy {np.__version__}"
    )
    for name, label in (("vectorised", "primary_report (vectorised)"), ("loop", "plain loop over resamples")):
        print(
            f"{label:<28} median {statistics.median(times[name]) * 1e3:8.1f} ms, "
            f"min {min(times[name]) * 1e3:8.1f} ms  ({args.repeats} interleaved runs)"
        )
    print(
        f"speed-up: {t_loop / t_vec:.1f}x (medians), "
        f"{min(times['loop']) / min(times['vectorised']):.1f}x (minima)"
    )
    point_diff, ci_diff, worst_ratio = 0.0, 0.0, 0.0
    for family, ref in loop.items():
        entry = vec["families"][family]["letter_logprob"]
        ours = {
            "frame_plus": entry["frame_plus"],
            "frame_minus": entry["frame_minus"],
            "combined": entry["combined_directional"],
        }
        for key, value in ours.items():
            point_diff = max(point_diff, abs(value["d"] - ref["point"][key]))
            for end, q in ((0, 0.025), (1, 0.975)):
                diff = abs(value["ci"][end] - ref["ci"][key][end])
                tolerance = math.sqrt(2) * quantile_mc_se(ref["draws"][key], q)
                ci_diff = max(ci_diff, diff)
                worst_ratio = max(worst_ratio, diff / tolerance)
        comb, ref_ci = entry["combined_directional"], ref["ci"]["combined"]
        print(
            f"{family}: combined d {comb['d']:+.6f} "
            f"CI vectorised [{comb['ci'][0]:+.4f}, {comb['ci'][1]:+.4f}]"
            f" loop [{ref_ci[0]:+.4f}, {ref_ci[1]:+.4f}]; "
            f"p one-sided {comb['p_one_sided']:.4f} vs {ref['p']:.4f}"
        )
    print(f"max point-estimate difference: {point_diff!r} (must be 0)")
    print(
        f"max CI endpoint difference: {ci_diff:.4f} = {worst_ratio:.2f} × its Monte-Carlo SE "
        "(SE of the difference of two independent percentile estimates)"
    )
    ok = point_diff == 0.0 and worst_ratio < 4 and t_loop / t_vec >= 50
    print(
        "goal (≥ 50×, identical point estimates, CIs within Monte-Carlo error):", "met" if ok else "NOT met"
    )
    return 0 if point_diff == 0.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
