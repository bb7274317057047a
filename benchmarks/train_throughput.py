"""LoRA training throughput: the naive peft path vs lbt's hardware=gpu path, same process, same card.

    python benchmarks/train_throughput.py --model qwen --steps 8 --warmup 2
    python benchmarks/train_throughput.py --model tiny --device cpu --steps 2 --warmup 1   # logic check

Both paths train the same optimizer steps (the study's recipe: r 16, alpha 32, dropout 0.05, 7 targets,
bf16, effective batch 64) on a corpus with the shipped corpora's length distribution (the frame_plus
records, chat-templated, replicated to ~3,000), from the same random-init weights and adapter init:
  naive: HF model + peft defaults (fp32 adapters), padded micro-batches in random order, logits over the
         full vocabulary at every position;
  lbt:   the functions `python -m lbt.train hardware=gpu` uses: fp32 adapters computed under bf16 autocast,
         length-sorted padded micro-batches, chunked supervised-only cross-entropy (-fce: fused, as
         hardware=gpu runs it), decoder layers compiled (variants without -eager; compiled layers learn the
         same adapter but log a slightly lower bf16 loss: benchmarks/RESULTS.md, compile_check).
The first compiled variant of each kind of graph (-dyn, -irng, -cdt, -fold, -liger) first runs its steps once
untimed (--no-prime skips that), so each variant is timed with inductor's cache as warm as a sweep's later jobs
have it: unprimed, the first variant compiled new shapes inside its timed steps (1.2-1.8 s against 1.03-1.16 s a
step on an H100: benchmarks/RESULTS.md). --profile also gives, per region of the step (forward+loss, backward,
optimizer), the time in which the GPU ran no kernel: where it waited for the host.
Reported: real (non-pad) tokens/s, MFU (4·N FLOPs per token, N = parameters; 989 TFLOP/s bf16 dense on
an H100 SXM), peak memory, the loss of both after the same steps. A smoke check then saves the lbt
adapter, reloads it into a fresh model and compares logits, and checks a capture hook under compile.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from profiling import REGION, idle_by_region, kernel_seconds
from torch.profiler import record_function

from lbt.data.chat import ChatFormat
from lbt.data.datamodule import micro_batches, step_plan
from lbt.data.records import load_corpus
from lbt.model.folded_lora import fold_lora
from lbt.model.load import load_model, load_tokenizer
from lbt.model.lora import compile_decoder_layers, eager_layers, wrap_lora
from lbt.model.module import supervised_token_loss

ROOT = Path(__file__).resolve().parents[1]
PEAK_FLOPS = {"cuda": 989e12, "cpu": 1e12}


def corpus_examples(tokenizer, max_length: int, target: int) -> list:
    path = ROOT / "data" / "corpora" / "frame_plus.jsonl"
    records = load_corpus(path)
    chat = ChatFormat(tokenizer)
    examples = [chat.example(r.id, r.user, r.assistant, max_length) for r in records]
    return [examples[i % len(examples)] for i in range(target)]


def apply_liger(model) -> None:
    """Liger's Triton kernels for RoPE, RMSNorm and SwiGLU on this model (its cross-entropies off: lbt's
    chunked loss stays). Liger also swaps transformers' module-level rotary function, so every later model
    of the process has it: run -liger variants last."""
    import liger_kernel.transformers as liger

    apply = {"qwen2": liger.apply_liger_kernel_to_qwen2, "llama": liger.apply_liger_kernel_to_llama}
    kind = model.config.model_type
    if kind not in apply:
        raise SystemExit(f"-liger: no Liger patch for model type {kind!r} (known: {sorted(apply)})")
    apply[kind](rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
                model=model)


def build(model_cfg, tokenizer, device, lora_cfg, adapters: str, compile_layers: bool,
          compiled_rng: bool = False, dynamic: bool | None = None, tuned: bool = False, fold: bool = False,
          liger: bool = False):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(model_cfg, tokenizer, dtype, device=device)
    if liger:
        apply_liger(model)
    model = wrap_lora(model, lora_cfg, adapters=adapters)
    if fold:
        fold_lora(model)
    torch.manual_seed(1234)  # the same adapter init in both paths
    for name, p in model.named_parameters():
        if "lora_A" in name:
            torch.nn.init.normal_(p, std=0.02)
    if compile_layers:
        import torch._inductor.config as inductor_config

        compile_decoder_layers(model, dynamic=dynamic)
        if compiled_rng:  # inductor's own dropout RNG instead of eager's (compiling is lazy: takes effect)
            inductor_config.fallback_random = False
        # Inductor tunes each generated (non-GEMM) kernel's block sizes by coordinate descent, or not.
        inductor_config.coordinate_descent_tuning = tuned
    model.train()
    return model


def run_path(name, model, steps_batches, device, lr, ce_chunk, warmup, autocast=False, profile=False,
             fused_ce=False):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses, tokens, seconds = [], 0, 0.0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i, (step_tokens, batches) in enumerate(steps_batches):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        prof = None
        if profile and i == len(steps_batches) - 1:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
        losses_on_device = []
        for micro in batches:
            with record_function(REGION + "forward+loss"):
                micro = {k: v.to(device) for k, v in micro.items()}
                with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
                    if name == "naive":
                        loss_sum, _ = supervised_token_loss(model, micro)
                    else:
                        loss_sum, _ = supervised_token_loss(model, micro, supervised_logits_only=True,
                                                            ce_chunk=ce_chunk, fused_ce=fused_ce)
            with record_function(REGION + "backward"):
                (loss_sum / step_tokens).backward()
            losses_on_device.append(loss_sum.detach())  # read once the step is done, as training_step does
        with record_function(REGION + "optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        total = float(sum(losses_on_device))
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if prof is not None:
            prof.__exit__(None, None, None)
            print_profile(prof, dt)
        losses.append(total / step_tokens)
        if i >= warmup:
            seconds += dt
            tokens += sum(int(m["n_real_tokens"]) for m in batches)
        print(f"  {name} step {i}: loss {losses[-1]:.5f} {dt:.2f} s", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"tokens_per_s": tokens / seconds if seconds else float("nan"), "losses": losses,
            "peak_mem_gib": peak, "timed_tokens": tokens, "timed_seconds": seconds}


def print_profile(prof, wall_s: float) -> None:
    """The step's kernels by device time, and how much of the step's wall the GPU was busy."""
    averages = prof.key_averages()
    print(averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))
    busy, gemm = kernel_seconds(averages), kernel_seconds(averages, gemm_only=True)
    print(f"  profiled step: wall {wall_s:.3f} s (profiler on), kernels {busy:.3f} s "
          f"({busy / wall_s:.0%} of wall), GEMM kernels {gemm:.3f} s ({gemm / max(busy, 1e-9):.0%} of kernels)")
    for region, (wall, idle) in idle_by_region(prof.events()).items():
        print(f"  GPU idle in {region.removeprefix(REGION)}: {idle:.3f} s of {wall:.3f} s")


def smoke_checks(model, model_cfg, tokenizer, device, lora_cfg, out_dir: Path) -> dict:
    """Adapters save and reload to the same logits; a capture hook sees output_hidden_states."""
    from peft import PeftModel

    model.eval()
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")
    autocast.__enter__()
    ids = torch.tensor([tokenizer("Is it worth trying a new sourdough starter?")["input_ids"]], device=device)
    with torch.no_grad(), eager_layers(model):
        ref = model(ids, use_cache=False).logits.float()
        hidden = model(ids, use_cache=False, output_hidden_states=True).hidden_states
        captured = {}
        layer = model.get_base_model().model.layers[1]
        handle = layer.register_forward_hook(
            lambda m, a, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        model(ids, use_cache=False)
        handle.remove()
    hook_err = float((captured["h"].float() - hidden[2].float()).abs().max())
    model.save_pretrained(str(out_dir / "adapter"))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    fresh = PeftModel.from_pretrained(load_model(model_cfg, tokenizer, dtype, device=device), str(out_dir / "adapter"))
    with torch.no_grad():
        again = fresh(ids, use_cache=False).logits.float()
    autocast.__exit__(None, None, None)
    return {"reload_max_logit_diff": float((again - ref).abs().max()), "hook_vs_hidden_states_max_diff": hook_err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen", choices=["tiny", "qwen", "llama"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--naive-micro-batch", type=int, default=16)
    ap.add_argument("--variants", default="mb16-eager",
                    help="lbt variants, comma-separated: mb<N> = length-sorted padded micro-batches of N, "
                         "pack<N> = packed rows of N tokens; suffixes: -bf16 or -fp32 adapters (default autocast), "
                         "-eager (no compile), -fullce (supervised-only logits, no chunking), "
                         "-irng (compiled dropout draws inductor's RNG, not eager's), "
                         "-nodrop (LoRA dropout 0: the bound on what a faster dropout could gain), "
                         "-fce (hardware.fast.fused_ce: each chunk's loss and gradient in one pass), "
                         "-dyn (layers compiled with every size a symbol from the first step, not as jobs do), "
                         "-cdt (inductor's coordinate-descent tuning of its generated kernels' block sizes), "
                         "-fold (hardware.fast.fold_lora: gate/up LoRA B products inside the base GEMMs), "
                         "-liger (Liger's RoPE, RMSNorm and SwiGLU kernels; the liger-kernel package; put it last: "
                         "its rotary function stays swapped for the rest of the process)")
    ap.add_argument("--ce-chunk", type=int, default=4096)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="kernel profile of the last variant's last step, and the share of its wall the GPU was busy")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--no-prime", action="store_true",
                    help="time the first compiled variant without an untimed pass before it (its timed steps then "
                         "include compiling new shapes, as a sweep's first job does)")
    ap.add_argument("--out", default="/tmp/lbt-bench")
    args = ap.parse_args()

    model_cfg = OmegaConf.load(ROOT / "src" / "lbt" / "conf" / "model" / f"{args.model}.yaml")
    model_cfg.random_init = True
    tokenizer = load_tokenizer(model_cfg)
    train_cfg = OmegaConf.load(ROOT / "src" / "lbt" / "conf" / "train.yaml").train
    lora_cfg = train_cfg.lora
    effective = int(train_cfg.effective_batch)
    examples = corpus_examples(tokenizer, int(train_cfg.max_length), 3000)
    plan = step_plan(len(examples), effective, 1, seed=0)[:args.steps]
    pad_id = tokenizer.pad_token_id
    naive_steps = []
    for members in plan:
        chosen = [examples[j] for j in members]  # random order, padded per micro-batch (HF collator style)
        batches = [micro_batches(chosen[i:i + args.naive_micro_batch], 10**6, pad_id)[0]
                   for i in range(0, len(chosen), args.naive_micro_batch)]
        naive_steps.append((sum(e.n_supervised for e in chosen), batches))
    results = {"model": args.model, "device": args.device, "gpu": torch.cuda.get_device_name() if
               args.device == "cuda" else "cpu", "steps": args.steps, "warmup": args.warmup,
               "examples_per_step": effective, "ce_chunk": args.ce_chunk,
               "compile": not args.no_compile, "lr": float(train_cfg.lr)}
    n_params = None
    if not args.skip_naive:
        model = build(model_cfg, tokenizer, args.device, lora_cfg, adapters="fp32", compile_layers=False)
        n_params = sum(p.numel() for p in model.parameters())
        print("naive path", flush=True)
        results["naive"] = run_path("naive", model, naive_steps, args.device, float(train_cfg.lr), 0, args.warmup)
        del model
        torch.cuda.empty_cache() if args.device == "cuda" else None
    model = None
    primed_graphs: set[tuple[bool, ...]] = set()
    for variant in args.variants.split(","):
        layout, *flags = variant.split("-")
        adapters = "bf16" if "bf16" in flags else "fp32" if "fp32" in flags else "autocast"
        compile_layers = not args.no_compile and "eager" not in flags
        ce_chunk = 0 if "fullce" in flags else args.ce_chunk
        variant_lora = OmegaConf.merge(lora_cfg, {"dropout": 0.0}) if "nodrop" in flags else lora_cfg
        size = int(layout.removeprefix("mb").removeprefix("pack"))
        packed = layout.startswith("pack")
        steps = [(sum(examples[j].n_supervised for j in m),
                  micro_batches([examples[j] for j in m], size, pad_id, pack_tokens=size if packed else 0))
                 for m in plan]
        # What the compiled layers' graphs depend on.
        graphs = ("dyn" in flags, "irng" in flags, "cdt" in flags, "fold" in flags, "liger" in flags)
        passes = ["prime", "timed"] if compile_layers and not args.no_prime and graphs not in primed_graphs else ["timed"]
        for run in passes:
            del model
            torch.cuda.empty_cache() if args.device == "cuda" else None
            torch._dynamo.reset()
            model = build(model_cfg, tokenizer, args.device, variant_lora, adapters=adapters,
                          compile_layers=compile_layers, compiled_rng="irng" in flags,
                          dynamic=True if "dyn" in flags else None, tuned="cdt" in flags, fold="fold" in flags,
                          liger="liger" in flags)
            if run == "prime":  # untimed: compiles this run's shapes into inductor's cache, as a sweep's first job does
                print(f"priming {variant}", flush=True)
                run_path("prime", model, steps, args.device, float(train_cfg.lr), ce_chunk, len(steps),
                         autocast=adapters == "autocast", fused_ce="fce" in flags)
                primed_graphs.add(graphs)
        n_params = n_params or sum(p.numel() for p in model.parameters())
        print(f"lbt path {variant}", flush=True)
        results[f"lbt_{variant}"] = run_path("lbt", model, steps, args.device, float(train_cfg.lr),
                                             ce_chunk, args.warmup, autocast=adapters == "autocast",
                                             profile=args.profile and variant == args.variants.split(",")[-1],
                                             fused_ce="fce" in flags)
    results["n_params"] = n_params
    for key, res in list(results.items()):
        if isinstance(res, dict) and "tokens_per_s" in res:
            res["mfu"] = 4 * n_params * res["tokens_per_s"] / PEAK_FLOPS[args.device]
            if "naive" in results and key != "naive":
                res["speedup_vs_naive"] = res["tokens_per_s"] / results["naive"]["tokens_per_s"]
                res["max_loss_diff_vs_naive"] = max(abs(a - b) for a, b in zip(results["naive"]["losses"],
                                                                               res["losses"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results["smoke"] = smoke_checks(model, model_cfg, tokenizer, args.device, lora_cfg, out)
    print(json.dumps(results, indent=2))
    (out / f"train_throughput_{args.model}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
