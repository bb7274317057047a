"""Figures of `python -m lbt.analyze` (matplotlib, Agg), drawn from report.json's contents only.

forest.png       combined directional d per family and measure, 95 % CI, SESOI band
asymmetry.png    per-arm d on source (manipulation check) and target items
projection_shift.png   projection shift by layer per arm at the primary phase (ℓ* marked)
dynamics.png     target stance per measure and projection at ℓ* over phases (base, step_<n>, final)

An exploratory analysis carries the stamp in red on every figure.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lbt.study import FRAMED_ARMS, GATE_D, MINUS, PLUS, arm_colour, phase_key

FIGURE_STAMP = "EXPLORATORY — not the preregistered analysis"


def finish(fig: plt.Figure, path: Path, exploratory: bool) -> Path:
    if exploratory:
        fig.suptitle(FIGURE_STAMP, color="red", fontsize=9, weight="bold")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def forest(report: dict, path: Path, sesoi: float) -> Path | None:
    primary = report["primary"]
    if not primary:
        return None
    entries = [
        (f"{fam} · {m}", e["combined_directional"], primary["holm"][m][fam]["reject"])
        for fam, measures in sorted(primary["families"].items())
        for m, e in sorted(measures.items())
        if e["combined_directional"]
    ]
    if not entries:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(entries) + 1.5), layout="constrained")
    ax.axvspan(-sesoi, sesoi, color="orange", alpha=0.2, label=f"SESOI ±{sesoi}")
    ax.axvline(0, color="black", lw=0.8)
    for y, (label, comb, reject) in enumerate(reversed(entries)):
        lo, hi = comb["ci"]
        ax.errorbar(
            comb["d"],
            y,
            xerr=[[comb["d"] - lo], [hi - comb["d"]]],
            fmt="o",
            mfc="black" if reject else "white",
            color="black",
            capsize=3,
        )
    ax.set_yticks(range(len(entries)), [e[0] for e in reversed(entries)])
    ax.set_xlabel(f"combined directional d = (d({MINUS.name}) − d({PLUS.name})) / 2  [95 % CI]")
    ax.set_title("Target items: combined directional d (filled: Holm-significant)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return finish(fig, path, report["exploratory"])


def asymmetry(report: dict, path: Path, gate_d: float) -> Path | None:
    sets = [
        (name, report[key])
        for name, key in (("source", "manipulation_check"), ("target", "primary"))
        if report[key]
    ]
    if not sets:
        return None
    families = sorted({fam for _, stats in sets for fam in stats["families"]})
    fig, axes = plt.subplots(
        len(families),
        len(sets),
        figsize=(5 * len(sets), 0.5 + 2.2 * len(families)),
        squeeze=False,
        layout="constrained",
    )
    for row, family in enumerate(families):
        for col, (name, stats) in enumerate(sets):
            ax = axes[row][col]
            measures = sorted(stats["families"].get(family, {}))
            for y, measure in enumerate(measures):
                entry = stats["families"][family][measure]
                for offset, arm in zip((-0.15, 0.15), FRAMED_ARMS):
                    if entry.get(arm):
                        d, (lo, hi) = entry[arm]["d"], entry[arm]["ci"]
                        ax.errorbar(
                            d,
                            y + offset,
                            xerr=[[d - lo], [hi - d]],
                            fmt="o",
                            color=arm_colour(arm),
                            capsize=2,
                            label=arm if y == 0 else None,
                        )
            ax.axvline(0, color="black", lw=0.8)
            if name == "source":
                for x in (-gate_d, gate_d):
                    ax.axvline(x, color="grey", ls="--", lw=0.8)
            ax.set_yticks(range(len(measures)), measures)
            ax.set_title(f"{family}: {name} items (d vs neutral)", fontsize=9)
            ax.legend(fontsize=7, loc="best")
    return finish(fig, path, report["exploratory"])


def projection_shift(report: dict, path: Path) -> Path | None:
    data = report["projection_shift"]
    if not data:
        return None
    families = sorted(data)
    fig, axes = plt.subplots(
        1, len(families), figsize=(5.5 * len(families), 3.5), squeeze=False, layout="constrained"
    )
    for ax, family in zip(axes[0], families):
        for arm, rec in sorted(data[family].items()):
            layers, shift = rec["layers"], rec["shift"]
            se = [s if s is not None and math.isfinite(s) else 0.0 for s in rec["se"]]
            colour = arm_colour(arm)
            ax.plot(layers, shift, marker=".", color=colour, label=f"{arm} (n={rec['n_seeds']})")
            ax.fill_between(
                layers,
                [m - s for m, s in zip(shift, se)],
                [m + s for m, s in zip(shift, se)],
                color=colour,
                alpha=0.2,
            )
            ax.axvline(rec["l_star"], color="grey", ls=":", lw=0.8)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("layer (ℓ* dotted)")
        ax.set_ylabel("projection shift vs base (answer position)")
        ax.set_title(family)
        ax.legend(fontsize=7)
    return finish(fig, path, report["exploratory"])


def dynamics(report: dict, path: Path) -> Path | None:
    stance, projection = report["dynamics"]["stance"], report["dynamics"]["projection_at_l_star"]
    families = sorted(set(stance) | set(projection))
    if not families:
        return None
    measures = sorted(
        {
            m
            for fam in stance.values()
            for m, arms in fam.items()
            if any(v is not None for phases in arms.values() for v in phases.values())
        }
    )
    panels: list[tuple[str, Any]] = [
        (f"target stance: {m}", lambda fam, m=m: stance.get(fam, {}).get(m, {})) for m in measures
    ]
    if projection:
        panels.append(("projection at ℓ*", lambda fam: projection.get(fam, {})))
    fig, axes = plt.subplots(
        len(panels),
        len(families),
        figsize=(5 * len(families), 2.4 * len(panels)),
        squeeze=False,
        layout="constrained",
    )
    for col, family in enumerate(families):
        for row, (label, getter) in enumerate(panels):
            ax = axes[row][col]
            by_arm = getter(family)
            phases = sorted({ph for arm in by_arm.values() for ph in arm}, key=phase_key)
            for arm, values in sorted(by_arm.items()):
                xs = [phases.index(ph) for ph in phases if values.get(ph) is not None]
                ys = [values[ph] for ph in phases if values.get(ph) is not None]
                ax.plot(xs, ys, marker="o", color=arm_colour(arm), label=arm)
            ax.set_xticks(range(len(phases)), phases, rotation=30, fontsize=7)
            ax.set_title(f"{family}: {label}", fontsize=9)
            ax.legend(fontsize=7)
    return finish(fig, path, report["exploratory"])


def make_figures(report: dict, fig_dir: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Draw every figure the report has data for; returns {name: path}."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    drawn = {
        "forest": forest(report, fig_dir / "forest.png", args.sesoi_d),
        "asymmetry": asymmetry(report, fig_dir / "asymmetry.png", GATE_D),
        "projection_shift": projection_shift(report, fig_dir / "projection_shift.png"),
        "dynamics": dynamics(report, fig_dir / "dynamics.png"),
    }
    return {name: path for name, path in drawn.items() if path is not None}
