"""PNG figures of the causal suite (matplotlib, Agg backend). Every panel shows its random-control band:
the shaded region spans the random directions' (or random token pairs') 5th–95th percentile, or their
min–max where there are fewer than 20 of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lbt.study import arm_colour


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _band_edges(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values (n_random, x): low and high edge per x."""
    if values.shape[0] >= 20:
        return np.percentile(values, 5, axis=0), np.percentile(values, 95, axis=0)
    return values.min(axis=0), values.max(axis=0)


def _summary_edges(bands: list[dict[str, float]]) -> tuple[np.ndarray, np.ndarray]:
    """The same rule from causal.band() summaries."""
    wide = [b.get("n", 0) >= 20 for b in bands]
    lo = np.array([b["p05"] if w else b["min"] for b, w in zip(bands, wide)], dtype=float)
    hi = np.array([b["p95"] if w else b["max"] for b, w in zip(bands, wide)], dtype=float)
    return lo, hi


def steering(result: dict[str, Any], out: Path, family: str) -> list[Path]:
    coefs = np.asarray(result["coefs"])
    placements = result["placements"]
    measures = [("letter_logprob", "letter_logprob stance"), ("forced_choice", "forced_choice stance"),
                ("kl", "KL (nats/token)"), ("perplexity", "perplexity")]
    fig, axes = plt.subplots(len(placements), len(measures), figsize=(4 * len(measures), 3.2 * len(placements)),
                             squeeze=False)
    for row, (placement, data) in enumerate(placements.items()):
        curves = data["curves"]
        for col, (key, label) in enumerate(measures):
            ax = axes[row, col]
            for kind, colour in (("isotropic", "tab:green"), ("covariance", "tab:orange")):
                rand = np.array([c[key] for c in curves.values() if c["kind"] == kind])
                if len(rand):
                    lo, hi = _band_edges(rand)
                    ax.fill_between(coefs, lo, hi, color=colour, alpha=0.25, label=f"random ({kind})")
            ax.plot(coefs, curves["real"][key], "o-", color="black", label="direction")
            ax.set_xlabel("coefficient (× class-mean difference)")
            ax.set_ylabel(label)
            ax.set_title(f"{family}: steer at {placement} {data['layers']}", fontsize=9)
            if key == "perplexity":
                ax.set_yscale("log")
        axes[row, 0].legend(fontsize=7)
    paths = [_save(fig, out / "steer_curves.png")]

    fig, axes = plt.subplots(1, len(placements), figsize=(5 * len(placements), 3.6), squeeze=False)
    for col, (placement, data) in enumerate(placements.items()):
        ax = axes[0, col]
        base = result["base"]["letter_logprob"]
        for name, c in data["curves"].items():
            real = name == "real"
            ax.plot(c["kl"], np.asarray(c["letter_logprob"]) - base, "o-" if real else "-",
                    color="black" if real else ("tab:green" if c["kind"] == "isotropic" else "tab:orange"),
                    alpha=1.0 if real else 0.35, lw=2 if real else 1, label="direction" if real else None)
        ax.axvline(result["kl_budget"], ls="--", color="gray", label="KL budget")
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel("KL on neutral text (nats/token)")
        ax.set_ylabel("stance shift (letter_logprob)")
        ctrl = data["control"]["all"]["effect_at_budget"]
        ax.set_title(f"{placement}: effect {data['control']['real_effect_at_budget']:+.3f}, random "
                     f"[{ctrl['min']:+.3f}, {ctrl['max']:+.3f}]", fontsize=9)
        ax.legend(fontsize=7)
    paths.append(_save(fig, out / "steer_matched_kl.png"))
    return paths


def ablation(result: dict[str, Any], out: Path, family: str) -> list[Path]:
    layers = np.asarray(result["layers"])
    gaps = result["gaps"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    for arm, g in gaps.items():
        lo, hi = _summary_edges(g["per_layer_random"])
        colour = arm_colour(arm)
        ax.fill_between(layers, lo, hi, color=colour, alpha=0.2)
        ax.plot(layers, g["per_layer"], "o-", color=colour, label=f"{arm} (band: random)")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("layer ablated")
    ax.set_ylabel(f"fraction of gap vs {result['reference']} removed")
    ax.set_title(f"{family}: per-layer directional ablation", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, (arm, g) in enumerate(gaps.items()):
        rand = g["all_layers_random"]
        ax.bar(i, g["all_layers"], color=arm_colour(arm), alpha=0.8)
        ax.errorbar(i + 0.3, rand["median"], yerr=[[rand["median"] - rand["min"]], [rand["max"] - rand["median"]]],
                    fmt="s", color="tab:green", capsize=4, label="random (min–max)" if i == 0 else None)
    ax.set_xticks(range(len(gaps)), list(gaps))
    ax.set_ylabel("fraction removed (ℓ* direction, all layers)")
    ax.set_title(f"weights check: max |Δ| = {result['weight_check']['max_abs_diff']:.2e}", fontsize=9)
    ax.legend(fontsize=7)
    return [_save(fig, out / "ablate.png")]


def patching(result: dict[str, Any], out: Path, family: str) -> list[Path]:
    layers = np.asarray(result["layers"])
    jobs = result["jobs"]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.3 * len(layers) + 3), 2.5 + 0.35 * len(jobs) + 3))
    ax = axes[0]
    grid = np.array([j["recovery"] for j in jobs], dtype=float) if jobs else np.zeros((0, len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-1.5, vmax=1.5)
    ax.set_yticks(range(len(jobs)), [j["job"] for j in jobs], fontsize=7)
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("layer patched (answer position)")
    ax.set_title(f"{family}: stance recovery, framed → base", fontsize=9)
    fig.colorbar(image, ax=ax)
    ax = axes[1]
    for j in jobs:
        colour = arm_colour(j["arm"])
        lo, hi = _summary_edges(j["random"])
        ax.fill_between(layers, lo, hi, color=colour, alpha=0.15)
        ax.plot(layers, j["recovery"], "o-", color=colour, lw=1, label=j["job"])
    ax.axhline(1, color="gray", lw=0.5, ls="--")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("recovery (band: random displacement)")
    ax.legend(fontsize=6)
    return [_save(fig, out / "patch.png")]


def logit_lens(result: dict[str, Any], out: Path, family: str) -> list[Path]:
    layers = np.asarray(result["layers"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    ax.plot(layers, result["base"], "o-", color="black", label="base")
    for arm, data in result["arms"].items():
        ax.plot(layers, data["gap"], "o-", color=arm_colour(arm), label=arm)
    ax.set_xlabel("layer")
    ax.set_ylabel("log P(pro) − log P(anti)")
    ax.set_title(f"{family}: logit lens at the answer position", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for arm, data in result["arms"].items():
        colour = arm_colour(arm)
        lo, hi = _summary_edges(data["random_minus_base"])
        ax.fill_between(layers, lo, hi, color=colour, alpha=0.15)
        ax.plot(layers, data["minus_base"], "o-", color=colour, label=f"{arm} (band: random token pairs)")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("arm − base")
    ax.legend(fontsize=7)
    return [_save(fig, out / "lens.png")]


def lora_delta(result: dict[str, Any], out: Path, family: str) -> list[Path]:
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    ax = axes[0]
    kinds = sorted({row["kind"] for job in result["modules"].values() for row in job["modules"]})
    first = next(iter(result["modules"].values()), {"modules": []})
    for kind in kinds:
        rows = [r for r in first["modules"] if r["kind"] == kind]
        lo, hi = _summary_edges([r["random"] for r in rows])
        xs = [r["layer"] for r in rows]
        ax.fill_between(xs, lo, hi, alpha=0.1)
    for arm, by_kind in result["amplification_by_arm"].items():
        for kind, by_layer in by_kind.items():
            ax.plot([int(k) for k in by_layer], list(by_layer.values()), ".-", lw=1,
                    color=arm_colour(arm), alpha=0.7)
    ax.axhline(1, color="gray", ls="--", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("amplification of the direction")
    ax.set_title(f"{family}: LoRA ΔW (lines: arm × module; band: random, one job)", fontsize=8)
    ax = axes[1]
    for job in result["modules"].values():
        rows = job["modules"]
        ax.scatter([r["layer"] for r in rows], [r["effective_rank"] for r in rows], s=6,
                   color=arm_colour(job["arm"]), alpha=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank of ΔW")
    ax = axes[2]
    for name, data in result["activation_delta"].items():
        colour = arm_colour(data["arm"])
        layers = np.arange(len(data["cosine"]))
        lo, hi = _summary_edges(data["random"])
        ax.fill_between(layers, lo, hi, color=colour, alpha=0.1)
        ax.plot(layers, data["cosine"], "o-", color=colour, lw=1, label=name)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("cos(mean activation delta, direction)")
    ax.legend(fontsize=6)
    return [_save(fig, out / "delta_w.png")]


FIGURES = {"steer": steering, "ablate": ablation, "patch": patching, "lens": logit_lens, "delta_w": lora_delta}
