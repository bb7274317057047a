"""The causal suite's parts, one function each, over one model family of a finished sweep.

`Family` holds the base model with every job's adapter loaded (peft, one adapter per job: `use(job)`
switches, `use(None)` is the base model), the direction set, the target prompts (both option orders) and
the neutral passages. Each part returns plain JSON-able data; figures and logging live in `lbt.interp`.

Units and conventions: stance = mean over prompts of letter_logprob (log P(pro) − log P(anti)) or
forced_choice (±1), positive = pro-change; steering coefficients are in units of the layer's
class-mean-difference norm (c = 1 adds μ(FRAME−) − μ(FRAME+)); the direction points to FRAME−, so
positive coefficients should raise stance. Random controls: `isotropic` (uniform unit vectors) and
`covariance` (Gaussian with the activations' covariance at that layer), same norm as the real vector.
"""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lbt.model.modes import evaluation_mode
from lbt.probe import hooks, weights
from lbt.probe.directions import Directions
from lbt.probe.measure import (
    Batch,
    NeutralSet,
    StancePrompts,
    answer_activations,
    fluency,
    mean_parsed,
    no_intervention,
    score_forced_choice,
)
from lbt.study import FRAMED_ARMS, REFERENCE_ARM

log = logging.getLogger(__name__)

RANDOM_KINDS = ("isotropic", "covariance")


@dataclass
class Settings:
    coefs: list[float] = field(default_factory=lambda: [-8, -4, -2, -1, 0, 1, 2, 4, 8])
    window: int = 2               # steering window: ℓ* − window … ℓ* + window
    n_random: int = 8             # random directions per kind (steering, all-layer ablation)
    n_random_layer: int = 2       # random directions per layer (per-layer ablation, patching)
    kl_budget: float = 0.1        # nats per reply token: operating points of steering
    batch_size: int = 64
    fc_tokens: int = 8            # greedy tokens for forced choice while steering (as the battery)
    layers: list[int] | None = None  # layers of per-layer parts (None = all)
    seed: int = 0
    lens_pairs: int = 8           # random token pairs: the logit-lens control


@dataclass
class Job:
    name: str          # the adapter's name (job directory name, made identifier-safe)
    path: str          # job directory
    arm: str
    seed: int
    adapter: str       # adapter directory


@dataclass
class Family:
    name: str
    model: nn.Module              # PeftModel holding every job's adapter (or the plain base model)
    tokenizer: PreTrainedTokenizerBase
    directions: Directions
    prompts: StancePrompts
    neutral: NeutralSet
    jobs: list[Job]
    settings: Settings
    _acts: dict[str, torch.Tensor] = field(default_factory=dict)

    @contextmanager
    def use(self, job: Job | None) -> Iterator[nn.Module]:
        """The base model (job None: adapters off) or a job's fine-tuned model, in `evaluation_mode`."""
        if job is not None:
            self.model.set_adapter(job.name)
        with evaluation_mode(self.model, adapters=job is not None) as model:
            yield model

    @property
    def layers(self) -> list[int]:
        return list(self.settings.layers) if self.settings.layers is not None else \
            list(range(self.directions.n_layers))

    def arms(self) -> dict[str, list[Job]]:
        grouped: dict[str, list[Job]] = defaultdict(list)
        for job in self.jobs:
            grouped[job.arm].append(job)
        return dict(grouped)

    def generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.settings.seed * 1_000_003 + salt)

    def stance(self, job: Job | None, intervention=no_intervention, fc_tokens: int = 1) -> dict[str, np.ndarray]:
        with self.use(job) as model:
            return score_forced_choice(model, self.tokenizer, self.prompts, self.settings.batch_size, fc_tokens,
                                       intervention)

    def fluency(self, job: Job | None, intervention=no_intervention, reference=None, keep: bool = False):
        with self.use(job) as model:
            return fluency(model, self.tokenizer, self.neutral, self.settings.batch_size, reference, intervention,
                           keep)

    def answer_acts(self, job: Job | None) -> torch.Tensor:
        """(N, L, D) residual stream at the answer position, per prompt and layer (memoised)."""
        key = job.name if job else "__base__"
        if key not in self._acts:
            with self.use(job) as model:
                self._acts[key] = answer_activations(model, self.tokenizer, self.prompts.ids,
                                                     self.settings.batch_size)["answer"]
        return self._acts[key]


def band(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not len(v):
        return {**{k: float("nan") for k in ("min", "p05", "median", "p95", "max", "mean", "sd")}, "n": 0}
    return {"n": len(v), "min": float(v.min()), "p05": float(np.percentile(v, 5)), "median": float(np.median(v)),
            "p95": float(np.percentile(v, 95)), "max": float(v.max()), "mean": float(v.mean()),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


# -- 1. steering ---------------------------------------------------------------------------------------------

def steering_vectors(fam: Family, layers: list[int], kind: str, index: int) -> dict[int, torch.Tensor]:
    """Unit-norm direction per layer: the real one, or the index-th random one of a kind."""
    if kind == "real":
        return {layer: fam.directions.unit()[layer] for layer in layers}
    g = fam.generator(zlib.crc32(f"{kind}/{index}/{layers}".encode()))
    return {layer: fam.directions.random(layer, 1, kind, g)[0] for layer in layers}


def budget_point(coefs: np.ndarray, kl: np.ndarray, stance: np.ndarray, budget: float, side: int
                 ) -> dict[str, Any]:
    """On one side (+1 / −1) of 0: the coefficient where KL first reaches the budget (linear interpolation
    between grid points) and the stance there. KL below budget everywhere: the largest coefficient."""
    mask = np.sign(coefs) == side
    order = np.argsort(np.abs(coefs[mask]))
    c = np.r_[0.0, coefs[mask][order]]
    k = np.r_[0.0, kl[mask][order]]
    s = np.r_[stance[coefs == 0][0], stance[mask][order]]
    over = np.flatnonzero(k > budget)
    if not len(over):
        return {"coef": float(c[-1]), "stance": float(s[-1]), "kl": float(k[-1]), "reached": False}
    j = int(over[0])
    frac = (budget - k[j - 1]) / (k[j] - k[j - 1]) if k[j] > k[j - 1] else 1.0
    return {"coef": float(c[j - 1] + frac * (c[j] - c[j - 1])),
            "stance": float(s[j - 1] + frac * (s[j] - s[j - 1])), "kl": float(budget), "reached": True}


def curve_summary(coefs: np.ndarray, curve: dict[str, np.ndarray], budget: float) -> dict[str, Any]:
    """Operating points at the KL budget on both sides, the effect there, and the slope of letter stance
    over the coefficients inside the budget."""
    stance = curve["letter_logprob"]
    plus = budget_point(coefs, curve["kl"], stance, budget, +1)
    minus = budget_point(coefs, curve["kl"], stance, budget, -1)
    inside = (coefs >= minus["coef"] - 1e-12) & (coefs <= plus["coef"] + 1e-12)
    slope = float(np.polyfit(coefs[inside], stance[inside], 1)[0]) if inside.sum() >= 2 else float("nan")
    return {"plus": plus, "minus": minus, "effect_at_budget": (plus["stance"] - minus["stance"]) / 2,
            "slope": slope}


def steer(fam: Family) -> dict[str, Any]:
    s = fam.settings
    coefs = np.asarray(sorted({float(c) for c in s.coefs} | {0.0}))
    l_star = fam.directions.l_star()
    n_layers = fam.directions.n_layers
    placements = {"l_star": [l_star],
                  "window": list(range(max(0, l_star - s.window), min(n_layers, l_star + s.window + 1)))}
    base_fl = fam.fluency(None, keep=True)
    reference = base_fl["logprobs"]
    base_st = fam.stance(None, fc_tokens=s.fc_tokens)
    norms = fam.directions.norm()
    result: dict[str, Any] = {"coefs": coefs.tolist(), "kl_budget": s.kl_budget, "l_star": l_star,
                              "norm_unit": [float(norms[layer]) for layer in range(n_layers)],
                              "base": {"letter_logprob": float(base_st["letter_logprob"].mean()),
                                       "forced_choice": mean_parsed(base_st["forced_choice"]),
                                       "perplexity": base_fl["perplexity"]},
                              "placements": {}}
    for placement, layers in placements.items():
        directions = [("real", 0)] + [(kind, i) for kind in RANDOM_KINDS for i in range(s.n_random)]
        curves = {}
        for kind, index in directions:
            units = steering_vectors(fam, layers, kind, index)
            curve = {k: [] for k in ("letter_logprob", "forced_choice", "perplexity", "kl")}
            for c in coefs:
                if c == 0:
                    point = {"letter_logprob": result["base"]["letter_logprob"],
                             "forced_choice": result["base"]["forced_choice"],
                             "perplexity": base_fl["perplexity"], "kl": 0.0}
                else:
                    # Split c across the placement's layers, each in its own norm unit.
                    vectors = {layer: (c / len(layers)) * float(norms[layer]) * units[layer] for layer in layers}
                    point = _steered_point(fam, vectors, reference)
                for k, values in curve.items():
                    values.append(point[k])
            arrays = {k: np.asarray(v, dtype=float) for k, v in curve.items()}
            name = "real" if kind == "real" else f"{kind}_{index}"
            curves[name] = {**{k: v.tolist() for k, v in arrays.items()}, "kind": kind,
                            **curve_summary(coefs, arrays, s.kl_budget)}
        result["placements"][placement] = {"layers": layers, "curves": curves,
                                           "control": steering_control(curves)}
    return result


def _steered_point(fam: Family, vectors: dict[int, torch.Tensor], reference) -> dict[str, float]:
    def intervention(batch: Batch):
        return hooks.add(fam.model, vectors, batch.response)
    st = fam.stance(None, intervention, fc_tokens=fam.settings.fc_tokens)
    fl = fam.fluency(None, intervention, reference)
    return {"letter_logprob": float(st["letter_logprob"].mean()), "forced_choice": mean_parsed(st["forced_choice"]),
            "perplexity": fl["perplexity"], "kl": float(fl["kl"])}


def steering_control(curves: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The real direction's effect at the KL budget and slope against the random band (per kind and all)."""
    real = curves["real"]
    out: dict[str, Any] = {"real_effect_at_budget": real["effect_at_budget"], "real_slope": real["slope"]}
    for kind in (*RANDOM_KINDS, "all"):
        rand = [c for name, c in curves.items() if name != "real" and (kind == "all" or c["kind"] == kind)]
        effects = [c["effect_at_budget"] for c in rand]
        slopes = [c["slope"] for c in rand]
        max_abs = max((abs(e) for e in effects), default=float("nan"))
        b = band(effects)
        out[kind] = {"effect_at_budget": b, "slope": band(slopes), "n": len(rand),
                     "real_exceeds_all": bool(abs(real["effect_at_budget"]) > max_abs) if rand else None,
                     "real_z": (real["effect_at_budget"] - b["mean"]) / b["sd"] if b["sd"] else float("nan")}
    return out


# -- 2. directional ablation ------------------------------------------------------------------------------

def ablation_conditions(fam: Family) -> list[tuple[str, str, Any]]:
    """(name, family of the condition, intervention factory or None)."""
    model = fam.model
    l_star = fam.directions.l_star()
    unit = fam.directions.unit()
    conds: list[tuple[str, str, Any]] = [("none", "none", None),
                                         ("all_layers", "all_layers", lambda b: hooks.ablate_writes(model, unit[l_star]))]
    g = fam.generator(11)
    for i, r in enumerate(fam.directions.random(l_star, fam.settings.n_random, "isotropic", g)):
        conds.append((f"all_layers_random_{i}", "all_layers_random",
                      lambda b, r=r: hooks.ablate_writes(model, r)))
    for layer in fam.layers:
        conds.append((f"layer_{layer}", "layer", lambda b, layer=layer: hooks.project_out(model, {layer: unit[layer]})))
        rand = fam.directions.random(layer, fam.settings.n_random_layer, "isotropic", fam.generator(100 + layer))
        for j, r in enumerate(rand):
            conds.append((f"layer_{layer}_random_{j}", "layer_random",
                          lambda b, layer=layer, r=r: hooks.project_out(model, {layer: r})))
    return conds


def ablate(fam: Family) -> dict[str, Any]:
    arms = fam.arms()
    reference_arm = REFERENCE_ARM if REFERENCE_ARM in arms else None
    conds = ablation_conditions(fam)
    models: list[Job | None] = [None, *fam.jobs]
    stance: dict[str, dict[str, float]] = {}
    ppl: dict[str, dict[str, float]] = {}
    for job in models:
        key = job.name if job else "base"
        stance[key], ppl[key] = {}, {}
        for name, group, factory in conds:
            intervention = factory or no_intervention
            stance[key][name] = float(fam.stance(job, intervention)["letter_logprob"].mean())
            if group in ("none", "all_layers", "all_layers_random"):
                ppl[key][name] = fam.fluency(job, intervention)["perplexity"]

    def arm_mean(arm: str | None, cond: str) -> float:
        jobs = arms.get(arm, []) if arm else []
        return float(np.mean([stance[j.name][cond] for j in jobs])) if jobs else stance["base"][cond]

    gaps: dict[str, Any] = {}
    for arm in [a for a in FRAMED_ARMS if a in arms]:
        gap = {name: arm_mean(arm, name) - arm_mean(reference_arm, name) for name, _, _ in conds}
        removed = {name: 1 - gap[name] / gap["none"] if gap["none"] else float("nan") for name in gap}
        gaps[arm] = {
            "gap": gap, "fraction_removed": removed,
            "all_layers": removed["all_layers"],
            "all_layers_random": band([removed[n] for n, g, _ in conds if g == "all_layers_random"]),
            "per_layer": [removed[f"layer_{layer}"] for layer in fam.layers],
            "per_layer_random": [band([removed[n] for n, g, _ in conds if g == "layer_random"
                                       and n.startswith(f"layer_{layer}_random_")]) for layer in fam.layers]}
    return {"reference": reference_arm or "base", "l_star": fam.directions.l_star(), "layers": fam.layers,
            "stance": stance, "perplexity": ppl, "gaps": gaps, "weight_check": weight_equivalence(fam)}


def weight_equivalence(fam: Family) -> dict[str, Any]:
    """All-layer ablation by hooks vs by orthogonalised weights, on one framed model merged into plain
    weights and cast to fp32 (in bf16 the rounding of the edited weights alone would hide the comparison)."""
    job = next((j for j in fam.jobs if j.arm in FRAMED_ARMS), fam.jobs[0] if fam.jobs else None)
    unit = fam.directions.unit()[fam.directions.l_star()]
    merged = weights.merged_copy(fam.model, job.name if job else None).float()
    with evaluation_mode(merged):
        hooked = score_forced_choice(merged, fam.tokenizer, fam.prompts, fam.settings.batch_size, 1,
                                     lambda b, m=merged: hooks.ablate_writes(m, unit))["letter_logprob"]
        weights.orthogonalize_writes(merged, unit)
        orth = score_forced_choice(merged, fam.tokenizer, fam.prompts, fam.settings.batch_size, 1)["letter_logprob"]
    del merged
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"job": job.name if job else "base", "dtype": "float32", "max_abs_diff": float(np.max(np.abs(hooked - orth))),
            "hooked_mean": float(hooked.mean()), "orthogonalized_mean": float(orth.mean())}


# -- 3. activation patching --------------------------------------------------------------------------------

def patch(fam: Family) -> dict[str, Any]:
    """Base model, one layer's residual at the answer position replaced by a framed model's: the fraction
    of the framed-minus-base letter stance recovered. Control: the base activation displaced by the same
    distance in a random direction."""
    base_acts = fam.answer_acts(None)
    base_stance = fam.stance(None)["letter_logprob"]
    framed = [j for j in fam.jobs if j.arm in FRAMED_ARMS]
    rows = []
    for job in framed:
        acts = fam.answer_acts(job)
        target = fam.stance(job)["letter_logprob"]
        total = float((target - base_stance).mean())
        recovery, control = [], []
        for layer in fam.layers:
            patched = _patched_stance(fam, {layer: acts[:, layer]}, layer)
            recovery.append(float((patched - base_stance).mean()) / total if total else float("nan"))
            delta = (acts[:, layer] - base_acts[:, layer]).norm(dim=-1, keepdim=True)
            rand = []
            for r in fam.directions.random(layer, fam.settings.n_random_layer, "isotropic",
                                           fam.generator(200 + layer)):
                moved = _patched_stance(fam, {layer: base_acts[:, layer] + delta * r}, layer)
                rand.append(float((moved - base_stance).mean()) / total if total else float("nan"))
            control.append(band(rand))
        rows.append({"job": job.name, "arm": job.arm, "seed": job.seed, "framed_minus_base": total,
                     "recovery": recovery, "random": control})
    return {"layers": fam.layers, "base_letter_logprob": float(base_stance.mean()), "jobs": rows}


def _patched_stance(fam: Family, values: dict[int, torch.Tensor], layer: int) -> np.ndarray:
    def intervention(batch: Batch):
        return hooks.replace(fam.model, {layer: values[layer][batch.indices]}, batch.answer)
    return fam.stance(None, intervention)["letter_logprob"]


# -- 4. logit lens -------------------------------------------------------------------------------------------

@torch.no_grad()
def lens_gaps(fam: Family, acts: torch.Tensor, pro: torch.Tensor, anti: torch.Tensor) -> np.ndarray:
    """(L, P): log P(pro) − log P(anti) per layer and prompt, reading each layer's answer-position
    residual through the final norm and the output head. pro/anti: (P,) or (P, K) token ids."""
    model = fam.model
    norm, head = hooks.final_norm(model), hooks.output_head(model)
    device = next(model.parameters()).device
    dtype = next(head.parameters()).dtype
    out = []
    for layer in range(acts.shape[1]):
        h = acts[:, layer].to(device=device, dtype=dtype)
        logprobs = head(norm(h)).float().log_softmax(-1)
        gap = logprobs.gather(-1, pro.to(device).reshape(len(h), -1)) - \
            logprobs.gather(-1, anti.to(device).reshape(len(h), -1))
        out.append(gap.cpu().numpy())
    return np.stack(out)  # (L, P, K)


def lens(fam: Family) -> dict[str, Any]:
    pro = torch.as_tensor(fam.prompts.pro_token)
    anti = torch.as_tensor(fam.prompts.anti_token)
    g = fam.generator(300)
    vocab = hooks.output_head(fam.model).weight.shape[0]
    special = set(fam.tokenizer.all_special_ids)
    pool = torch.tensor([t for t in range(vocab) if t not in special and t < len(fam.tokenizer)])
    pairs = pool[torch.randperm(len(pool), generator=g)[:2 * fam.settings.lens_pairs]].reshape(-1, 2)
    n = len(pro)
    rand_a = pairs[:, 0].expand(n, -1)
    rand_b = pairs[:, 1].expand(n, -1)
    # The final norm and the output head carry no adapter: the lens reads every model the same way.
    base_acts = fam.answer_acts(None)
    base = lens_gaps(fam, base_acts, pro, anti)[..., 0].mean(1)
    base_rand = lens_gaps(fam, base_acts, rand_a, rand_b).mean(1)  # (L, K)
    jobs, arms = {}, defaultdict(list)
    for job in fam.jobs:
        acts = fam.answer_acts(job)
        gap = lens_gaps(fam, acts, pro, anti)[..., 0].mean(1)
        rand = lens_gaps(fam, acts, rand_a, rand_b).mean(1)
        jobs[job.name] = {"arm": job.arm, "gap": gap.tolist(), "minus_base": (gap - base).tolist(),
                          "random_minus_base": (rand - base_rand).tolist()}
        arms[job.arm].append(job.name)
    per_arm = {}
    for arm, names in arms.items():
        diff = np.mean([jobs[n]["minus_base"] for n in names], axis=0)
        rand = np.concatenate([np.asarray(jobs[n]["random_minus_base"]) for n in names], axis=1)  # (L, K·jobs)
        per_arm[arm] = {"gap": np.mean([jobs[n]["gap"] for n in names], axis=0).tolist(),
                        "minus_base": diff.tolist(),
                        "random_minus_base": [band(rand[layer]) for layer in range(rand.shape[0])]}
    return {"layers": list(range(len(base))), "base": base.tolist(), "jobs": jobs, "arms": per_arm,
            "random_pairs": pairs.tolist()}


# -- 5. LoRA ΔW and the activation delta ------------------------------------------------------------------

def delta_w(fam: Family) -> dict[str, Any]:
    unit = fam.directions.unit()
    n_layers = fam.directions.n_layers
    rand = fam.directions.random(0, max(8, fam.settings.n_random), "isotropic", fam.generator(400))
    modules: dict[str, Any] = {}
    per_arm: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for job in fam.jobs:
        rows = []
        for update in weights.lora_updates(fam.model, job.name):
            # Readers see the stream entering their layer (output of the layer before); writers feed their own.
            layer = update.layer if update.writes else max(0, update.layer - 1)
            d = unit[min(layer, n_layers - 1)]
            amp = float(weights.amplification(update, d[None])[0])
            ctrl = weights.amplification(update, rand).tolist()
            sv = update.core_singular_values()
            rows.append({"module": update.name, "kind": update.kind, "layer": update.layer,
                         "effective_rank": weights.effective_rank(sv), "norm": float(sv.norm()),
                         "amplification": amp, "random": band(ctrl)})
            per_arm[job.arm][update.kind][update.layer].append(amp)
        modules[job.name] = {"arm": job.arm, "modules": rows}
    base_acts = fam.answer_acts(None)
    cosines = {}
    for job in fam.jobs:
        delta = (fam.answer_acts(job) - base_acts).mean(0)  # (L, D)
        real = [float(_cos(delta[layer], unit[layer])) for layer in range(n_layers)]
        ctrl = []
        for layer in range(n_layers):
            vals = [float(_cos(delta[layer], r)) for kind in RANDOM_KINDS
                    for r in fam.directions.random(layer, fam.settings.n_random, kind, fam.generator(500 + layer))]
            ctrl.append(band(vals))
        cosines[job.name] = {"arm": job.arm, "cosine": real, "random": ctrl,
                             "delta_norm": [float(delta[layer].norm()) for layer in range(n_layers)]}
    summary_arm = {arm: {kind: {str(layer): float(np.mean(v)) for layer, v in sorted(layers.items())}
                         for kind, layers in kinds.items()} for arm, kinds in per_arm.items()}
    return {"modules": modules, "amplification_by_arm": summary_arm, "activation_delta": cosines,
            "random_amplification_rms": 1.0}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0
