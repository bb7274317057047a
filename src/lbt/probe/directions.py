"""The base model's cautious↔eager direction at every layer, computed once per base model and cached.

From the paired arm corpora (plus = FRAME+, cautious, frame_plus.jsonl; minus = FRAME−, eager,
frame_minus.jsonl; paired by scenario_id, the same user prompt in both) one forward per dialogue
(prompt + assistant turn, exactly as in training) gives, at every layer's output, three summaries per record:

- `assistant_mean`: mean over the assistant-turn tokens (the turn that carries the framing);
- `assistant_last`: the last assistant token;
- `user_mean`: mean over the prompt tokens (user turn + template) — the original study's choice, kept as a
  control: with the user prompts shared across arms its two class means coincide, so it carries no framing
  and its probe sits at chance.

For each summary and layer: the class-mean difference μ(FRAME−) − μ(FRAME+), its norm (the unit in which
steering coefficients are given) and unit vector (pointing to FRAME−, i.e. pro-change: positive projection
= pro-change, as every stance in lbt); the paired direction (mean of per-scenario differences — equal to
the class-mean difference when every scenario is in both corpora once, different when the corpora are
not fully paired) and the consistency of those differences (mean pairwise cosine); a logistic probe's
held-out accuracy (folds grouped by scenario, so a scenario's two versions never straddle train and test);
and the separation (Cohen's d of the two classes' projections on the unit direction).

ℓ* is the layer of best probe accuracy of the chosen summary. Ties (equal within 1e-9, which happens when
several layers separate the classes perfectly) go to the larger separation, then to the earlier layer.

Cache: `<cache_dir>/directions/<key>.pt` (+ `.json` summary), key = hash of the model identity (name,
path, random_init, init_seed, architecture, dtype), the two corpora's sha256, the extraction settings,
the chat format's template arguments and, when on, `hardware.fast.fused_norm` and `hardware.fast.sdpa_gqa`.
Parallel jobs of one model take an fcntl lock on `<key>.lock`: the first computes, the others wait and load.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lbt.choices import SUMMARIES
from lbt.data.chat import IGNORE_INDEX, ChatFormat
from lbt.data.records import CorpusRecord, file_sha256, load_corpus
from lbt.eval.batching import length_batches, pad_id_of, right_pad
from lbt.model.fused_norm import fused_norm_default
from lbt.model.gqa import sdpa_gqa_default
from lbt.model.modes import evaluation_mode
from lbt.probe import hooks
from lbt.probe.accuracy import probe_accuracies
from lbt.rundir import atomic_save, write_json_atomic
from lbt.study import ARMS, FRAMED_ARMS, MINUS, PLUS

log = logging.getLogger(__name__)

VERSION = 1  # bump when the extraction changes: old cache entries are then ignored
TIE = 1e-9


@dataclass(frozen=True)
class DirectionSettings:
    variant: str = "assistant_mean"
    max_length: int = 1024
    batch_size: int = 8
    probe_folds: int = 5


# -- activations ---------------------------------------------------------------------------------------

@torch.no_grad()
def corpus_activations(model: nn.Module, chat: ChatFormat, records: Sequence[CorpusRecord],
                       settings: DirectionSettings, label: str = "") -> dict[str, torch.Tensor]:
    """{summary: (N, L, D) float32 on CPU} for each record, one right-padded forward per batch."""
    examples = [chat.example(r.id, r.user, r.assistant, settings.max_length) for r in records]
    for record, example in zip(records, examples):
        if example.n_supervised == 0:
            raise ValueError(f"record {record.id} (line {record.line}): no assistant token within "
                             f"max_length={settings.max_length}")
    device = next(model.parameters()).device
    pad_id = pad_id_of(chat.tokenizer)
    n_layers = hooks.num_layers(model)
    out: dict[str, list[torch.Tensor | None]] = {s: [None] * len(records) for s in SUMMARIES}
    batches = list(length_batches([len(e.input_ids) for e in examples], settings.batch_size))
    started, reported = time.time(), 0
    for done, idx in enumerate(batches, 1):
        batch = right_pad([examples[i].input_ids for i in idx], pad_id, device)
        labels = [examples[i].labels for i in idx]
        width = batch["input_ids"].shape[1]
        assistant = torch.zeros(len(idx), width, dtype=torch.bool)
        for row, lab in enumerate(labels):
            assistant[row, :len(lab)] = torch.as_tensor(lab) != IGNORE_INDEX
        assistant = assistant.to(device)
        user = batch["attention_mask"].bool() & ~assistant
        with hooks.capture(model, reduce=_summariser(assistant, user)) as acts:
            model(**batch, use_cache=False, logits_to_keep=1)
        stacked = torch.stack([acts[layer] for layer in range(n_layers)], dim=1)  # (B, L, 3, D)
        for row, i in enumerate(idx):
            for k, summary in enumerate(SUMMARIES):
                out[summary][i] = stacked[row, :, k]
        # Progress about every 10 % of the records (the study's corpora take minutes on a CPU).
        if done == len(batches) or 10 * done // len(batches) > reported:
            reported = 10 * done // len(batches)
            log.info("directions: %s records %d/%d (%.0f s)", label or "corpus",
                     sum(len(b) for b in batches[:done]), len(records), time.time() - started)
    return {s: torch.stack(v) for s, v in out.items()}  # type: ignore[arg-type]


def _summariser(assistant: torch.Tensor, user: torch.Tensor):
    """reduce(hidden, layer, offset) -> (B, 3, D): assistant mean, last assistant token, user mean."""
    last = hooks.last_positions(assistant.long())
    rows = torch.arange(assistant.shape[0], device=assistant.device)

    def summarise(h: torch.Tensor, layer: int, offset: int) -> torch.Tensor:
        h = h.float()
        a_mean = (h * assistant[..., None]).sum(1) / assistant.sum(1, keepdim=True)
        u_mean = (h * user[..., None]).sum(1) / user.sum(1, keepdim=True)
        return torch.stack([a_mean, h[rows, last], u_mean], dim=1).cpu()
    return summarise


# -- directions from activations ----------------------------------------------------------------------

def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm; zero rows stay zero."""
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(1e-30), torch.zeros_like(x))


def mean_pairwise_cosine(diffs: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of rows of (S, D): (|Σ û|² − S) / (S (S − 1)); zero rows count 0."""
    s = diffs.shape[0]
    if s < 2:
        return float("nan")
    u = unit_rows(diffs.double())
    total = u.sum(0)
    nonzero = float((u.norm(dim=-1) > 0).sum())
    return float((total @ total - nonzero) / (s * (s - 1)))


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean a − mean b) / pooled SD (0 when both are constant and equal)."""
    na, nb = len(a), len(b)
    pooled = ((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / max(1, na + nb - 2)
    diff = float(a.mean() - b.mean())
    if pooled <= 0:
        return 0.0 if diff == 0 else float(np.sign(diff) * np.inf)
    return diff / float(np.sqrt(pooled))


def best_layer(accuracy: Sequence[float], separation: Sequence[float]) -> int:
    """ℓ*: best accuracy; ties (within 1e-9) → larger |separation| → earlier layer."""
    acc = np.nan_to_num(np.asarray(accuracy, dtype=float), nan=-1.0)
    sep = np.nan_to_num(np.abs(np.asarray(separation, dtype=float)), nan=-1.0, posinf=1e300)
    tied = np.flatnonzero(acc >= acc.max() - TIE)
    return int(tied[np.argmax(sep[tied])])  # argmax takes the first of equals: the earlier layer


def scenario_means(acts: torch.Tensor, scenarios: Sequence[str]) -> dict[str, torch.Tensor]:
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(scenarios):
        groups.setdefault(s, []).append(i)
    return {s: acts[idx].mean(0) for s, idx in groups.items()}


def fit_directions(plus: Mapping[str, torch.Tensor], minus: Mapping[str, torch.Tensor],
                   scenarios_plus: Sequence[str], scenarios_minus: Sequence[str], folds: int = 5
                   ) -> dict[str, Any]:
    """Per summary and layer: directions, norms, consistency, probe accuracy, separation, ℓ*.

    plus/minus: {summary: (N, L, D)} activations of the FRAME+ and FRAME− records."""
    result: dict[str, Any] = {"variants": {}, "l_star": {}}
    y = np.r_[np.zeros(len(scenarios_plus)), np.ones(len(scenarios_minus))]
    groups = list(scenarios_plus) + list(scenarios_minus)
    # Every summary's and layer's probe in one call: the fits are most of the time, and independent.
    features = {summary: [torch.cat([plus[summary][:, layer], minus[summary][:, layer]]).float().numpy()
                          for layer in range(plus[summary].shape[1])] for summary in plus}
    flat = probe_accuracies([x for summary in plus for x in features[summary]], y, groups, folds)
    for summary in plus:
        xp, xm = plus[summary].float(), minus[summary].float()
        diff = xm.mean(0) - xp.mean(0)  # (L, D), towards FRAME− (pro-change)
        mp, mm = scenario_means(xp, scenarios_plus), scenario_means(xm, scenarios_minus)
        shared = sorted(set(mp) & set(mm))
        paired = torch.stack([mm[s] - mp[s] for s in shared]) if shared else torch.zeros(0, *diff.shape)
        unit = unit_rows(diff)
        accuracy, flat = flat[:len(features[summary])], flat[len(features[summary]):]
        separation, consistency = [], []
        for layer, x in enumerate(features[summary]):
            proj = x @ unit[layer].numpy()
            separation.append(cohens_d(proj[y == 1], proj[y == 0]))
            consistency.append(mean_pairwise_cosine(paired[:, layer]) if len(shared) else float("nan"))
        paired_mean = paired.mean(0) if len(shared) else torch.zeros_like(diff)
        result["variants"][summary] = {
            "unit": unit, "norm": diff.norm(dim=-1), "paired_unit": unit_rows(paired_mean),
            "paired_norm": paired_mean.norm(dim=-1), "accuracy": accuracy, "separation": separation,
            "consistency": consistency}
        result["l_star"][summary] = best_layer(accuracy, separation)
    pooled = torch.cat([plus["assistant_mean"], minus["assistant_mean"]]).float()
    # Centred samples: random directions with the activations' covariance (v = Xcᵀ z) at any layer.
    result["centered"] = (pooled - pooled.mean(0)).half()
    result.update(n_plus=len(scenarios_plus), n_minus=len(scenarios_minus), n_pairs=len(shared))
    return result


# -- the cached set -------------------------------------------------------------------------------------

class Directions:
    """A cached direction set: per-layer unit directions, norms, probe accuracies and ℓ*."""

    def __init__(self, payload: dict[str, Any]):
        self.payload = payload
        self.key: str = payload["key"]
        self.variant: str = payload["settings"]["variant"]

    @property
    def n_layers(self) -> int:
        return int(self.payload["variants"][self.variant]["unit"].shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.payload["variants"][self.variant]["unit"].shape[1])

    def _v(self, variant: str | None) -> dict[str, Any]:
        return self.payload["variants"][variant or self.variant]

    def unit(self, variant: str | None = None, paired: bool = False) -> torch.Tensor:
        """(L, D) unit directions towards FRAME− (pro-change)."""
        return self._v(variant)["paired_unit" if paired else "unit"]

    def norm(self, variant: str | None = None) -> torch.Tensor:
        """(L,) class-mean-difference norms: the steering unit."""
        return self._v(variant)["norm"]

    def accuracy(self, variant: str | None = None) -> list[float]:
        return list(self._v(variant)["accuracy"])

    def l_star(self, variant: str | None = None) -> int:
        return int(self.payload["l_star"][variant or self.variant])

    def centered(self, layer: int) -> torch.Tensor:
        return self.payload["centered"][:, layer].float()

    def random(self, layer: int, n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
        """(n, D) random unit directions: `isotropic` (uniform on the sphere) or `covariance` (Gaussian with
        the covariance of the pooled assistant activations at that layer, v = Xcᵀ z)."""
        if kind == "isotropic":
            v = torch.randn(n, self.hidden_size, generator=generator)
        elif kind == "covariance":
            xc = self.centered(layer)
            v = torch.randn(n, xc.shape[0], generator=generator) @ xc
        else:
            raise ValueError(f"random direction kind {kind!r}: use isotropic or covariance")
        return unit_rows(v)

    def summary(self) -> dict[str, Any]:
        return summary_of(self.payload)


def summary_of(payload: Mapping[str, Any]) -> dict[str, Any]:
    variants = {name: {k: [float(x) for x in v[k]] for k in ("accuracy", "separation", "consistency", "norm")}
                for name, v in payload["variants"].items()}
    keep = ("key", "identity", "corpora", "settings", "l_star", "n_plus", "n_minus", "n_pairs", "created",
            "wall_time_s")
    return {**{k: payload[k] for k in keep if k in payload}, "variants": variants}


def model_identity(model_cfg: DictConfig | Mapping[str, Any], dtype: torch.dtype | str) -> dict[str, Any]:
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    arch = json.dumps(cfg.get("arch"), sort_keys=True, default=str)
    return {"name": cfg.get("name"), "path": cfg.get("path"), "random_init": bool(cfg.get("random_init")),
            "init_seed": cfg.get("init_seed"), "arch_sha256": hashlib.sha256(arch.encode()).hexdigest(),
            "dtype": str(dtype).replace("torch.", "")}


def direction_key(identity: Mapping[str, Any], corpora_sha: Mapping[str, str], settings: DirectionSettings,
                  chat: ChatFormat) -> str:
    material = {"identity": dict(identity), "corpora": dict(corpora_sha), "version": VERSION,
                "max_length": settings.max_length, "template_kwargs": dict(chat.template_kwargs),
                "folds": settings.probe_folds}
    if fused_norm_default():  # records read with one-kernel norms (hardware.fast.fused_norm) differ in rounding
        material["fused_norm"] = True
    if sdpa_gqa_default():  # and with grouped heads read in place (hardware.fast.sdpa_gqa)
        material["sdpa_gqa"] = True
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return f"{identity.get('name') or 'model'}-{digest}"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_or_compute(cache_dir: str | Path, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The cached payload of `key`, computed (once, under a file lock) when absent; written atomically."""
    folder = Path(cache_dir) / "directions"
    target = folder / f"{key}.pt"
    if target.exists():
        return torch.load(target, weights_only=False)
    with file_lock(folder / f"{key}.lock"):
        if target.exists():  # another job computed it while we waited
            return torch.load(target, weights_only=False)
        payload = compute()
        payload["key"] = key
        write_json_atomic(folder / f"{key}.json", summary_of(payload))
        atomic_save(target, lambda tmp: torch.save(payload, tmp))
    return payload


def get_directions(model: nn.Module, chat: ChatFormat, model_cfg: DictConfig | Mapping[str, Any],
                   corpora: Mapping[str, str | Path], cache_dir: str | Path,
                   settings: DirectionSettings = DirectionSettings()) -> Directions:
    """The direction set of this base model (adapters off), from the cache or computed now."""
    if settings.variant not in SUMMARIES:
        raise ValueError(f"probe direction variant {settings.variant!r}: use one of {list(SUMMARIES)}")
    missing = [arm for arm in FRAMED_ARMS if arm not in corpora]
    if missing:
        raise ValueError(f"probe corpora: {missing} missing (need paths for {list(FRAMED_ARMS)})")
    paths = {arm: Path(str(corpora[arm])) for arm in FRAMED_ARMS}
    for arm, path in paths.items():
        if not path.is_file():
            raise FileNotFoundError(f"probe corpora.{arm}: {path} not found")
    dtype = next(model.parameters()).dtype
    identity = model_identity(model_cfg, dtype)
    shas = {arm: file_sha256(path) for arm, path in paths.items()}
    # The key names each corpus by its file name (lbt.study.Arm.corpus), not the arm: direction sets cached
    # before the arms were renamed (issue 16) stay valid.
    key = direction_key(identity, {ARMS[arm].corpus: sha for arm, sha in shas.items()}, settings, chat)

    def compute() -> dict[str, Any]:
        started = time.time()
        records = {arm: load_corpus(path) for arm, path in paths.items()}
        with evaluation_mode(model, adapters=False):  # the base model: adapters off
            log.info("directions %s: not cached; computing them from %s (%s)", key,
                     " and ".join(f"{len(recs)} {arm} records" for arm, recs in records.items()), settings.variant)
            acts = {arm: corpus_activations(model, chat, recs, settings, label=arm) for arm, recs in records.items()}
        fitted = fit_directions(acts[PLUS.name], acts[MINUS.name],
                                [r.scenario_id for r in records[PLUS.name]],
                                [r.scenario_id for r in records[MINUS.name]], settings.probe_folds)
        fitted.update(identity=identity, corpora={arm: {"path": str(p), "sha256": shas[arm]} for arm, p in
                                                  paths.items()},
                      settings={"variant": settings.variant, "max_length": settings.max_length,
                                "template_kwargs": dict(chat.template_kwargs), "version": VERSION},
                      created=time.strftime("%Y-%m-%dT%H:%M:%S"), wall_time_s=round(time.time() - started, 3))
        log.info("directions %s: ℓ*=%s (%s), %.1f s", key, fitted["l_star"][settings.variant], settings.variant,
                 fitted["wall_time_s"])
        return fitted

    payload = load_or_compute(cache_dir, key, compute)
    payload["settings"] = {**payload["settings"], "variant": settings.variant}
    return Directions(payload)
