"""How many seeds and base items does a sweep need? `python -m lbt.stats.plan`

    python -m lbt.stats.plan [--pilot analysis/report.json [--family F] [--measure letter_logprob]]
        [--sigma-item 1.0 --sigma-item-arm 0.0 --sigma-seed 0.3 --sigma-noise 0.7]
        [--sesoi-d 0.2] [--alpha 0.05] [--power 0.8] [--target combined|arm] [--families 2]
        [--seeds 2,3,4,5,6,8,10,15,20] [--items 18,24,36,48,72,100,150,200] [--coverage-studies 300]
        [--out DIR]

From variance components (a pilot sweep's report.json — `variance_components` of each family × measure
— or the defaults, in stance units), the SESOI and alpha, it gives the power of the calibrated
one-sided test (lbt.stats.calibrated) for every design S seeds × N base items, the smallest design
reaching the wanted power (fewest seeds first: a seed is 3 training runs per family, an item only
evaluation time), and the simulated coverage of the pre-registered bootstrap at those seeds (the
calibrated interval keeps nominal coverage by construction; the bootstrap's needs seeds).

Power, in closed form. The test statistic of a comparison is mean D / √V (see calibrated.py), with
Var(mean D) = σ_A²/S + σ_B²/N + σ_E²/(SN), where for d of one framed arm A = u_arm − u_neutral
(σ_A² = 2σ_seed²), B = v_arm − v_neutral (σ_B² = 2σ_item×arm²), E (σ_E² = 2σ_noise²), and for the
combined estimate D = (y_minus − y_plus)/2 (each variance halved). The effect in stance units is
SESOI × σ_total, σ_total² = σ_item² + σ_item×arm² + σ_seed² + σ_noise². Power = P(T' > t_{1−α', df})
with T' non-central t(df, δ/√Var(mean D)), df = S − 1 when there is no item × arm variance (the
test's df then), else Satterthwaite's df with the true components; α' = alpha / families (Holm's
first step, the conservative bound) unless --families 1. With one seed and no seed variance this is
exactly the paired t test's power on N items (tested against statsmodels-free closed forms).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from lbt.stats.variance import Components

DEFAULT_SEEDS = (2, 3, 4, 5, 6, 8, 10, 15, 20)
DEFAULT_ITEMS = (18, 24, 36, 48, 72, 100, 150, 200)


def comparison_variances(components: Components, target: str) -> tuple[float, float, float]:
    """(σ_A², σ_B², σ_E²) of the paired difference D of the comparison (`combined` or `arm`)."""
    scale = 0.5 if target == "combined" else 2.0  # (y_m − y_p)/2: 2σ²/4; y_a − y_n: 2σ²
    return (
        scale * components.sigma_seed**2,
        scale * components.sigma_item_arm**2,
        scale * components.sigma_noise**2,
    )


def power(
    components: Components,
    n_seeds: int,
    n_items: int,
    sesoi_d: float = 0.2,
    alpha: float = 0.05,
    target: str = "combined",
) -> dict[str, float]:
    """Power of the calibrated one-sided test at true d = sesoi_d for S seeds × N items (closed form)."""
    var_a, var_b, var_e = comparison_variances(components, target)
    variance = var_a / n_seeds + var_b / n_items + var_e / (n_seeds * n_items)
    delta = sesoi_d * components.sigma_total
    if n_seeds == 1:
        df = n_items - 1.0  # the paired t on items
    elif var_b == 0:
        df = n_seeds - 1.0
    else:  # Satterthwaite with the true expected mean squares
        cells = n_seeds * n_items
        seed_term = (var_e + n_items * var_a) / cells
        item_term = (var_e + n_seeds * var_b) / cells
        res_term = var_e / cells
        df = variance**2 / (
            seed_term**2 / (n_seeds - 1)
            + item_term**2 / (n_items - 1)
            + res_term**2 / ((n_seeds - 1) * (n_items - 1))
        )
    ncp = delta / np.sqrt(variance) if variance > 0 else np.inf
    critical = sps.t.ppf(1 - alpha, df)
    return {"power": float(sps.nct.sf(critical, df, ncp)), "df": float(df), "se": float(np.sqrt(variance))}


def power_table(
    components: Components, seeds: list[int], items: list[int], sesoi_d: float, alpha: float, target: str
) -> np.ndarray:
    return np.array(
        [[power(components, s, n, sesoi_d, alpha, target)["power"] for n in items] for s in seeds]
    )


def smallest_design(
    table: np.ndarray, seeds: list[int], items: list[int], wanted: float
) -> tuple[int, int] | None:
    """Fewest seeds first, then fewest items, reaching the wanted power."""
    for i, s in enumerate(seeds):
        for j, n in enumerate(items):
            if table[i, j] >= wanted:
                return s, n
    return None


def bootstrap_coverage(
    components: Components, seeds: list[int], n_items: int, studies: int, alpha: float, seed: int = 0
) -> dict[int, float]:
    """Simulated coverage of the pre-registered bootstrap's combined CI under the null, per seed count."""
    from lbt.stats.simulate import Design, run_scenario

    out = {}
    for n_seeds in seeds:
        design = Design(
            n_studies=studies,
            n_families=1,
            n_seeds=n_seeds,
            n_items=n_items,
            n_resamples=500,
            alpha=alpha,
            seed=seed,
            **components.as_dict(),
        )
        out[n_seeds] = run_scenario(design, 0.0, 0.0, np.random.default_rng([seed, n_seeds]))[
            "coverage_combined"
        ]
    return out


def pilot_components(path: Path, family: str | None, measure: str) -> dict[str, Components]:
    """Components per family from a pilot report.json (lbt.analyze): primary → families → measure."""
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    families = ((report.get("primary") or {}).get("families")) or {}
    out = {}
    for name, measures in sorted(families.items()):
        if family and name != family:
            continue
        info = (measures.get(measure) or {}).get("variance_components") or {}
        if info.get("components"):
            out[name] = Components(**info["components"])
    if not out:
        raise ValueError(
            f"{path}: no variance components for measure {measure!r}"
            + (f", family {family!r}" if family else "")
        )
    return out


def plan(
    components: Components,
    sesoi_d: float = 0.2,
    alpha: float = 0.05,
    wanted: float = 0.8,
    target: str = "combined",
    families: int = 2,
    seeds: list[int] | None = None,
    items: list[int] | None = None,
    coverage_studies: int = 300,
) -> dict[str, Any]:
    seeds = list(seeds or DEFAULT_SEEDS)
    items = list(items or DEFAULT_ITEMS)
    test_alpha = alpha / families
    table = power_table(components, seeds, items, sesoi_d, test_alpha, target)
    best = smallest_design(table, seeds, items, wanted)
    coverage = (
        bootstrap_coverage(components, seeds, best[1] if best else items[-1], coverage_studies, alpha)
        if coverage_studies > 0
        else {}
    )
    return {
        "components": components.as_dict(),
        "sigma_total": components.sigma_total,
        "sesoi_d": sesoi_d,
        "alpha": alpha,
        "test_alpha": test_alpha,
        "families": families,
        "target": target,
        "wanted_power": wanted,
        "seeds": seeds,
        "items": items,
        "power": table.tolist(),
        "smallest_design": {"n_seeds": best[0], "n_items": best[1]} if best else None,
        "bootstrap_coverage": {str(k): v for k, v in coverage.items()},
        "coverage_items": best[1] if best else items[-1],
        "coverage_studies": coverage_studies,
    }


def format_plan(result: dict[str, Any], label: str = "") -> str:
    comp = result["components"]
    lines = [
        (
            f"{label}components (stance units): item {comp['sigma_item']:.3f}, item×arm {comp['sigma_item_arm']:.3f}, "
            f"seed {comp['sigma_seed']:.3f}, noise {comp['sigma_noise']:.3f} (σ_total {result['sigma_total']:.3f}); "
            f"SESOI d {result['sesoi_d']}, one-sided alpha {result['test_alpha']:.4g} "
            f"({result['alpha']} / {result['families']} families), target: {result['target']}"
        ),
        "power of the calibrated test at d = SESOI (rows: seeds, columns: base items)",
        "seeds " + "".join(f"{n:>7d}" for n in result["items"]),
    ]
    for s, row in zip(result["seeds"], result["power"]):
        lines.append(f"{s:>5d} " + "".join(f"{p:>7.3f}" for p in row))
    best = result["smallest_design"]
    if best:
        lines.append(
            f"smallest design with power ≥ {result['wanted_power']}: {best['n_seeds']} seeds × {best['n_items']} "
            "base items (fewest seeds first)"
        )
    else:
        lines.append(
            f"no design in the grid reaches power {result['wanted_power']}: more seeds or items needed"
        )
    if result["bootstrap_coverage"]:
        lines.append(
            f"pre-registered bootstrap, null coverage of the combined 95 % CI at {result['coverage_items']} items "
            f"({result['coverage_studies']} simulated studies each; the calibrated interval is nominal by design):"
        )
        lines.append("  " + ", ".join(f"{s} seeds {c:.3f}" for s, c in result["bootstrap_coverage"].items()))
        nominal = [int(s) for s, c in result["bootstrap_coverage"].items() if c >= 0.93]
        lines.append(
            f"  seeds for ≥ 93 % bootstrap coverage: {min(nominal)}"
            if nominal
            else "  no seed count in the grid reaches 93 %"
        )
    return "\n".join(lines)


def figure(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, result in results.items():
        table = np.array(result["power"])
        for j, n in enumerate(result["items"]):
            if n in (18, 48, 100, 200) or j == len(result["items"]) - 1:
                axes[0].plot(result["seeds"], table[:, j], marker="o", label=f"{label}{n} items")
        if result["bootstrap_coverage"]:
            cov = result["bootstrap_coverage"]
            axes[1].plot([int(s) for s in cov], list(cov.values()), marker="o", label=f"{label}bootstrap")
    axes[0].axhline(next(iter(results.values()))["wanted_power"], color="k", ls=":")
    axes[0].set(xlabel="seeds", ylabel="power at d = SESOI", title="calibrated test: power")
    axes[0].legend(fontsize=7)
    axes[1].axhspan(0.93, 0.97, color="0.9")
    axes[1].axhline(0.95, color="k", ls=":")
    axes[1].set(
        xlabel="seeds", ylabel="null coverage of the 95 % CI", title="pre-registered bootstrap: coverage"
    )
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    defaults = Components(1.0, 0.0, 0.3, 0.7)
    parser = argparse.ArgumentParser(prog="python -m lbt.stats.plan", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pilot", help="a pilot sweep's report.json (lbt.analyze) to take the components from"
    )
    parser.add_argument("--family", help="pilot family (default: every family in the pilot)")
    parser.add_argument("--measure", default="letter_logprob", help="pilot measure (default letter_logprob)")
    for name in ("sigma_item", "sigma_item_arm", "sigma_seed", "sigma_noise"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--sesoi-d", type=float, default=0.2)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--power", type=float, default=0.8, help="wanted power (default 0.8)")
    parser.add_argument("--target", choices=["combined", "arm"], default="combined")
    parser.add_argument("--families", type=int, default=2, help="Holm across this many families (alpha / m)")
    parser.add_argument("--seeds", type=parse_list, default=list(DEFAULT_SEEDS))
    parser.add_argument("--items", type=parse_list, default=list(DEFAULT_ITEMS))
    parser.add_argument("--coverage-studies", type=int, default=300, help="0: skip the bootstrap coverage")
    parser.add_argument("--out", help="directory for plan.json and plan.png")
    args = parser.parse_args(argv)
    if args.pilot:
        try:
            sources = {
                f"{name}: ": c
                for name, c in pilot_components(Path(args.pilot), args.family, args.measure).items()
            }
        except (OSError, ValueError, TypeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        sources = {"": Components(args.sigma_item, args.sigma_item_arm, args.sigma_seed, args.sigma_noise)}
    results = {}
    for label, components in sources.items():
        results[label] = plan(
            components,
            args.sesoi_d,
            args.alpha,
            args.power,
            args.target,
            args.families,
            args.seeds,
            args.items,
            args.coverage_studies,
        )
        print(format_plan(results[label], label))
    if len(results) > 1:
        needs = [r["smallest_design"] for r in results.values()]
        if all(needs):
            print(
                f"every family: {max(n['n_seeds'] for n in needs)} seeds × {max(n['n_items'] for n in needs)} items"
            )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        figure(results, out / "plan.png")
        print(f"wrote {out}/plan.json and {out}/plan.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
