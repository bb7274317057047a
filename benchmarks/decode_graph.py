"""Greedy decoding without the host in the way: the project's decoder in its three modes against Hugging
Face's own static-cache `generate`, same model, same prompts, one process, one card.

    python benchmarks/decode_graph.py --model qwen --device cuda --json $OUT/decode_graph.json   # issue 15
    python benchmarks/decode_graph.py --model tiny --device cpu --batches 8 --new-tokens 6      # logic check

Variants, each on --batches rows of ≈ --prompt-tokens random token ids, every row decoding --new-tokens
tokens (a random-init model never stops early: the worst case):
  eager             lbt.eval.scoring.greedy_generate, decode="eager": the reference, a growing key/value
                    cache, each step's forward issued from Python (the next one queued before the host reads
                    the current step's tokens);
  static            decode="static": a static key/value cache and one fixed-shape step that advances its own
                    inputs, the host reading tokens a few steps behind;
  graph             decode="graph": that step recorded once per batch in a CUDA graph and replayed;
  graph-ahead0      the same with the host reading every step before issuing the next (what reading ahead buys);
  graph-repeatkv    the graph with transformers' sdpa attention instead of the grouped one (keys and values
                    copied to every query head, as the eager path does);
  hf-static         model.generate(cache_implementation="static", disable_compile=True);
  hf-static-compile model.generate(cache_implementation="static"): transformers compiles the decoding forward
                    (mode "reduce-overhead": CUDA graphs through torch.compile); its first call, which
                    compiles, is timed apart.
The bare model runs every variant; --lora then wraps it with LoRA as training does (fp32 adapters under bf16
autocast, B made non-zero) and runs eager and graph inside `evaluation_mode`, as a job's evaluation does.

Printed per variant: ms per decoding step ((full - prompt only) / (new tokens - 1), medians of --repeats),
decoded tokens/s, the ratio of eager's ms/step to the variant's, and the agreement of its token ids with
eager's (rows identical; tokens before each row's first difference). In bf16 a random-init model's logits
are near-ties, so a differently shaped computation can flip an argmax and the rest of that row diverges;
exactness is tested in fp32 on a CPU (tests/test_decode.py) and checked here with --dtype float32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lbt.eval import static_decode
from lbt.eval.batching import eos_token_ids, left_pad
from lbt.eval.scoring import greedy_generate
from lbt.model.load import load_model, load_tokenizer, resolve_dtype
from lbt.model.lora import wrap_lora
from lbt.model.modes import evaluation_mode

LBT_MODES = {"eager": "eager", "static": "static", "graph": "graph", "graph-ahead0": "graph", "graph-repeatkv": "graph"}
ALL = ["eager", "static", "graph", "graph-ahead0", "graph-repeatkv", "hf-static", "hf-static-compile"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def agreement(rows: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """Rows identical to the reference, and the share of reference tokens before each row's first
    difference (a flipped argmax changes the rest of its row)."""
    same = sum(a == b for a, b in zip(rows, reference))
    before = 0
    for a, b in zip(rows, reference):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        before += k
    total = sum(len(b) for b in reference) or 1
    return {"rows_identical": same / len(reference), "tokens_before_first_difference": before / total}


class Runner:
    def __init__(self, model, tokenizer, device, repeats):
        self.model, self.tokenizer, self.device, self.repeats = model, tokenizer, device, repeats
        self.eos = sorted(eos_token_ids(model, tokenizer))

    def lbt(self, prompts, new_tokens, mode):
        generations = greedy_generate(self.model, self.tokenizer, prompts, new_tokens, batch_size=len(prompts),
                                      decode=mode)
        return [g.token_ids for g in generations]

    def hf(self, prompts, new_tokens, compile_forward):
        inputs = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
        kwargs = {} if compile_forward else {"disable_compile": True}
        out = self.model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=new_tokens,
            do_sample=False, cache_implementation="static",
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos, **kwargs)
        width = inputs["input_ids"].shape[1]
        rows = []
        for row in out[:, width:].tolist():  # up to the first end token, as greedy_generate's token_ids
            ends = [k for k, t in enumerate(row) if t in self.eos]
            rows.append(row[: ends[0]] if ends else row)
        return rows

    def timed(self, call) -> tuple[float, object]:
        times, result = [], None
        for _ in range(self.repeats):
            sync(self.device)
            started = time.perf_counter()
            result = call()
            sync(self.device)
            times.append(time.perf_counter() - started)
        return statistics.median(times), result


def run_variant(runner: Runner, name: str, prompts, new_tokens: int) -> dict:
    if name in LBT_MODES:
        mode = LBT_MODES[name]

        def call(n):
            return runner.lbt(prompts, n, mode)
    else:
        def call(n):
            return runner.hf(prompts, n, compile_forward=name == "hf-static-compile")
    ahead, grouped = static_decode._STEPS_AHEAD, static_decode._GROUPED_ATTENTION
    if name == "graph-ahead0":
        static_decode._STEPS_AHEAD = 0
    if name == "graph-repeatkv":
        static_decode._GROUPED_ATTENTION = False
    try:
        sync(runner.device)
        started = time.perf_counter()
        call(new_tokens)  # warm-up (and, for hf-static-compile, the compilation)
        sync(runner.device)
        first = time.perf_counter() - started
        prompt_only, _ = runner.timed(lambda: call(1))
        full, tokens = runner.timed(lambda: call(new_tokens))
    finally:
        static_decode._STEPS_AHEAD, static_decode._GROUPED_ATTENTION = ahead, grouped
    step_ms = 1000 * (full - prompt_only) / max(1, new_tokens - 1)
    return {"first_call_s": first, "prompt_s": prompt_only, "full_s": full, "ms_per_step": step_ms,
            "decode_tokens_per_s": len(prompts) * 1000 / step_ms if step_ms > 0 else float("nan"),
            "tokens": tokens}


def record_time(device: str) -> dict:
    """Host seconds of each CUDA-graph recording (the first decoding step run eagerly + the capture)."""
    spent: list[float] = []
    original = static_decode._record

    def timed(step):
        sync(device)
        started = time.perf_counter()
        replay = original(step)
        sync(device)
        spent.append(time.perf_counter() - started)
        return replay

    static_decode._record = timed
    return {"spent": spent, "restore": lambda: setattr(static_decode, "_record", original)}


def profile_step(runner: Runner, prompts, steps: int = 4, rows: int = 12) -> None:
    """CUDA kernels of `steps` static decoding steps (launched eagerly: the same kernels a graph replays),
    by device time, with the grouped attention and with transformers' sdpa."""
    model, device = runner.model, runner.device
    inputs = left_pad(prompts, runner.tokenizer.pad_token_id, device)
    eos = torch.tensor(runner.eos, device=device)
    grouped = static_decode._GROUPED_ATTENTION
    try:
        for static_decode._GROUPED_ATTENTION in (True, False):
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            step = static_decode._StaticStep(model, static_decode.output_cache(out), inputs, out.logits[:, -1].argmax(-1), eos,
                                       steps + 1)
            del out
            step()
            sync(device)
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(steps):
                    step()
                sync(device)
            events = prof.key_averages()
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            total = sum(e.self_device_time_total for e in kernels) / 1000 / steps  # kernels only, not their ops
            print(f"\nprofile: {len(prompts)} rows, grouped attention {static_decode._GROUPED_ATTENTION}: "
                  f"{total:.2f} ms of kernels per step")
            print(events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70))
    finally:
        static_decode._GROUPED_ATTENTION = grouped


class _AttentionModule:
    """What transformers' sdpa_attention_forward reads off an attention layer."""
    is_causal = True

    def __init__(self, groups: int):
        self.num_key_value_groups = groups


def check_attention(device: str, dtype: torch.dtype, batch: int = 64, heads: int = 16, kv_heads: int = 2,
                    dim: int = 128, length: int = 300) -> dict:
    """The grouped decode attention and transformers' sdpa (keys and values repeated per query head) against
    a float64 reference, one query position per row, a left-padded mask over a static cache whose hidden
    slots (pads, unwritten positions) hold large values: a kernel that ignored the mask would be far off."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, 1, dim, generator=gen)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    pads = torch.randint(0, 120, (batch,), generator=gen)
    for row in range(batch):
        valid[row, int(pads[row]) : 250] = True
    hidden = ~valid[:, None, :, None]
    k = torch.where(hidden, torch.full_like(k, 30.0), k)
    v = torch.where(hidden, torch.full_like(v, 1000.0), v)
    scale = dim ** -0.5
    groups = heads // kv_heads
    k64, v64 = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (q.double() @ k64.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    reference = (scores.softmax(-1) @ v64).transpose(1, 2)  # (batch, 1, heads, dim)
    mask = valid[:, None, None, :].to(device)
    args = [t.to(device, dtype) for t in (q, k, v)]
    result = {}
    for name, attend in (("grouped", static_decode._grouped_decode_attention), ("transformers sdpa", sdpa_attention_forward)):
        out, _ = attend(_AttentionModule(groups), *args, mask, scaling=scale)
        error = (out.double().cpu() - reference).norm() / reference.norm()
        result[name] = float(error)
    print(f"attention check ({dtype}, {batch} rows, {length} cache slots, hidden slots poisoned): relative error "
          + ", ".join(f"{name} {error:.2e}" for name, error in result.items()), flush=True)
    return result


def check_first_step(runner: Runner, prompts) -> dict:
    """Logits of one decoding step after the same prompt forward: the eager path's (growing cache, 2D mask)
    against the static step's, with the grouped attention and with transformers' sdpa. Rows whose top-two
    logits are closer than the two paths differ are near-ties: their greedy token may flip."""
    model, device = runner.model, runner.device
    inputs = left_pad(prompts, runner.tokenizer.pad_token_id, device)
    eos = torch.tensor(runner.eos, device=device)
    n = len(prompts)
    result = {}
    grouped = static_decode._GROUPED_ATTENTION
    try:
        for static_decode._GROUPED_ATTENTION in (True, False):
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            chosen = out.logits[:, -1].argmax(-1)
            cache = static_decode.output_cache(out)
            step = static_decode._StaticStep(model, cache, inputs, chosen, eos, 2)
            static = step().float()
            mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones((n, 1))], dim=-1)
            eager = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=inputs["position_ids"][:, -1:] + 1,
                          use_cache=True, logits_to_keep=1, **static_decode.cache_kwargs(model, cache)).logits[:, -1].float()
            delta = (static - eager).abs().amax(-1)
            top2 = eager.topk(2, dim=-1).values
            margin = top2[:, 0] - top2[:, 1]
            name = "grouped" if static_decode._GROUPED_ATTENTION else "transformers sdpa"
            result[name] = {
                "max_abs_logit_diff": float(delta.max()), "median_row_max_abs_diff": float(delta.median()),
                "logit_std": float(eager.std()), "median_top2_margin": float(margin.median()),
                "argmax_flips": int((static.argmax(-1) != eager.argmax(-1)).sum()),
                "rows_margin_below_diff": int((margin < delta).sum()), "rows": n}
            print(f"first decoding step, static ({name}) vs eager, {n} rows: max |logit diff| "
                  f"{result[name]['max_abs_logit_diff']:.3g} (row median {result[name]['median_row_max_abs_diff']:.3g}; "
                  f"logit std {result[name]['logit_std']:.3g}); median top-2 margin {result[name]['median_top2_margin']:.3g}; "
                  f"argmax flips {result[name]['argmax_flips']}, rows with margin < diff {result[name]['rows_margin_below_diff']}",
                  flush=True)
            del out, cache, step
    finally:
        static_decode._GROUPED_ATTENTION = grouped
    return result


def table(title: str, results: dict[str, dict], batch: int) -> None:
    base = results.get("eager", {}).get("ms_per_step")
    print(f"\n{title}, {batch} rows")
    print(f"  {'variant':18s} {'ms/step':>8s} {'tokens/s':>9s} {'vs eager':>8s} {'prompt s':>8s} "
          f"{'1st call s':>10s} {'rows same':>9s} {'tokens same':>11s}")
    for name, r in results.items():
        if "error" in r:
            print(f"  {name:18s} failed: {r['error']}")
            continue
        ratio = base / r["ms_per_step"] if base and r["ms_per_step"] > 0 else float("nan")
        agree = r.get("agreement", {})
        print(f"  {name:18s} {r['ms_per_step']:8.2f} {r['decode_tokens_per_s']:9.0f} {ratio:7.2f}x "
              f"{r['prompt_s']:8.3f} {r['first_call_s']:10.2f} {agree.get('rows_identical', 1.0):9.3f} "
              f"{agree.get('tokens_before_first_difference', 1.0):11.3f}")


def bench(runner: Runner, label: str, variants: list[str], batches: list[int], prompt_tokens: int,
          new_tokens: int, vocab: int, out: dict, budget_end: float) -> None:
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(10, vocab, (prompt_tokens - (i % 7),), generator=gen).tolist() for i in range(batch)]
        results: dict[str, dict] = {}
        recorded = record_time(runner.device)
        try:
            for name in variants:
                if time.time() > budget_end and name != "eager":
                    results[name] = {"error": "skipped: time budget spent"}
                    continue
                before = len(recorded["spent"])
                try:
                    r = run_variant(runner, name, prompts, new_tokens)
                except Exception as err:  # noqa: BLE001 -- a library path that fails is a result too
                    results[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                    print(f"{label} {batch} {name}: {results[name]['error']}", flush=True)
                    continue
                if len(recorded["spent"]) > before:
                    r["record_s_median"] = statistics.median(recorded["spent"][before:])
                if name != "eager" and "eager" in results:
                    r["agreement"] = agreement(r["tokens"], results["eager"]["tokens"])
                results[name] = r
                print(f"{label} {batch} {name}: {r['ms_per_step']:.2f} ms/step"
                      + (f", recording {r['record_s_median'] * 1000:.0f} ms" if "record_s_median" in r else ""),
                      flush=True)
        finally:
            recorded["restore"]()
        table(label, results, batch)
        for r in results.values():
            r.pop("tokens", None)
        out.setdefault(label, {})[str(batch)] = results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen", choices=["tiny", "qwen", "llama"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=ALL, choices=ALL)
    ap.add_argument("--lora", action="store_true", help="then eager and graph on the LoRA-wrapped model")
    ap.add_argument("--lora-batches", type=int, nargs="+", default=None)
    ap.add_argument("--check", action="store_true",
                    help="check the attention kernels and the first decoding step's logits before timing")
    ap.add_argument("--profile", type=int, default=0, help="rows: profile static decoding steps at this batch")
    ap.add_argument("--budget-s", type=float, default=480, help="later non-eager variants are skipped past this")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    started = time.time()
    device = args.device
    cfg = OmegaConf.load(ROOT / "src" / "lbt" / "conf" / "model" / f"{args.model}.yaml")
    cfg.random_init = True
    tokenizer = load_tokenizer(cfg)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    model = load_model(cfg, tokenizer, dtype, device=device).eval()
    import transformers

    out = {"model": args.model, "dtype": str(dtype), "prompt_tokens": args.prompt_tokens,
           "new_tokens": args.new_tokens, "repeats": args.repeats, "torch": torch.__version__,
           "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}
    print(json.dumps(out), flush=True)
    runner = Runner(model, tokenizer, device, args.repeats)
    vocab = len(tokenizer)
    budget_end = started + args.budget_s
    with torch.no_grad():
        if args.check:
            out["attention_check"] = {str(dt): check_attention(device, dt) for dt in (torch.float32, torch.bfloat16)}
            gen = torch.Generator().manual_seed(1)
            out["first_step_check"] = check_first_step(
                runner, [torch.randint(10, vocab, (args.prompt_tokens - (i % 37),), generator=gen).tolist()
                         for i in range(128)])
        bench(runner, "bare model", args.variants, args.batches, args.prompt_tokens, args.new_tokens, vocab,
              out, budget_end)
        if args.profile and device.startswith("cuda"):
            gen = torch.Generator().manual_seed(0)
            profile_step(runner, [torch.randint(10, vocab, (args.prompt_tokens - (i % 7),), generator=gen).tolist()
                                  for i in range(args.profile)])
    if args.lora:
        lora = OmegaConf.load(ROOT / "src" / "lbt" / "conf" / "train.yaml").train.lora
        peft_model = wrap_lora(model, lora, adapters="autocast" if device.startswith("cuda") else "fp32")
        gen = torch.Generator().manual_seed(3)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data = (torch.randn(param.shape, generator=gen) * 0.02).to(param.device, param.dtype)
        runner = Runner(peft_model, tokenizer, device, args.repeats)
        auto = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
        with evaluation_mode(peft_model), auto:
            bench(runner, "LoRA, evaluation_mode, autocast", ["eager", "graph"], args.lora_batches or args.batches,
                  args.prompt_tokens, args.new_tokens, vocab, out, budget_end + 120)
    out["wall_s"] = time.time() - started
    print(f"\nwall {out['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
