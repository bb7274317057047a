"""Stance battery speed: the project's batched battery against the plain one-at-a-time reference, same
model, same items, one process.

    # tiny model, CPU, the project's data/eval/target_items.jsonl
    python benchmarks/eval_battery.py --threads 1
    # the 54 published items of the original study
    python benchmarks/eval_battery.py --items ../shared/reference/seed-eval/target_items.jsonl
    # the issue's goal: Qwen2.5-3B architecture, random init, one H100 (bf16)
    python benchmarks/eval_battery.py --model qwen --random-init --device cuda \\
        --items ../shared/reference/seed-eval/target_items.jsonl --json eval_battery_h100.json
    # exactness on the GPU (fp32: log-probs within 1e-4, identical decisions and texts)
    python benchmarks/eval_battery.py --model qwen --random-init --device cuda --dtype float32
    # the battery under each decode mode of greedy generation (hardware.fast.decode), same process
    python benchmarks/eval_battery.py --model qwen --random-init --device cuda --batch-size 512 \
        --decode eager graph --skip-reference
    # prompts' shared openings run once (hardware.fast.share_prefix) against the whole prompts, same process
    python benchmarks/eval_battery.py --model qwen --random-init --device cuda --batch-size 512 \
        --decode graph --share-prefix off on --skip-reference

The battery is the 4 measures letter_logprob, forced_choice, logprob and likert by default (--measures adds
open_ended). The reference (tests/eval_reference.py) scores one prompt at a time with a full forward of
prompt + option and runs Hugging Face `generate` for one item at a time, as the original implementation
did. Printed: both wall times (CUDA synchronised; the battery timed --repeats times after a warm-up, median
and min), the ratio reference / battery (median), per-measure battery seconds, and the largest score
difference between the two (log-probs, stances) plus the count of differing decisions, ratings and texts.
In bf16 the two paths round differently, so differences of ~1e-2 in log-probs are expected there; use
--dtype float32 to check exactness (≤ 1e-4).

A random-init model never writes a parsable answer, so generation runs to max_new_tokens for every row on
both sides (the battery's early stop cannot help it); --max-new-tokens sets both generation lengths.
--decode times the battery once per greedy-decoding mode (eager | static | graph, see
lbt.eval.scoring.set_decode), --share-prefix once per prefix-sharing setting (off | on, see lbt.eval.prefix)
within each mode, and each variant's rows are compared with the first variant's as they are with the
reference's.
--json writes the numbers to a file (for benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from profiling import FullCollections, kernel_seconds, top_kernels

from lbt.data.chat import ChatFormat
from lbt.eval.battery import score_item_set
from lbt.eval.items import load_item_set
from lbt.eval.scoring import set_decode, set_share_prefix
from lbt.eval.settings import BatterySettings
from lbt.heap import settle_heap
from lbt.model.fused_norm import fused_rms_norms
from lbt.model.gqa import grouped_query_attention
from lbt.model.load import load_model, load_tokenizer, resolve_dtype
from lbt.model.modes import evaluation_mode
from tests.eval_reference import reference_rows

FOUR = ["letter_logprob", "forced_choice", "logprob", "likert"]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load(args: argparse.Namespace):
    cfg = OmegaConf.load(ROOT / "src" / "lbt" / "conf" / "model" / f"{args.model}.yaml")
    if args.random_init:
        cfg.random_init = True
    if args.path:
        cfg.path = args.path
    dtype = resolve_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer, dtype, device=args.device).eval()
    return model, ChatFormat.of(tokenizer, cfg), dtype


def key(row: dict) -> tuple:
    return row["item_id"], row["order"], row.get("template")


def differences(battery: dict[str, list[dict]], reference: dict[str, list[dict]]) -> dict[str, dict]:
    """Per measure: largest |difference| of numeric fields, and counts of differing texts/decisions."""
    out = {}
    for measure, rows in battery.items():
        ref = {key(r): r for r in reference[measure]}
        numeric, differing = 0.0, 0
        for row in rows:
            twin = ref[key(row)]
            for field in ("logp_pro", "logp_anti", "stance"):
                a, b = row.get(field), twin.get(field)
                if isinstance(a, float) and isinstance(b, float) and not (math.isnan(a) or math.isnan(b)):
                    numeric = max(numeric, abs(a - b))
            for field in ("raw", "response", "rating", "choice"):
                if field in twin and row.get(field) != twin.get(field):
                    differing += 1
                    break
        out[measure] = {"max_abs_diff": numeric, "rows_differing": differing, "rows": len(rows)}
    return out


def profile(model, chat, items, measures: list[str], settings: BatterySettings, device: str, label: str) -> dict:
    """Per measure (forced choice with its letters as one): wall time, then, from a second run under
    cProfile, the host functions with most own time. A call that copies to the GPU from pageable memory or
    reads a result (`torch.tensor(..., device=...)`, `.tolist()`, an event's synchronize) also waits there
    for the GPU's queued work, so its own time is the GPU's as much as the host's."""
    import cProfile
    import io
    import pstats

    parts = [[m for m in ("letter_logprob", "forced_choice") if m in measures]]
    parts += [[m] for m in measures if m not in ("letter_logprob", "forced_choice")]
    out = {}
    for part in filter(None, parts):
        name = "+".join(part)
        synchronize(device)
        started = time.perf_counter()
        score_item_set(model, chat, items, part, settings)
        synchronize(device)
        wall = time.perf_counter() - started
        host = cProfile.Profile()
        host.enable()
        score_item_set(model, chat, items, part, settings)
        synchronize(device)
        host.disable()
        text = io.StringIO()
        pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(12)
        top = [line for line in text.getvalue().splitlines() if line.strip()][-12:]
        busy, collections, kernels = kernel_busy(model, chat, items, part, settings, device)
        print(f"profile ({label}) {name}: wall {wall:.3f} s alone; GPU kernels {busy:.3f} s of a third run, "
              f"which had {collections[0]} full garbage collections ({collections[1]:.3f} s); host functions by "
              "own time (cProfile, second run):")
        print("\n".join("    " + line for line in top))
        for kernel, seconds, calls in kernels:
            print(f"    GPU kernel {seconds:.4f} s in {calls:5d} calls: {kernel}")
        out[name] = {"wall_s": wall, "host_top": top, "kernel_s": busy, "full_collections": collections,
                     "top_kernels": kernels}
    return out


def kernel_busy(model, chat, items, part: list[str], settings: BatterySettings,
                device: str) -> tuple[float, tuple, list]:
    """Seconds of GPU kernels in one run of `part` (0 on a CPU), the (count, seconds) of the full garbage
    collections Python ran meanwhile, and the kernels with the most time (`profiling.top_kernels`)."""
    on_gpu = device.startswith("cuda")
    profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if on_gpu
                else contextlib.nullcontext())
    with FullCollections() as collections, profiler as prof:
        score_item_set(model, chat, items, part, settings)
        synchronize(device)
    busy = kernel_seconds(prof.key_averages()) if on_gpu else 0.0
    top = top_kernels(prof.key_averages()) if on_gpu else []
    return busy, (len(collections.pauses), sum(collections.pauses)), top


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "qwen", "llama"], default="tiny")
    parser.add_argument("--random-init", action="store_true", help="the architecture with random weights")
    parser.add_argument("--path", default=None, help="override model.path (hub id or local directory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--items", default=str(ROOT / "data" / "eval" / "target_items.jsonl"))
    parser.add_argument("--max-items", type=int, default=None)
    parser.add_argument("--measures", nargs="+", default=FOUR)
    parser.add_argument("--option-form", default="bare")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="forced-choice and Likert lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--decode", nargs="+", default=[None], choices=["eager", "static", "graph"],
                        help="greedy-decoding modes to time in turn (default: the device's default)")
    parser.add_argument("--share-prefix", nargs="+", default=[None], choices=["off", "on"],
                        help="prefix sharing settings to time in turn, after each decode mode (default: off)")
    parser.add_argument("--gc", nargs="+", default=[None], choices=["normal", "frozen"],
                        help="Python's garbage collector as is, or with the objects alive before the timed runs "
                             "frozen (gc.freeze: no full collection walks them); frozen stays frozen, so list "
                             "normal first")
    parser.add_argument("--fused-norm", nargs="+", default=[None], choices=["off", "on"],
                        help="RMSNorm as transformers runs it, or one kernel (hardware.fast.fused_norm), "
                             "in turn within each decode and prefix setting (default: off)")
    parser.add_argument("--sdpa-gqa", nargs="+", default=[None], choices=["off", "on"],
                        help="masked prompt forwards copy the key/value heads (transformers) or read them "
                             "grouped (hardware.fast.sdpa_gqa), in turn within each norm setting (default: off)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile each variant per measure: wall time and the top host functions")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, chat, dtype = load(args)
    items = load_item_set(args.items, max_items=args.max_items)
    settings = BatterySettings(option_form=args.option_form, batch_size=args.batch_size)
    if args.max_new_tokens:
        settings.forced_choice_max_new_tokens = settings.likert_max_new_tokens = args.max_new_tokens
    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    )
    print(
        f"model={args.model} random_init={bool(args.random_init or args.model == 'tiny')} dtype={dtype} "
        f"device={device_name} "
        f"items={len(items)} ({args.items}) measures={args.measures} batch_size={args.batch_size}"
    )

    result = {
        "model": args.model,
        "random_init": args.random_init,
        "dtype": str(dtype),
        "device": device_name,
        "items": args.items,
        "n_items": len(items),
        "measures": args.measures,
        "batch_size": args.batch_size,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    with evaluation_mode(model):
        by_mode: dict[str, dict] = {}
        variants = [(mode, share, heap, norm, grouped) for heap in args.gc for mode in args.decode
                    for share in args.share_prefix for norm in args.fused_norm for grouped in args.sdpa_gqa]
        for mode, share, heap, norm, grouped in variants:
            set_decode(mode)
            set_share_prefix(share == "on")
            if heap == "frozen" and not gc.get_freeze_count():
                settle_heap()  # as FrozenHeap does in a job: every object alive now skips full collections
            label = " ".join(f"{k}={v}" for k, v in (("decode", mode), ("share_prefix", share), ("gc", heap),
                                                      ("fused_norm", norm), ("sdpa_gqa", grouped)) if v)
            # this variant only
            with fused_rms_norms(model, on=norm == "on") as fused, \
                    grouped_query_attention(on=grouped == "on") as widened:
                if fused:
                    print(f"fused_norm: {fused} norms run torch's rms_norm")
                if grouped == "on":
                    print("sdpa_gqa: " + ("on" if widened else "transformers has no use_gqa_in_sdpa: nothing changes"))
                score_item_set(
                    model, chat, load_item_set(args.items, max_items=4), args.measures, settings
                )  # warm-up
                times, timings, rows = [], {}, {}
                for _ in range(max(1, args.repeats)):
                    synchronize(args.device)
                    started = time.perf_counter()
                    timings = {}
                    rows = score_item_set(model, chat, items, args.measures, settings, timings=timings)
                    synchronize(args.device)
                    times.append(time.perf_counter() - started)
                battery_s = statistics.median(times)
                print(
                    f"battery{f' ({label})' if label else ''}:   {battery_s:8.3f} s (median of {len(times)}; "
                    f"min {min(times):.3f} s) per measure: { {k: round(v, 3) for k, v in timings.items()} }"
                )
                by_mode[label or "default"] = {"battery_s": battery_s, "battery_min_s": min(times),
                                          "battery_per_measure_s": timings, "rows": rows}
                if args.profile:
                    by_mode[label or "default"]["profile"] = profile(
                        model, chat, items, args.measures, settings, args.device, label or "default")
        set_decode(None)
        set_share_prefix(None)
        first_label = next(iter(by_mode))
        first = by_mode[first_label]
        rows, battery_s = first["rows"], first["battery_s"]
        result.update(battery_s=battery_s, battery_min_s=first["battery_min_s"],
                      battery_per_measure_s=first["battery_per_measure_s"])
        if len(by_mode) > 1:
            result["variants"] = {}
            for label, entry in by_mode.items():
                entry = dict(entry)
                if label != first_label:
                    diff = differences(entry["rows"], rows)
                    print(f"{label} vs {first_label}: {first['battery_s'] / entry['battery_s']:.2f}x")
                    for measure, d in diff.items():
                        print(
                            f"  {measure:15s} max |diff| {d['max_abs_diff']:.2e}; rows with a different "
                            f"text/decision/rating: {d['rows_differing']}/{d['rows']}"
                        )
                    entry["differences"] = diff
                    entry["ratio_vs_first"] = first["battery_s"] / entry["battery_s"]
                del entry["rows"]
                result["variants"][label] = entry
        if not args.skip_reference:
            reference_rows(model, chat, items.items[:1], "letter_logprob", settings)  # warm-up
            synchronize(args.device)
            started = time.perf_counter()
            reference = {m: reference_rows(model, chat, items.items, m, settings) for m in args.measures}
            synchronize(args.device)
            reference_s = time.perf_counter() - started
            diff = differences(rows, reference)
            print(f"reference: {reference_s:8.3f} s (one prompt at a time)")
            print(f"ratio:     {reference_s / battery_s:8.1f}x")
            for measure, d in diff.items():
                print(
                    f"  {measure:15s} max |diff| {d['max_abs_diff']:.2e}; rows with a different "
                    f"text/decision/rating: {d['rows_differing']}/{d['rows']}"
                )
            result.update(
                reference_s=reference_s,
                ratio=reference_s / battery_s,
                differences=diff,
                max_abs_diff=max(d["max_abs_diff"] for d in diff.values()),
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
