"""Wrap a causal LM with peft LoRA from the `train.lora` config."""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from lbt.choices import ADAPTER_MODES
from lbt.fast_settings import FastSetting
from lbt.model.layers import decoder_layers

if TYPE_CHECKING:
    from peft import LoraConfig

# peft is imported where it is used, not here: the config checks import this module (ADAPTER_MODES), and
# peft imports bitsandbytes when it is installed (about a second, and a warning on some CPUs).


def lora_config(lora_cfg: DictConfig) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=int(lora_cfg.r),
        lora_alpha=int(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        target_modules=list(OmegaConf.to_container(lora_cfg.targets, resolve=True)),
        bias="none",
        task_type="CAUSAL_LM",
    )




def wrap_lora(model: torch.nn.Module, lora_cfg: DictConfig, adapters: str = "fp32") -> torch.nn.Module:
    """peft LoRA on the configured targets.

    adapters:
      fp32     peft's default: fp32 adapter weights, every adapted layer's input upcast to fp32.
      autocast fp32 adapter weights (the optimizer updates full-precision values, as in fp32) but no input
               upcast: run forwards under torch.autocast(bf16), which casts the small adapter weights instead.
      bf16     adapter weights in the model dtype; fastest, but small AdamW updates round away in bf16.

    A quantized base (model.quantization=4bit) first goes through peft's `prepare_model_for_kbit_training`,
    which freezes the base, without gradient checkpointing (its default; lbt's config has no such setting).
    Its upcast of the unquantized weights (norms, embeddings, biases) to fp32 is undone: an fp32 norm or
    embedding turns the whole residual stream, and every activation kept for backward, into fp32, and the
    study's recipe then ran out of memory on an 80 GB H100 where bf16 LoRA peaks at 62 GiB
    (benchmarks/RESULTS.md, QLoRA). The base keeps the job's dtype as an unquantized one does (its RMSNorm
    computes in fp32 anyway), and the adapters follow the same policy as on an unquantized base.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training
    from peft.tuners.tuners_utils import BaseTunerLayer

    if adapters not in ADAPTER_MODES:
        raise ValueError(f"adapters={adapters!r}: use one of {ADAPTER_MODES}")
    missing = [t for t in lora_cfg.targets if not any(n.endswith("." + t) for n, _ in model.named_modules())]
    if missing:
        from lbt.config.rules import ConfigError

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        problem = f"{', '.join(missing)} match no module of this model; its linear layers: "
        raise ConfigError([f"train.lora.targets: {problem}{', '.join(linear)}"])
    compute_dtype = quantized_compute_dtype(model)
    if compute_dtype is not None:
        dtypes = {name: param.dtype for name, param in model.named_parameters()}
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for name, param in model.named_parameters():
            if param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])
    wrapped = get_peft_model(model, lora_config(lora_cfg), autocast_adapter_dtype=adapters != "bf16")
    if adapters == "autocast":
        for module in wrapped.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    if adapters == "bf16" and compute_dtype is not None:
        # peft gives a 4-bit layer's adapters fp32 weights (the packed base weight has no float dtype to
        # follow); "model dtype" for a quantized base is its compute dtype.
        for name, param in wrapped.named_parameters():
            if param.requires_grad and "lora_" in name:
                param.data = param.data.to(compute_dtype)
    return wrapped


def quantized_compute_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype a bitsandbytes-quantized model computes in; None for an unquantized model."""
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return None
    config = getattr(model.config, "quantization_config", None)
    dtype = getattr(config, "bnb_4bit_compute_dtype", None) if config is not None else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    return dtype or model.dtype


RECOMPILE_LIMIT = 32


def _inductor_default_dir() -> str:
    """Inductor's own default cache folder (moved between modules across torch versions)."""
    for module in ("torch._inductor.runtime.cache_dir_utils", "torch._inductor.runtime.runtime_utils"):
        try:
            return importlib.import_module(module).default_cache_dir()
        except (ImportError, AttributeError):
            continue
    return ""  # unknown: only an unset variable is then taken as not the user's


def compile_decoder_layers(model: torch.nn.Module, cache_dir: str | os.PathLike | None = None,
                           dynamic: bool | None = None, symbolic_length: bool = True) -> None:
    """torch.compile each decoder layer in place (one graph reused by every layer; the loss, masks and
    optimizer stay eager). Evaluation runs the layers eagerly (see `eager_layers`).

    dynamic: None (what a job uses) is torch's default: the first shapes compile as constants, and each size
    seen to change compiles again as a symbol. With symbolic_length (`_symbolic_length`) the sequence length
    is a symbol from the first call, so the length-sorted micro-batches of a job share the graphs of its first
    step; without it, step 1 compiled again (17 s of a sweep's first job on an H100). A job also fills an
    epoch's short last micro-batch with rows that add nothing (`lbt.data.datamodule.pad_batch`), since a new
    batch size compiled once more there (step 44 of 90: 20-24 s on an H100), and reads its validation loss
    eagerly: a job's training compiles once.
    True compiles every size as a symbol from the first step, one graph for every micro-batch; on an H100 that
    graph took 93 s to compile and a later job still spent 50 s in its first step against 11 s
    (benchmarks/RESULTS.md, "Issue 15, 2026-12-06 night"), so jobs keep the default.

    cache_dir: where inductor keeps its compiled graphs and kernels (TORCHINDUCTOR_CACHE_DIR), so that the
    jobs of a sweep, on any node that sees the folder, load the first job's compilation instead of redoing it.
    Inductor keys each entry by the graph, its input shapes, the compiler's settings and the torch version, so a
    shared folder never serves a stale kernel. A TORCHINDUCTOR_CACHE_DIR the user set wins; None keeps
    inductor's default (a per-user folder in the node's /tmp).

    Random ops (LoRA dropout) fall back to eager ATen kernels, so a compiled run draws the same dropout masks
    as an eager one (on CPU compiled and eager training agree exactly). In bf16 on a GPU the compiled forward
    rounds the small LoRA delta less than eager does: the same adapter scores a slightly lower loss there,
    while both paths learn the same adapter (benchmarks/RESULTS.md, compile_check, 2026-11-27).
    """
    import torch._dynamo
    import torch._inductor.config as inductor_config

    # Inductor writes its default folder into the environment the first time it asks for one, so a value
    # other than that default is the user's.
    if cache_dir is not None and os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", _inductor_default_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).resolve())
    inductor_config.fallback_random = True
    # One code object serves every layer, and a caller may call it in up to 2 (first layer's input needs no
    # grad, the others' does) x 2 (with grad, without) x 2 (padded mask, none) x 3 (without `dynamic`: first
    # shapes, then a dynamic length, then a dynamic batch too) variants, past dynamo's default limit of 8,
    # beyond which a variant silently runs eagerly (seen in a GPU job at its first validation, before
    # validation ran eagerly).
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(torch._dynamo.config, name, max(int(getattr(torch._dynamo.config, name)), RECOMPILE_LIMIT))
    for layer in decoder_layers(model):
        layer.compile(dynamic=dynamic)
        if symbolic_length and dynamic is None:
            layer._compiled_call_impl = _symbolic_length(layer._compiled_call_impl)


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _symbolic_length(compiled):
    """A compiled layer call that first marks, in every tensor argument, each dimension past the first as
    long as the hidden states' sequence (the hidden states', the position embeddings', the mask's) as
    dynamic (`torch._dynamo.maybe_mark_dynamic`: a symbol unless the layer's code needs it constant). The
    batch and model dimensions stay constants, as torch's default compiles them."""
    import torch._dynamo

    def call(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        length = hidden.shape[1]
        for tensor in _tensors((args, kwargs)):
            for dim in range(1, tensor.dim()):
                if tensor.shape[dim] == length:
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return compiled(*args, **kwargs)

    return call


@contextlib.contextmanager
def eager_layers(model: torch.nn.Module):
    """Run compiled decoder layers eagerly inside the block: evaluation hooks (capture, steering) and
    generation see exactly the plain module, and the training graphs are not recompiled for them."""
    layers = list(decoder_layers(model))
    saved = [getattr(layer, "_compiled_call_impl", None) for layer in layers]
    for layer in layers:
        layer._compiled_call_impl = None
    try:
        yield model
    finally:
        for layer, compiled in zip(layers, saved):
            layer._compiled_call_impl = compiled


# Whether evaluation's lean LoRA forward adds each adapter's delta inside its B GEMM
# (`hardware.fast.addmm_lora`; None: off); off, it runs peft's operations in peft's order.
ADDMM_LORA = FastSetting("addmm_lora", False)
set_addmm_lora = ADDMM_LORA.set
addmm_lora_default = ADDMM_LORA.get


def delta_in_gemm(result: torch.Tensor, h: torch.Tensor, weight_b: torch.Tensor,
                  scaling: float) -> torch.Tensor | None:
    """result + scaling · h Bᵀ as one `torch.addmm`, or None where its dtypes do not allow one.

    peft's eval forward writes B's output (as wide as the layer's), multiplies it by the scaling and adds it
    to the base output: three passes over a tensor as wide as the layer's output, two of them full
    elementwise kernels. addmm reads the base output in the GEMM's epilogue instead and writes the sum once.
    In fp32 the result equals peft's up to summation order; in bf16 the sum is rounded once instead of three
    times (B's output, its product with the scaling, the sum). Under autocast addmm runs in the autocast
    dtype, as peft's B GEMM does; without autocast every operand must already share one dtype (an fp32
    adapter on a bf16 base, peft's "fp32" adapters, keeps peft's upcast sum)."""
    if weight_b.dim() != 2 or result.shape[-1] != weight_b.shape[0] or h.shape[-1] != weight_b.shape[1]:
        return None
    if not torch.is_autocast_enabled(result.device.type) and not (result.dtype == h.dtype == weight_b.dtype):
        return None
    width = result.shape[-1]
    out = torch.addmm(result.reshape(-1, width), h.reshape(-1, h.shape[-1]), weight_b.t(), alpha=scaling)
    return out.view(result.shape)


def _lean_forward(layer: torch.nn.Module, adapter: str):
    """The forward peft's LoRA Linear runs in eval mode for one plain adapter, without its per-call
    bookkeeping (argument checks, adapter loops, variant dispatch): the same operations in the same
    order and dtypes, so the same numbers. With `hardware.fast.addmm_lora` on, the delta is added inside
    B's GEMM instead (`delta_in_gemm`: bf16 noise, not the same bits). Should the layer's state change
    inside the block (adapters disabled, merged, another adapter set, train mode), the call goes to peft's
    own forward."""
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[adapter], layer.lora_B[adapter]
    scaling = layer.scaling[adapter]
    cast = getattr(layer, "cast_input_dtype_enabled", True)
    weight_dtype = lora_a.weight.dtype
    peft_forward = type(layer).forward
    addmm = ADDMM_LORA.get() and isinstance(lora_b, torch.nn.Linear) and lora_b.bias is None

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if _lean_candidate(layer) != adapter or args or kwargs:
            return peft_forward(layer, x, *args, **kwargs)
        result = base(x)
        dtype = result.dtype
        if cast and x.dtype != weight_dtype:
            x = x.to(weight_dtype)
        h = lora_a(x)
        if addmm:
            summed = delta_in_gemm(result, h, lora_b.weight, scaling)
            if summed is not None:
                return summed.to(dtype)
        return (result + lora_b(h) * scaling).to(dtype)

    return forward


def plain_adapter(module: torch.nn.Module) -> str | None:
    """The adapter name when `module` is a peft LoRA Linear computing `base(x) + B(A(drop(x))) * scaling`
    for one adapter (one active adapter, no DoRA or other variant, not merged, adapters not disabled);
    None otherwise. Both of lbt's own LoRA forwards (`_lean_forward`, `lbt.model.folded_lora`) start here."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(module) is not LoraLinear or module.merged or module.disable_adapters:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
        return None
    return active[0]


def _lean_candidate(module: torch.nn.Module) -> str | None:
    """The adapter name when `module` runs one plain adapter (`plain_adapter`) in eval mode (dropout off),
    so that its forward is `base(x) + B(A(x)) * scaling`; None otherwise."""
    return None if module.training else plain_adapter(module)


@contextlib.contextmanager
def lean_lora(model: torch.nn.Module):
    """Inside the block, every plain LoRA Linear of a model in eval mode runs `_lean_forward`: the same
    numbers as peft's forward with less Python per call, which is what bounds a batched decoding step of a
    3B model (252 adapted layers). Layers that need peft's full forward keep it. Training mode is left
    alone (dropout must run)."""
    swapped = []
    for module in model.modules():
        adapter = _lean_candidate(module)
        if adapter is not None:
            # A forward of the job's own (`lbt.model.folded_lora`) comes back on exit.
            swapped.append((module, module.__dict__.get("forward")))
            module.forward = _lean_forward(module, adapter)
    try:
        yield model
    finally:
        for module, own in swapped:
            if own is None:
                del module.forward
            else:
                module.forward = own
