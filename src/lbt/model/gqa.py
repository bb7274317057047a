"""Grouped-query attention without copied keys and values while the model is read
(`hardware.fast.sdpa_gqa`, on in hardware=gpu: the battery 1.06x faster on an H100, benchmarks/RESULTS.md).

Qwen2.5-3B has 16 query heads and 2 key/value heads (Llama-3.2-3B: 24 and 8). transformers' sdpa
attention lets torch's kernel read the shared key/value heads itself (`enable_gqa=True`) only when a forward
has no attention mask; with one, and every batched evaluation prompt has one for its padding, it first copies
the keys and the values out to every query head (`repeat_kv`). On an H200 the largest eager elementwise
kernel of the battery's logprob measure ran twice per layer and forward (0.037 s of its 0.30 s of kernels);
with this setting on it left the profile (on an H100), so it was `repeat_kv`'s copies. torch's cuDNN
attention takes a mask together with grouped heads.

Inside `grouped_query_attention` (which `lbt.model.modes.evaluation_mode` enters when the setting is on)
transformers' choice (`transformers.integrations.sdpa_attention.use_gqa_in_sdpa`) also says yes for a masked
forward of several query positions (a prompt; the static decoding step groups its one query position itself,
`lbt.eval.static_decode`) in half precision on a GPU; everything else keeps transformers' choice, and on exit
the function is transformers' own again. Training is untouched.

Numbers: the same attention of the same keys and values, read in place instead of from copies. In fp32 the
output equals the copying path's up to float rounding (tests/test_gqa.py, on a CPU, where torch's kernels take
grouped heads with a mask too); in bf16 a different kernel may round differently: rows within bf16 noise.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator

import torch

from lbt.fast_settings import FastSetting

# Where the setting asks torch for grouped heads with a mask: half precision on NVIDIA GPUs, where cuDNN's
# attention takes both (in fp32 or elsewhere torch may fall back to its unfused math kernel).
GQA_DEVICES = frozenset({"cuda"})
GQA_DTYPES = frozenset({torch.bfloat16, torch.float16})
SDPA_MODULE = "transformers.integrations.sdpa_attention"

# Whether `evaluation_mode` lets masked prompt forwards read grouped heads in place (`hardware.fast.sdpa_gqa`;
# None: off).
SDPA_GQA = FastSetting("sdpa_gqa", False)
set_sdpa_gqa = SDPA_GQA.set
sdpa_gqa_default = SDPA_GQA.get


def grouped_with_mask(attention_mask: torch.Tensor | None, key: torch.Tensor,
                      value: torch.Tensor | None = None) -> bool:
    """A masked forward of several query positions whose keys can stay grouped: a prompt, not a decoding step
    (`lbt.eval.static_decode` groups those itself), on a device and dtype of GQA_DEVICES and GQA_DTYPES."""
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-2] <= 1:
        return False
    if value is not None and value.shape[-1] != key.shape[-1]:
        return False
    return key.device.type in GQA_DEVICES and key.dtype in GQA_DTYPES and key.shape[-1] <= 256


def _grouped(original: Callable[..., bool]) -> Callable[..., bool]:
    def use_gqa_in_sdpa(attention_mask, key, *args, **kwargs) -> bool:
        if original(attention_mask, key, *args, **kwargs):
            return True
        value = args[0] if args else kwargs.get("value")
        return grouped_with_mask(attention_mask, key, value)

    use_gqa_in_sdpa.lbt_grouped = True  # type: ignore[attr-defined]
    return use_gqa_in_sdpa


@contextlib.contextmanager
def grouped_query_attention(on: bool | None = None) -> Iterator[bool]:
    """Inside the block transformers' sdpa attention keeps grouped key/value heads for masked prompt forwards
    (`grouped_with_mask`); yields whether it does. on: None takes the process default (`set_sdpa_gqa`); False
    changes nothing. A transformers without `use_gqa_in_sdpa` keeps its own attention (yields False)."""
    if not (sdpa_gqa_default() if on is None else on):
        yield False
        return
    try:
        module = importlib.import_module(SDPA_MODULE)
    except ImportError:
        yield False
        return
    original = getattr(module, "use_gqa_in_sdpa", None)
    if original is None or getattr(original, "lbt_grouped", False):  # unknown transformers, or already inside
        yield original is not None
        return
    module.use_gqa_in_sdpa = _grouped(original)
    try:
        yield True
    finally:
        module.use_gqa_in_sdpa = original
