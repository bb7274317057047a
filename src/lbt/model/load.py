"""Load a causal LM and its tokenizer from the `model` config group.

Three sources, one function:
- a hub id or local directory (`model.path`), weights and tokenizer from there;
- `model.random_init=true`: the architecture from `model.arch` (public config.json facts carried in the
  config), seeded random weights, no download; the real tokenizer if it is on disk, else the project's;
- the embedded `tiny` model, which is always random_init with the project's tokenizer.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from lbt.model.tiny import TOKENIZER_DIR

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelConfigError(ValueError):
    """A model config that cannot be loaded; raised before any weights are read."""


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ModelConfigError(f"model.dtype={name!r} is not one of {sorted(DTYPES)}") from None


def load_tokenizer(model_cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The model's own tokenizer, or the project's when a random-init model has none on disk."""
    source = model_cfg.get("tokenizer") or model_cfg.get("path")
    tokenizer = None
    if source and not model_cfg.get("random_init"):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=bool(model_cfg.trust_remote_code))
    elif source:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True,
                                                      trust_remote_code=bool(model_cfg.trust_remote_code))
        except (OSError, ValueError):
            log.info("tokenizer of %s is not on disk: using the project's tokenizer (random_init dry run)", source)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelConfigError(f"tokenizer of {source or 'tiny'} has no chat template; set model.tokenizer")
    return tokenizer


def architecture_config(model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
    arch = OmegaConf.to_container(model_cfg.arch, resolve=True) if model_cfg.get("arch") else None
    if not arch:
        raise ModelConfigError(f"model.random_init=true needs model.arch (config of {model_cfg.name})")
    arch = dict(arch)
    model_type = arch.pop("model_type")
    # The project's tokenizer is smaller than a real vocabulary; keep the real size (same FLOPs) but never less.
    arch["vocab_size"] = max(int(arch.get("vocab_size", 0)), len(tokenizer))
    arch.setdefault("pad_token_id", tokenizer.pad_token_id)
    arch.setdefault("eos_token_id", tokenizer.eos_token_id)
    return AutoConfig.for_model(model_type, **arch)


def load_model(model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    attn = model_cfg.get("attn_implementation") or "sdpa"
    quant = model_cfg.get("quantization")
    if quant and str(quant) != "4bit":
        raise ModelConfigError(f"model.quantization={quant!r}: only null or '4bit' are supported")
    if quant and not torch.cuda.is_available():
        raise ModelConfigError("model.quantization=4bit needs a CUDA GPU (bitsandbytes); use hardware=gpu")
    if model_cfg.get("random_init"):
        config = architecture_config(model_cfg, tokenizer)
        config._attn_implementation = attn
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(int(model_cfg.init_seed))
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        torch.random.set_rng_state(generator_state)
    else:
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn,
                                  "trust_remote_code": bool(model_cfg.trust_remote_code)}
        if quant:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True)
            kwargs["device_map"] = {"": torch.device(device)}
        model = AutoModelForCausalLM.from_pretrained(model_cfg.path, **kwargs)
        if not quant:
            model.to(device)
    model.config.use_cache = False
    return model
