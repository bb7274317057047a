"""QLoRA next to bf16 LoRA: the study's recipe, the same base weights, the same steps, on one GPU.

    python benchmarks/qlora.py --out results/ --steps 10          # GPU: build the base, run both jobs, report
    python benchmarks/qlora.py --out results/ --steps 2 --model tiny --hardware cpu   # logic check on a CPU

1. `build`: a random-init model of the study's architecture (model=qwen model.random_init=true: the public
   config.json facts of Qwen2.5-3B-Instruct) with the project's tokenizer, saved in bf16 to a local folder,
   so that both jobs load the very same weights by path (there are no real weights on the benchmark machine).
2. `job`, once per variant, each in a fresh process (so peak memory is its own): `python -m lbt.train`'s own
   entry point (Hydra's main, this command line's overrides) with experiment=paper, model.path=<that folder>,
   eval=none probe=none logger=csv, train.max_steps=<steps> and train.epochs=<epochs> (the shipped corpus,
   128 records, gives 4 steps in the recipe's 2 epochs: 6 epochs give 10 steps, the cosine schedule spans
   those); the 4-bit job adds model.quantization=4bit.
   lbt records no GPU memory, so the process reads torch.cuda.max_memory_allocated after the job.
3. The report: tokens/s from each run.json, peak memory, the loss at every step, as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"bf16": [], "4bit": ["model.quantization=4bit"]}


def build(out: Path, model: str, device: str) -> None:
    """The random-init base model and the project's tokenizer, saved as a model folder."""
    import torch
    from hydra import compose, initialize_config_dir

    from lbt.model.load import load_model, load_tokenizer
    from lbt.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}", "model.random_init=true"])
    tokenizer = load_tokenizer(cfg.model)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    base = load_model(cfg.model, tokenizer, dtype, device=device)
    base.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"built {model} random-init ({sum(p.numel() for p in base.parameters()) / 1e9:.3f} B parameters, "
          f"{dtype}) in {out}", flush=True)


def job(result: Path, overrides: list[str]) -> None:
    """One `python -m lbt.train` job in this process; then its run card's numbers and the peak GPU memory."""
    import torch

    from lbt import train as train_mod
    from lbt.model.load import bitsandbytes_version

    sys.argv = ["lbt.train", *overrides]
    started = time.time()
    try:
        train_mod.main()
    except SystemExit as stop:  # Hydra's main exits on errors only; keep the numbers of what ran
        if stop.code:
            raise
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir="))
    card = json.loads((Path(run_dir) / "run.json").read_text())
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    result.write_text(json.dumps({
        "overrides": overrides, "status": card["status"], "trained_steps": card.get("trained_steps"),
        "tokens_per_s": card.get("tokens_per_s"), "loss_history": card.get("loss_history"),
        "wall_time_s": round(time.time() - started, 1), "peak_allocated_gib": peak,
        "versions": card.get("versions"), "bitsandbytes": bitsandbytes_version(), "git_sha": card.get("git_sha"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}, indent=1))


def report(results: dict[str, dict]) -> str:
    first = next(iter(results.values()))
    lines = ["| variant | status | tokens/s | peak GiB (max_memory_allocated) | job wall s | loss at steps 1..n |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        peak = f"{r['peak_allocated_gib']:.1f}" if r["peak_allocated_gib"] is not None else "—"
        losses = ", ".join(f"{v:.4f}" for v in r["loss_history"] or [])
        lines.append(f"| {name} | {r['status']} | {r['tokens_per_s']:,.0f} | {peak} | {r['wall_time_s']} | {losses} |")
    if len(results) == 2:
        a, b = (r["loss_history"] for r in results.values())
        gaps = [abs(x - y) for x, y in zip(a, b)]
        lines.append(f"\nmax |Δ loss| over the {len(gaps)} steps: {max(gaps):.4f}; "
                     f"last step: {gaps[-1]:.4f}")
    lines.append(f"\n{first['device']}; git {first['git_sha']}; bitsandbytes {first['bitsandbytes']}; "
                 f"versions {json.dumps(first['versions'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("job", help="(internal) one job in this process")
    one.add_argument("result", type=Path)
    one.add_argument("overrides", nargs="*")
    make = sub.add_parser("build", help="(internal) save the random-init base model")
    make.add_argument("folder", type=Path)
    make.add_argument("model")
    make.add_argument("device")
    parser.add_argument("--out", type=Path, default=Path("outputs/qlora_bench"))
    parser.add_argument("--base", type=Path, default=None, help="model folder to build (default <out>/base)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=6, help="enough epochs of the corpus for --steps")
    parser.add_argument("--model", default="qwen")
    parser.add_argument("--hardware", default="gpu")
    parser.add_argument("--variants", default="bf16,4bit")
    args = parser.parse_args(argv)
    if args.command == "job":
        job(args.result, args.overrides)
        return
    if args.command == "build":
        build(args.folder, args.model, args.device)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.base or args.out / "base"
    if not (base / "config.json").exists():
        # In a process of its own: this one must hold no GPU memory while the jobs run.
        subprocess.run([sys.executable, __file__, "build", str(base), args.model,
                        "cuda" if args.hardware == "gpu" else "cpu"], check=True, env=os.environ)
    results = {}
    for name in args.variants.split(","):
        overrides = ["experiment=paper", f"model={args.model}", f"model.path={base}", "model.random_init=false",
                     f"hardware={args.hardware}",
                     "model.dtype=null", "eval=none", "probe=none", "logger=csv", f"train.max_steps={args.steps}",
                     f"train.epochs={args.epochs}",
                     f"hydra.run.dir={args.out / ('job_' + name)}", *VARIANTS[name]]
        result = args.out / f"{name}.json"
        print(f"== {name}: python -m lbt.train {' '.join(overrides)}", flush=True)
        subprocess.run([sys.executable, __file__, "job", str(result), *overrides], check=True, env=os.environ)
        results[name] = json.loads(result.read_text())
    table = report(results)
    (args.out / "report.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
