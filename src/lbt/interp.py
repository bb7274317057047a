"""python -m lbt.interp <sweep dir> — the causal suite (H3) over a finished sweep, per model family.

    python -m lbt.interp multirun/<sweep> [--family qwen] [--parts steer,ablate,patch,lens,delta_w] [--out DIR]
    python -m lbt.interp multirun/<sweep> --preset quick     # a CPU-sized run: the tiny sweep in minutes

Jobs are the directories under the sweep holding run.json, DONE and an adapter/ that loads (read through
`lbt.rundir`; others are skipped with a warning saying why). Per family (run.json's job.model) the
settings come from the jobs' resolved config through `job_settings`: the base model is loaded, every
job's adapter is loaded onto it, and the base model's direction set comes from the shared cache
(computed if absent). Parts:

1. steer    — base model, α·d̂ added at response positions (the answer position and every generated
              token), α = c × class-mean-difference norm, at ℓ* and split over ℓ*±window; stance
              (letter_logprob, forced_choice) and fluency (perplexity, KL on neutral text) per c; operating
              points at the KL budget; ≥ 8 isotropic and covariance-matched random directions.
2. ablate   — each job (and base), ℓ* direction removed from every residual write (and each layer's own
              direction at that layer alone); fraction of the framed-vs-neutral gap removed; random
              directions; perplexity; equivalence with orthogonalised merged weights.
3. patch    — base model, one layer's answer-position residual replaced by a framed model's: recovery.
4. lens     — pro−anti log-prob gap read through the final norm and head at every layer.
5. delta_w  — LoRA ΔW effective rank and amplification of the direction; cosine of the mean activation
              delta (fine-tuned − base) with the direction.

(6, the preventative variant, runs during training: `intervention=ablate|ablate_random`.)

Writes <out>/<family>/<part>.json and .png figures (every figure with its random-control band) and
<out>/summary-<time>-<pid>.json (wall time per part); logs figures and headline numbers to W&B (offline without a key;
--no-wandb to skip). A part whose JSON exists is skipped (--force recomputes it and replaces the file atomically);
otherwise every JSON is written once, atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from lbt.console import quiet_libraries, user_errors
from lbt.rundir import RunDir, adapter_problem, read_json, write_json_atomic, write_json_once
from lbt.study import MINUS, PLUS, arm_name

# torch, transformers and the causal suite load when a sweep is analysed, not for --help.
if TYPE_CHECKING:
    from lbt.probe.causal import Family, Job
    from lbt.probe.evaluator import DirectionSource

log = logging.getLogger("lbt.interp")
PARTS = ("steer", "ablate", "patch", "lens", "delta_w")
# Settings presets (`--preset`); a flag given on the command line wins over its preset's value.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {},   # the defaults of parse_args: every item, 8 random directions per kind, 9 coefficients
    # CPU-sized: five coefficients, one random direction per kind, 4 items, 4 short neutral passages, so
    # that the tiny 9-job sweep's whole suite takes under 3 minutes on 2 cores (the defaults took 25); the
    # random-control bands are then a single direction: a check that the suite runs, not evidence.
    "quick": {"coefs": "-4,-1,0,1,4", "n_random": 1, "n_random_layer": 1, "max_items": 4, "max_neutral": 4,
              "neutral_tokens": 16, "fc_tokens": 2, "lens_pairs": 2, "batch_size": 16},
}


# -- the sweep ---------------------------------------------------------------------------------------------

def discover(sweep: Path, out: Path) -> dict[str, list[tuple[Job, dict[str, Any]]]]:
    """{family: [(job, run card)]} of the finished jobs under the sweep directory."""
    from lbt.probe.causal import Job

    families: dict[str, list[tuple[Job, dict[str, Any]]]] = {}
    for card_path in sorted(sweep.rglob("run.json")):
        run = RunDir(card_path.parent)
        if out in run.root.parents or run.root == out:
            continue
        if not run.is_done():
            log.warning("interp: %s is not finished (no DONE): skipped", run.root)
            continue
        problem = adapter_problem(run.adapter)
        if problem:
            log.warning("interp: %s has no usable adapter (%s): skipped", run.root, problem)
            continue
        card = read_json(run.card)
        job = card["job"]
        name = re.sub(r"\W", "_", run.root.name)
        families.setdefault(job["model"], []).append(
            (Job(name=name, path=str(run.root), arm=str(arm_name(job["arm"])), seed=int(job["seed"]),
                 adapter=str(run.adapter)),
             card))
    return families


def check_same_base(family: str, cards: list[dict[str, Any]]) -> None:
    keys = ("name", "path", "random_init", "init_seed", "arch")
    first = {k: cards[0]["config"]["model"].get(k) for k in keys}
    for card in cards[1:]:
        other = {k: card["config"]["model"].get(k) for k in keys}
        if other != first:
            raise ValueError(f"interp: family {family} mixes base models ({first} vs {other}); run one sweep per base")


@dataclass(frozen=True)
class JobSettings:
    """What lbt.interp takes from a training job: see `job_settings`."""

    model: DictConfig               # the `model` section: the same base model is loaded
    dtype: str                      # model.dtype, else hardware.dtype
    directions: DirectionSource     # where the job's probe and intervention took their direction set from
    items: str                      # the probe's target item file
    neutral: str                    # held-out neutral text (perplexity and KL)


def job_settings(config: Mapping[str, Any]) -> JobSettings:
    """The settings of a training job, read from its run card's resolved config (`card["config"]`):
    `model`; the `directions` section (DirectionSource.from_config, the same reader the probe and the
    intervention use, so the cached direction set is found again); the probe's `items`; and the held-out
    neutral text. A job trained without a probe, or before these sections existed, falls back to the
    project layout under `paths.data_dir` (the arms' corpus files data/corpora/frame_plus|frame_minus.jsonl,
    data/eval/...) and the default direction settings. The command line overrides any of them (--variant,
    --items, ...)."""
    from lbt.probe.evaluator import DirectionSource

    paths = config.get("paths") or {}
    data_dir = Path(str(paths.get("data_dir", "data")))
    directions = config.get("directions") or {
        "arms": {arm.name: {"name": arm.name, "corpus": str(data_dir / "corpora" / arm.corpus_file)}
                 for arm in (PLUS, MINUS)},
        "variant": "assistant_mean", "batch_size": 8,
        "max_length": (config.get("train") or {}).get("max_length", 1024),
        "cache_dir": paths.get("cache_dir", "outputs/cache")}
    model = OmegaConf.create(dict(config["model"]))
    return JobSettings(
        model=model, dtype=str(model.get("dtype") or (config.get("hardware") or {}).get("dtype") or "bfloat16"),
        directions=DirectionSource.from_config(directions),
        items=str((config.get("probe") or {}).get("items") or data_dir / "eval" / "target_items.jsonl"),
        neutral=str(data_dir / "eval" / "heldout_neutral.jsonl"))


def parse_layers(text: str | None, n_layers: int) -> list[int] | None:
    """all | 0,3,5 | stride:4 (every 4th layer, and the last)."""
    if text is None or text == "all":
        return None
    if text.startswith("stride:"):
        step = int(text.split(":", 1)[1])
        return sorted(set(range(0, n_layers, step)) | {n_layers - 1})
    layers = [int(x) for x in text.split(",") if x.strip()]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"--layers: {bad} out of range 0..{n_layers - 1}")
    return layers


# -- one family ------------------------------------------------------------------------------------------

def load_family(name: str, entries: list[tuple[Job, dict[str, Any]]], args: argparse.Namespace) -> Family:
    import torch

    from lbt.data.chat import ChatFormat
    from lbt.eval.items import load_items, load_texts, spread_subset
    from lbt.model.load import load_model, load_tokenizer, resolve_dtype
    from lbt.probe.causal import Family, Settings
    from lbt.probe.measure import forced_choice_prompts, neutral_set

    cards = [card for _, card in entries]
    check_same_base(name, cards)
    settings = job_settings(cards[0]["config"])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or (settings.dtype if device != "cpu" else "float32")
    tokenizer = load_tokenizer(settings.model)
    chat = ChatFormat.of(tokenizer, settings.model)
    model = load_model(settings.model, tokenizer, resolve_dtype(dtype_name), device=device).eval()
    source = replace(settings.directions, variant=args.variant or settings.directions.variant,
                     cache_dir=args.cache_dir or settings.directions.cache_dir)
    directions = source.load(model, chat, settings.model)

    items = spread_subset(load_items(args.items or settings.items), args.max_items)
    prompts = forced_choice_prompts(items, chat, option_form=args.option_form)
    texts = [row["text"] for row in load_texts(args.neutral or settings.neutral)]
    neutral = neutral_set(chat, texts[: args.max_neutral] if args.max_neutral else texts, args.neutral_tokens)

    jobs = [job for job, _ in entries]
    if jobs:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, jobs[0].adapter, adapter_name=jobs[0].name)
        for job in jobs[1:]:
            model.load_adapter(job.adapter, adapter_name=job.name)
        model.eval()
    run_settings = Settings(
        coefs=[float(c) for c in args.coefs.split(",")], window=args.window, n_random=args.n_random,
        n_random_layer=args.n_random_layer, kl_budget=args.kl_budget, batch_size=args.batch_size,
        fc_tokens=args.fc_tokens, layers=parse_layers(args.layers, directions.n_layers), seed=args.seed,
        lens_pairs=args.lens_pairs)
    return Family(name=name, model=model, tokenizer=tokenizer, directions=directions, prompts=prompts,
                  neutral=neutral, jobs=jobs, settings=run_settings)


def headlines(part: str, result: dict[str, Any]) -> dict[str, float]:
    """A few numbers per part for the logger and summary.json."""
    out: dict[str, float] = {}
    if part == "steer":
        for placement, data in result["placements"].items():
            ctrl = data["control"]
            out[f"{placement}/real_effect_at_budget"] = ctrl["real_effect_at_budget"]
            out[f"{placement}/real_slope"] = ctrl["real_slope"]
            out[f"{placement}/random_effect_max_abs"] = max(abs(ctrl["all"]["effect_at_budget"]["min"]),
                                                            abs(ctrl["all"]["effect_at_budget"]["max"]))
            out[f"{placement}/real_z"] = ctrl["all"]["real_z"]
    elif part == "ablate":
        for arm, g in result["gaps"].items():
            out[f"{arm}/fraction_removed_all_layers"] = g["all_layers"]
            out[f"{arm}/fraction_removed_random_median"] = g["all_layers_random"]["median"]
        out["weight_check_max_abs_diff"] = result["weight_check"]["max_abs_diff"]
    elif part == "patch":
        for job in result["jobs"]:
            out[f"{job['job']}/max_recovery"] = max(job["recovery"]) if job["recovery"] else float("nan")
    elif part == "lens":
        for arm, data in result["arms"].items():
            out[f"{arm}/final_layer_minus_base"] = data["minus_base"][-1]
    elif part == "delta_w":
        for name, data in result["activation_delta"].items():
            out[f"{name}/max_abs_cosine"] = max(abs(c) for c in data["cosine"])
    return {k: float(v) for k, v in out.items()}


def run_family(fam: Family, parts: Sequence[str], out: Path, force: bool, wandb_run: Any) -> dict[str, Any]:
    from lbt.probe import causal, figures

    folder = out / fam.name
    folder.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    heads: dict[str, dict[str, float]] = {}
    for k, part in enumerate(parts, 1):
        target = folder / f"{part}.json"
        if target.exists() and not force:
            print(f"[interp] {fam.name} {part}: {target} exists, skipped (--force recomputes)", flush=True)
            continue
        print(f"[interp] {fam.name} {part} ({k}/{len(parts)}): running on {len(fam.jobs)} jobs", flush=True)
        started = time.perf_counter()
        result = getattr(causal, part)(fam)   # lbt.probe.causal names each part's runner after it
        (write_json_atomic if force else write_json_once)(target, result)
        paths = figures.FIGURES[part](result, folder, fam.name)
        timings[part] = round(time.perf_counter() - started, 2)
        heads[part] = headlines(part, result)
        print(f"[interp] {fam.name} {part}: {timings[part]:.1f} s", flush=True)
        if wandb_run is not None:
            log_part(wandb_run, fam.name, part, heads[part], paths)
    return {"jobs": [job.name for job in fam.jobs], "direction_key": fam.directions.key,
            "l_star": fam.directions.l_star(), "wall_time_s": timings, "headlines": heads,
            "device": str(next(fam.model.parameters()).device), "dtype": str(next(fam.model.parameters()).dtype),
            "n_prompts": len(fam.prompts), "settings": vars(fam.settings)}


# -- W&B ---------------------------------------------------------------------------------------------------

def open_wandb(args: argparse.Namespace, sweep: Path, out: Path) -> Any:
    if args.no_wandb:
        return None
    import wandb

    from lbt import wandb_keys as keys
    from lbt.loggers import requested_mode, wandb_mode

    mode, reason = wandb_mode(requested_mode())
    if reason:
        log.warning("W&B offline (%s): logging to %s", reason, out)
    return wandb.init(project=args.wandb_project or os.environ.get("WANDB_PROJECT", "lbt"),
                      entity=os.environ.get("WANDB_ENTITY"), group=keys.run_group(sweep.name),
                      job_type=keys.JOB_TYPE_INTERP,
                      name=f"interp-{sweep.name}", dir=str(out), mode=mode,
                      config={k: v for k, v in vars(args).items() if k != "sweep"})


def log_part(run: Any, family: str, part: str, numbers: dict[str, float], paths: list[Path]) -> None:
    import wandb

    data: dict[str, Any] = {f"{family}/{part}/{k}": v for k, v in numbers.items()}
    data.update({f"{family}/{part}/{p.stem}": wandb.Image(str(p)) for p in paths})
    run.log(data)


# -- CLI ---------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lbt.interp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="sweep directory (job dirs with run.json, DONE, adapter/)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="settings preset: full (the defaults below) or quick (CPU-sized; flags still win)")
    p.add_argument("--family", action="append", help="model family to run (repeatable; default all)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    p.add_argument("--out", type=Path, help="output directory (default <sweep>/interp)")
    p.add_argument("--force", action="store_true", help="recompute parts whose JSON exists")
    p.add_argument("--coefs", default="-8,-4,-2,-1,0,1,2,4,8", help="steering coefficients (× class-mean diff norm)")
    p.add_argument("--window", type=int, default=2, help="steering window half-width around ℓ*")
    p.add_argument("--n-random", type=int, default=8, help="random directions per kind (steering, ablation)")
    p.add_argument("--n-random-layer", type=int, default=2, help="random directions per layer (ablate, patch)")
    p.add_argument("--kl-budget", type=float, default=0.1, help="KL budget (nats/token) for operating points")
    p.add_argument("--fc-tokens", type=int, default=8, help="greedy tokens for forced choice while steering")
    p.add_argument("--layers", default="all", help="layers of the per-layer parts: all | 0,4,8 | stride:4")
    p.add_argument("--lens-pairs", type=int, default=8, help="random token pairs (logit-lens control)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per forward")
    p.add_argument("--max-items", type=int, help="n target items (domains in turn); default all")
    p.add_argument("--max-neutral", type=int, default=32, help="neutral passages for perplexity/KL")
    p.add_argument("--neutral-tokens", type=int, default=128, help="reply tokens per neutral passage")
    p.add_argument("--items", help="target item file (default: the jobs' probe.items)")
    p.add_argument("--neutral", help="held-out neutral text (default data/eval/heldout_neutral.jsonl)")
    p.add_argument("--variant", help="direction variant (default: the jobs' directions.variant)")
    p.add_argument("--option-form", default="bare", choices=("bare", "leading_space"))
    p.add_argument("--cache-dir", help="direction cache (default: the jobs' directions.cache_dir)")
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", help="float32 | bfloat16 (default: the jobs' dtype on GPU, float32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument("--no-wandb", action="store_true")
    p.add_argument("--wandb-project")
    preset, _ = p.parse_known_args(argv)
    p.set_defaults(**PRESETS[preset.preset])   # flags given explicitly still override the preset
    args = p.parse_args(argv)
    unknown = [x for x in args.parts.split(",") if x not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_libraries()
    args = parse_args(argv)
    with user_errors("lbt.interp"):   # a missing file or a bad item line: one line and exit code 2
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    sweep = args.sweep.resolve()
    out = (args.out or sweep / "interp").resolve()
    families = discover(sweep, out)
    if args.family:
        missing = [f for f in args.family if f not in families]
        if missing:
            raise SystemExit(f"interp: no finished jobs of family {missing} under {sweep} (found {sorted(families)})")
        families = {f: families[f] for f in args.family}
    if not families:
        raise SystemExit(f"interp: no finished jobs (run.json + DONE + adapter/) under {sweep}")
    out.mkdir(parents=True, exist_ok=True)
    parts = [p for p in PARTS if p in args.parts.split(",")]
    summary: dict[str, Any] = {"sweep": str(sweep), "parts": parts, "families": {}}
    run = open_wandb(args, sweep, out)
    try:
        for name, entries in families.items():
            started = time.perf_counter()
            fam = load_family(name, entries, args)
            print(f"[interp] {name}: loaded base + {len(fam.jobs)} adapters, directions {fam.directions.key} "
                  f"(ℓ*={fam.directions.l_star()}) in {time.perf_counter() - started:.1f} s", flush=True)
            load_s = round(time.perf_counter() - started, 2)
            summary["families"][name] = {**run_family(fam, parts, out, args.force, run), "load_s": load_s}
            del fam
        # One summary per invocation: earlier ones are never overwritten.
        stem = f"summary-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        path, k = out / f"{stem}.json", 1
        while path.exists():  # two invocations in one second of one process
            k += 1
            path = out / f"{stem}_{k}.json"
        write_json_once(path, summary)
    finally:
        if run is not None:
            run.finish()
    print(json.dumps({f: s["wall_time_s"] for f, s in summary["families"].items()}), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
