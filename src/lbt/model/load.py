"""Load a causal LM and its tokenizer from the `model` config group.

Three sources, one function:
- a hub id or local directory (`model.path`), weights and tokenizer from there;
- `model.random_init=true`: the architecture from `model.arch` (public config.json facts carried in the
  config), seeded random weights, no download; the real tokenizer if it is on disk, else the project's;
- the embedded `tiny` model, which is always random_init with the project's tokenizer.

`model.quantization=4bit` loads the linear layers as bitsandbytes nf4 (QLoRA's base) from any of the three:
a random-init model is built as without quantization (same seed, same device, so the same weights),
saved to a temporary folder and loaded back quantized, so a dry run holds the memory of the real model.
bitsandbytes >= 0.45 runs 4-bit on a CPU as well as on a CUDA GPU.
"""

from __future__ import annotations

import logging
import tempfile
from importlib import metadata
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from lbt.choices import DTYPE_NAMES, QUANTIZATIONS
from lbt.model.tiny import TOKENIZER_DIR

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# The first bitsandbytes release whose 4-bit layers run on a CPU (earlier ones are CUDA-only).
BNB_CPU_FLOOR = "0.45"
DTYPES = {name: getattr(torch, attr) for name, attr in DTYPE_NAMES.items()}


class ModelConfigError(ValueError):
    """A model config that cannot be loaded; raised before any weights are read."""


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ModelConfigError(f"model.dtype={name!r} is not one of {sorted(DTYPES)}") from None


def load_tokenizer(model_cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The model's own tokenizer, or the project's when a random-init model has none on disk."""
    from transformers import AutoTokenizer  # here, not at the top: the config checks import this module

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
    from transformers import AutoConfig

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


def bitsandbytes_version() -> str | None:
    """The installed bitsandbytes version, read from its metadata (importing it is slow and noisy)."""
    try:
        return metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return None


def check_quantization(model_cfg: Any, hardware_cfg: Any) -> list[str]:
    """Problems with `model.quantization` on this hardware, one line each naming the key and what it allows;
    empty when the model can load. Reads no weights and imports nothing heavy, so a config check can call it."""
    quant = model_cfg.get("quantization")
    if quant is None:
        return []
    if str(quant) not in QUANTIZATIONS:
        return [f"model.quantization={quant}: must be null or one of {', '.join(QUANTIZATIONS)}"]
    version = bitsandbytes_version()
    if version is None:
        return [(f"model.quantization={quant}: needs bitsandbytes (pip install 'bitsandbytes>={BNB_CPU_FLOOR}'); "
                 "or model.quantization=null")]
    from packaging.version import Version

    accelerator = str(hardware_cfg.get("accelerator") or "cpu")
    if accelerator != "gpu" and Version(version) < Version(BNB_CPU_FLOOR):
        return [(f"model.quantization={quant} with hardware.accelerator={accelerator}: bitsandbytes {version} "
                 f"runs 4-bit only on a CUDA GPU; install bitsandbytes>={BNB_CPU_FLOOR} or use hardware=gpu")]
    return []


def quantization_config(dtype: torch.dtype) -> Any:
    """QLoRA's base: nf4 weights with double quantization, matmuls in the job's dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True)


def load_model(model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    attn = model_cfg.get("attn_implementation") or "sdpa"
    quant = model_cfg.get("quantization")
    on_gpu = torch.device(device).type == "cuda"
    problems = check_quantization(model_cfg, {"accelerator": "gpu" if on_gpu else "cpu"})
    if problems:
        raise ModelConfigError("; ".join(problems))
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn,
                              "trust_remote_code": bool(model_cfg.trust_remote_code)}
    if quant:
        kwargs["quantization_config"] = quantization_config(dtype)
        kwargs["device_map"] = {"": torch.device(device)}
    if model_cfg.get("random_init"):
        model = random_init_model(model_cfg, tokenizer, dtype, device, attn)
        if quant:
            # Quantize the same random weights the unquantized job gets, by the loader real weights take
            # (which leaves the model in eval mode: keep from_config's train mode, as unquantized).
            training, name = model.training, model.config._name_or_path
            with tempfile.TemporaryDirectory(prefix="lbt-random-init-") as folder:
                model.save_pretrained(folder)
                del model
                model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).train(training)
            # The model keeps the unquantized random init's name, not the deleted folder's (peft writes it into
            # every saved adapter's config as the base model).
            model.config._name_or_path = name
            if hasattr(model, "name_or_path"):
                model.name_or_path = name
    else:
        model = AutoModelForCausalLM.from_pretrained(model_cfg.path, **kwargs)
        if not quant:
            model.to(device)
    if quant and not on_gpu:
        keep_cpu_training_layout(model)
    model.config.use_cache = False
    return model


def random_init_model(model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype,
                      device: str | torch.device, attn: str) -> torch.nn.Module:
    """The architecture of `model.arch` with weights drawn from `model.init_seed` (the global RNG is left
    as it was)."""
    from transformers import AutoModelForCausalLM

    config = architecture_config(model_cfg, tokenizer)
    config._attn_implementation = attn
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(int(model_cfg.init_seed))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    torch.random.set_rng_state(generator_state)
    return model


def keep_cpu_training_layout(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit CPU layers in their training layout. On a CPU with AVX512-BF16, a Linear4bit's
    first no-grad eval forward repacks its weight in place for a fast inference kernel, and a training
    forward after that fails ("a view of a leaf Variable ... in-place operation", bitsandbytes 0.50.2).
    lbt evaluates between training steps, so the repacking is switched off: training and evaluation then
    run the same dequantize-and-matmul path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
