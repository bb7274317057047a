"""Where a batched greedy decoding step spends its time: the same generation under the settings that
evaluation inside a training job can see, one process, one card.

    python benchmarks/decode_step.py --model qwen --device cuda            # the H100 diagnosis
    python benchmarks/decode_step.py --model tiny --device cpu --new-tokens 4   # logic check

Variants (each: `lbt.eval.scoring.greedy_generate` on --batch prompts of --prompt-tokens tokens, every row
running to --new-tokens tokens; ms per decoding step from the median of --repeats runs, the prompt
forward subtracted):
  hf            the bare HF model, no adapters;
  peft          the model wrapped with LoRA as training wraps it (fp32 adapters, autocast) under autocast;
  peft-nocudnn  the same with cuDNN's SDPA backend switched off;
  peft-b32      the same at a quarter of the batch (time that does not shrink with the batch is per-step
                overhead, not GPU work);
  peft-lean     peft under `lean_lora`, as evaluation runs it (peft's eval forward without its bookkeeping).
Each variant also reports the host time of one step's forward call without waiting for the GPU: when
it is close to the step time, the step is bound by Python and kernel launches, not by the GPU.
--profile prints the top operators of one peft step by host time and by device time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lbt.eval.batching import cache_kwargs, left_pad, output_cache
from lbt.eval.scoring import greedy_generate
from lbt.model.load import load_model, load_tokenizer
from lbt.model.lora import lean_lora, wrap_lora


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, tokenizer, prompts, new_tokens, batch, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        greedy_generate(model, tokenizer, prompts, new_tokens, batch_size=batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def host_step_time(model, tokenizer, prompts, device) -> float:
    """Host seconds to issue one cached decoding step (no synchronisation inside the timed call)."""
    inputs = left_pad(prompts, tokenizer.pad_token_id, device)
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    ids = out.logits[:, -1].argmax(-1)[:, None]
    mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones((len(prompts), 1))], -1)
    pos = inputs["position_ids"][:, -1:] + 1
    sync(device)
    t0 = time.perf_counter()
    model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
          **cache_kwargs(model, cache))
    host = time.perf_counter() - t0
    sync(device)
    return host


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen", choices=["tiny", "qwen", "llama"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = args.device
    cfg = OmegaConf.load(ROOT / "src" / "lbt" / "conf" / "model" / f"{args.model}.yaml")
    cfg.random_init = True
    tokenizer = load_tokenizer(cfg)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(cfg, tokenizer, dtype, device=device).eval()
    gen = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    prompts = [torch.randint(10, vocab, (args.prompt_tokens - (i % 7),), generator=gen).tolist()
               for i in range(args.batch)]
    result = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}

    def measure(name, m, rows, autocast):
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            greedy_generate(m, tokenizer, rows[:4], 2, batch_size=len(rows))  # warm-up
            prefill = timed_generate(m, tokenizer, rows, 1, len(rows), device, args.repeats)
            full = timed_generate(m, tokenizer, rows, args.new_tokens, len(rows), device, args.repeats)
            host = min(host_step_time(m, tokenizer, rows, device) for _ in range(3))
        step_ms = 1000 * (full - prefill) / (args.new_tokens - 1)
        result[name] = {"prefill_s": prefill, "generate_s": full, "ms_per_step": step_ms,
                        "host_ms_per_step_forward": 1000 * host}
        print(f"{name:14s} rows {len(rows):4d}: prefill {prefill:7.3f} s, {args.new_tokens} tokens {full:7.3f} s, "
              f"{step_ms:8.2f} ms/step (host issue time of one step's forward {1000 * host:7.2f} ms)", flush=True)

    measure("hf", model, prompts, autocast=False)
    lora = OmegaConf.load(ROOT / "src" / "lbt" / "conf" / "train.yaml").train.lora
    peft_model = wrap_lora(model, lora, adapters="autocast").eval()
    auto = device == "cuda"
    measure("peft", peft_model, prompts, autocast=auto)
    if device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
        measure("peft-nocudnn", peft_model, prompts, autocast=auto)
        torch.backends.cuda.enable_cudnn_sdp(True)
    measure("peft-b32", peft_model, prompts[: max(1, args.batch // 4)], autocast=auto)
    with lean_lora(peft_model):
        measure("peft-lean", peft_model, prompts, autocast=auto)
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with (torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=auto),
              torch.profiler.profile(activities=activities) as prof):
            greedy_generate(peft_model, tokenizer, prompts, 8, batch_size=len(prompts))
            sync(device)
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
        if device == "cuda":
            print(table.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
