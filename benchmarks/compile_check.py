"""Does the compiled training path compute the same gradients as eager? One model, one micro-batch, the
gradients of every LoRA weight under several settings, compared pairwise.

    python benchmarks/compile_check.py --model qwen --device cuda     # the H100 check
    python benchmarks/compile_check.py --model tiny --device cpu      # logic check

The model is built once with per-layer `torch.compile` (as `hardware=gpu` trains); `eager_layers` runs the
same weights without the compiled graphs. LoRA B starts at small random values (a trained-looking adapter)
so that every A gets a gradient too. For each setting: the loss and the flattened gradient of all adapter
weights. Reported per pair: the norm ratio, the cosine, and the relative difference |g1 - g2| / |g1|, next
to the noise floor of two eager runs that differ only in the dropout seed. Compiled must sit at the
floor or below; a larger gap means compile changes what the model learns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import corpus_examples

from lbt.data.datamodule import micro_batches
from lbt.model.load import load_model, load_tokenizer
from lbt.model.lora import compile_decoder_layers, eager_layers, wrap_lora
from lbt.model.module import supervised_token_loss


def gradients(model, batch, device, seed: int, autocast: bool) -> tuple[float, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if device == "cuda":
        torch.cuda.manual_seed(seed)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
        loss_sum, n = supervised_token_loss(model, batch, supervised_logits_only=True, ce_chunk=4096)
    (loss_sum / n).backward()
    named = {k: p.grad.detach().float().flatten() for k, p in model.named_parameters() if p.requires_grad}
    flat = torch.cat(list(named.values()))
    by_kind: dict[str, float] = {}
    for k, g in named.items():
        kind = ".".join(part for part in k.split(".") if part.endswith("proj") or part.startswith("lora_"))
        by_kind[kind] = by_kind.get(kind, 0.0) + float(g.pow(2).sum())
    return float(loss_sum / n), flat, {k: v ** 0.5 for k, v in by_kind.items()}


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"norm_ratio": float(b.norm() / a.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            "rel_diff": float((a - b).norm() / a.norm())}


def step_batches(tokenizer, n_steps: int, effective: int = 64, micro: int = 16) -> list[tuple[int, list[dict]]]:
    """The first optimizer steps of the benchmark corpus: (supervised tokens, length-sorted micro-batches)."""
    from lbt.data.datamodule import step_plan

    examples = corpus_examples(tokenizer, 512, 3000)
    plan = step_plan(len(examples), effective, 1, seed=0)[:n_steps]
    return [(sum(examples[j].n_supervised for j in m),
             micro_batches([examples[j] for j in m], micro, tokenizer.pad_token_id)) for m in plan]


class FreshAdapter:
    """The trainable weights and one fresh initialisation of them (B = 0, A small random), restorable."""

    def __init__(self, model):
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        torch.manual_seed(0)
        self.init = {n: (torch.zeros_like(p) if "lora_B" in n else torch.randn_like(p) * 0.02)
                     for n, p in self.params.items()}

    def reset(self) -> torch.optim.Optimizer:
        """Back to the fresh weights, no gradients left over; a new AdamW (lr 1e-4, the study's)."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.init[n])
        self.model.zero_grad(set_to_none=True)
        return torch.optim.AdamW(list(self.params.values()), lr=1e-4)

    def clip(self) -> float:
        return float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), 1.0))


@contextlib.contextmanager
def lora_dropout(model, p: float):
    modules = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    saved = [m.p for m in modules]
    for m in modules:
        m.p = p
    try:
        yield
    finally:
        for m, old in zip(modules, saved):
            m.p = old


def step_loss(model, step, device, autocast: bool, compiled: bool, grad: bool) -> float:
    """Token-mean loss of one optimizer step's micro-batches (eager layers unless compiled); with grad,
    the gradients are accumulated as training does."""
    step_tokens, micros = step
    total = 0.0
    context = contextlib.nullcontext() if compiled else eager_layers(model)
    with context, torch.set_grad_enabled(grad):
        for mb in micros:
            mb = {k: v.to(device) for k, v in mb.items() if isinstance(v, torch.Tensor)}
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
                loss_sum, _ = supervised_token_loss(model, mb, supervised_logits_only=True, ce_chunk=4096)
            if grad:
                (loss_sum / step_tokens).backward()
            total += float(loss_sum.detach())
    return total / step_tokens


def train_curves(model, tokenizer, device, autocast: bool, steps: int) -> dict:
    """Loss and pre-clip gradient norm per optimizer step, from the same fresh adapter and batches:
    eager with two dropout seeds (the noise floor), compiled, and both without dropout (AdamW lr 1e-4,
    clip 1.0: the study's recipe)."""
    batches = step_batches(tokenizer, steps)
    adapter = FreshAdapter(model)
    curves = {}
    runs = [(0.05, False, 5), (0.05, False, 6), (0.05, True, 5), (0.0, False, 5), (0.0, True, 5)]
    for drop, compiled, seed in runs:
        opt = adapter.reset()
        torch.manual_seed(seed)
        losses, norms = [], []
        with lora_dropout(model, drop):
            for step in batches:
                losses.append(step_loss(model, step, device, autocast, compiled, grad=True))
                norms.append(adapter.clip())
                opt.step()
                opt.zero_grad(set_to_none=True)
        name = f"{'compiled' if compiled else 'eager'}_dropout{drop}_seed{seed}"
        curves[name] = {"loss": losses, "grad_norm": norms}
        print(f"  {name:22s} loss " + " ".join(f"{v:.5f}" for v in losses)
              + "  | grad norm " + " ".join(f"{v:.3g}" for v in norms), flush=True)
    return curves


def cross_eval(model, tokenizer, device, autocast: bool) -> dict:
    """Is the gap in the update or in the forward? Dropout off; from a fresh adapter, one optimizer step
    eager and one compiled; then the next batch's loss of each updated adapter under both forwards, and the
    two updates compared per LoRA matrix kind."""
    steps = step_batches(tokenizer, 2)
    adapter = FreshAdapter(model)
    updated, out = {}, {"loss_next_batch": {}}
    with lora_dropout(model, 0.0):
        for compiled in (False, True):
            opt = adapter.reset()
            step_loss(model, steps[0], device, autocast, compiled, grad=True)
            adapter.clip()
            opt.step()
            model.zero_grad(set_to_none=True)
            name = "compiled" if compiled else "eager"
            updated[name] = {n: (p.detach() - adapter.init[n]).float().clone() for n, p in adapter.params.items()}
            for forward in (False, True):
                key = f"{name}-updated adapter, {'compiled' if forward else 'eager'} forward"
                out["loss_next_batch"][key] = step_loss(model, steps[1], device, autocast, forward, grad=False)
                print(f"  {key:48s} next-batch loss {out['loss_next_batch'][key]:.5f}", flush=True)
    out["update"] = {}
    for kind in ("lora_A", "lora_B"):
        e = torch.cat([v.flatten() for n, v in updated["eager"].items() if kind in n])
        c = torch.cat([v.flatten() for n, v in updated["compiled"].items() if kind in n])
        out["update"][kind] = {"eager_norm": float(e.norm()), "compiled_norm": float(c.norm()),
                               "cosine": float(torch.nn.functional.cosine_similarity(e, c, dim=0)) if e.norm() > 0
                               and c.norm() > 0 else None,
                               "eager_nonzero": int((e != 0).sum()), "compiled_nonzero": int((c != 0).sum())}
        print(f"  update {kind}: {out['update'][kind]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen", choices=["tiny", "qwen", "llama"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--adapters", default="autocast", choices=["fp32", "autocast", "bf16"])
    ap.add_argument("--train-steps", type=int, default=0,
                    help="then train this many optimizer steps from a fresh adapter (B = 0) on the same batches: "
                         "eager (two dropout seeds), compiled, and both without dropout; print the loss curves")
    ap.add_argument("--cross-eval", action="store_true",
                    help="only: one eager and one compiled update, each adapter's next-batch loss under both forwards")
    ap.add_argument("--curves-only", action="store_true", help="only the training curves of --train-steps")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = args.device
    cfg = OmegaConf.load(ROOT / "src" / "lbt" / "conf" / "model" / f"{args.model}.yaml")
    cfg.random_init = True
    tokenizer = load_tokenizer(cfg)
    lora = OmegaConf.load(ROOT / "src" / "lbt" / "conf" / "train.yaml").train.lora
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = wrap_lora(load_model(cfg, tokenizer, dtype, device=device), lora, adapters=args.adapters)
    torch.manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    compile_decoder_layers(model)
    model.train()
    examples = corpus_examples(tokenizer, 512, args.micro_batch)
    batch = micro_batches(examples, args.micro_batch, tokenizer.pad_token_id)[0]
    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    autocast = args.adapters == "autocast"
    runs = {}
    if args.cross_eval:
        result = cross_eval(model, tokenizer, device, args.adapters == "autocast")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return
    if args.curves_only:
        curves = train_curves(model, tokenizer, device, autocast, args.train_steps)
        if args.json:
            args.json.write_text(json.dumps({"model": args.model, "device": torch.cuda.get_device_name()
                                             if device == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"),
                                             "training": curves}, indent=2) + "\n", encoding="utf-8")
        return
    t0 = time.perf_counter()
    runs["compiled_s1"] = gradients(model, batch, device, 1, autocast)
    print(f"compiled (incl. compile) {time.perf_counter() - t0:.1f} s", flush=True)
    runs["compiled_s1_again"] = gradients(model, batch, device, 1, autocast)
    with eager_layers(model):
        runs["eager_s1"] = gradients(model, batch, device, 1, autocast)
        runs["eager_s1_again"] = gradients(model, batch, device, 1, autocast)
        runs["eager_s2"] = gradients(model, batch, device, 2, autocast)
        model.eval()  # dropout off: no randomness left on either side
        runs["eager_nodrop"] = gradients(model, batch, device, 1, autocast)
    runs["compiled_nodrop"] = gradients(model, batch, device, 1, autocast)
    model.train()
    result = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "adapters": args.adapters, "micro_batch": args.micro_batch, "date": time.strftime("%Y-%m-%d"),
              "losses": {k: v[0] for k, v in runs.items()}, "pairs": {}}
    pairs = [("eager_s1", "eager_s1_again"), ("compiled_s1", "compiled_s1_again"), ("eager_s1", "eager_s2"),
             ("eager_s1", "compiled_s1"), ("eager_nodrop", "compiled_nodrop"), ("eager_nodrop", "eager_s1")]
    for a, b in pairs:
        result["pairs"][f"{a} vs {b}"] = compare(runs[a][1], runs[b][1])
    kinds = sorted(runs["eager_s1"][2])
    result["grad_norm_by_kind"] = {k: {name: runs[name][2][k] for name in ("eager_s1", "compiled_s1",
                                                                          "eager_nodrop", "compiled_nodrop")}
                                   for k in kinds}
    for name, (loss, _, _) in runs.items():
        print(f"  loss {name:18s} {loss:.6f}")
    for pair, c in result["pairs"].items():
        print(f"  {pair:34s} norm ratio {c['norm_ratio']:.4f} cosine {c['cosine']:.6f} rel diff {c['rel_diff']:.2e}")
    for kind, norms in result["grad_norm_by_kind"].items():
        print(f"  {kind:22s} " + " ".join(f"{n}={v:.3e}" for n, v in norms.items()))
    if args.train_steps:
        result["training"] = train_curves(model, tokenizer, device, autocast, args.train_steps)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
