"""QLoRA on a CPU: a 4-bit (bitsandbytes nf4) Qwen2-architecture model with dimensions that are multiples
of 64 trains through lbt.train, is evaluated and probed, and its adapter reloads onto a 4-bit base; and
`check_quantization` names the key and what it allows."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from lbt.model import load as load_mod
from lbt.model.load import ModelConfigError, check_quantization, load_model, load_tokenizer

try:
    import bitsandbytes as bnb
except ImportError:  # the checks' messages are tested without it; loading 4-bit needs it
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="4-bit needs bitsandbytes (pip install -e '.[dev]')")

pytestmark = pytest.mark.usefixtures("one_thread")

# Every dimension a multiple of 64: bitsandbytes quantizes blocks of 64 values, and its CPU inference kernel
# (switched off by load_model, see keep_cpu_training_layout) needs output sizes divisible by 32.
SMALL_4BIT = ["model.quantization=4bit", "model.arch.hidden_size=128", "model.arch.intermediate_size=256",
              "model.arch.num_hidden_layers=2"]


def quant(value: object, **model: object) -> DictConfig:
    return OmegaConf.create({"quantization": value, **model})


@needs_bnb
@pytest.mark.parametrize("accelerator", ["cpu", "gpu"])
def test_check_quantization_allows_4bit_and_null(accelerator):
    assert check_quantization(quant(None), {"accelerator": accelerator}) == []
    assert check_quantization(quant("4bit"), {"accelerator": accelerator}) == []


def test_check_quantization_names_the_key_and_the_allowed_values(monkeypatch):
    assert check_quantization(quant("8bit"), {"accelerator": "gpu"}) == [
        "model.quantization=8bit: must be null or one of 4bit"]
    monkeypatch.setattr(load_mod, "bitsandbytes_version", lambda: None)
    [missing] = check_quantization(quant("4bit"), {"accelerator": "gpu"})
    assert missing.startswith("model.quantization=4bit: needs bitsandbytes") and "bitsandbytes>=0.45" in missing
    assert "model.quantization=null" in missing
    monkeypatch.setattr(load_mod, "bitsandbytes_version", lambda: "0.43.3")
    assert check_quantization(quant("4bit"), {"accelerator": "gpu"}) == []  # CUDA: any 4-bit release
    [old] = check_quantization(quant("4bit"), {"accelerator": "cpu"})
    assert old.startswith("model.quantization=4bit with hardware.accelerator=cpu: bitsandbytes 0.43.3")
    assert "bitsandbytes>=0.45" in old and "\n" not in old


def test_load_model_raises_the_same_problems(monkeypatch):
    tokenizer = load_tokenizer(quant(None, name="tiny", tokenizer=None, path=None, random_init=True,
                                     trust_remote_code=False))
    monkeypatch.setattr(load_mod, "bitsandbytes_version", lambda: "0.44.1")
    cfg = quant("4bit", name="tiny", path=None, random_init=True, init_seed=0, trust_remote_code=False, arch={})
    with pytest.raises(ModelConfigError, match=r"model.quantization=4bit with hardware.accelerator=cpu"):
        load_model(cfg, tokenizer, torch.float32)
    with pytest.raises(ModelConfigError, match=r"model.quantization=8bit: must be null or one of 4bit"):
        load_model(quant("8bit", random_init=True), tokenizer, torch.float32)


@needs_bnb
def test_random_init_4bit_quantizes_the_same_weights():
    """random_init with quantization is no longer ignored: the 4-bit model is the nf4 rounding of the very
    weights the unquantized random-init model gets."""
    from tests.conftest import compose_train

    cfg = compose_train(SMALL_4BIT)
    tokenizer = load_tokenizer(cfg.model)
    q4 = load_model(cfg.model, tokenizer, torch.float32)
    cfg.model.quantization = None
    full = load_model(cfg.model, tokenizer, torch.float32)
    layer = q4.model.layers[1].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and q4.is_loaded_in_4bit
    dense = full.model.layers[1].mlp.down_proj.weight
    dequant = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    # nf4 keeps 16 levels per block of 64: close to the original, not equal to it.
    assert dequant.shape == dense.shape and not torch.equal(dequant, dense)
    assert torch.corrcoef(torch.stack([dequant.flatten(), dense.flatten()]))[0, 1] > 0.99
    assert torch.equal(q4.model.embed_tokens.weight, full.model.embed_tokens.weight)  # not quantized
    # Named as the unquantized random init is, not after the temporary folder it was quantized through.
    assert q4.config._name_or_path == full.config._name_or_path
    assert q4.name_or_path == full.name_or_path


@needs_bnb
def test_4bit_job_trains_only_lora_and_its_adapter_reloads_on_a_4bit_base(tiny_cfg, tmp_path, monkeypatch):
    from peft import PeftModel

    from lbt import train as train_mod

    seen = {}
    wrap = train_mod.wrap_lora

    def spy(model, *args, **kwargs):
        wrapped = wrap(model, *args, **kwargs)
        seen["model"] = wrapped
        seen["before"] = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.dtype.is_floating_point}
        return wrapped

    monkeypatch.setattr(train_mod, "wrap_lora", spy)
    cfg = tiny_cfg(*SMALL_4BIT, "eval=quick", "probe=default", "train.epochs=2", "train.max_steps=4",
                   "train.checkpoint_fractions=[0.5,1.0]", "train.lr=1e-3", "train.max_length=1024")
    card = train_mod.train(cfg)
    job = tmp_path / "job"
    assert card["status"] == "done" and (job / "DONE").exists()
    # The saved adapter names no deleted temporary folder as its base model.
    adapter_config = json.loads((job / "adapter" / "adapter_config.json").read_text())
    assert "lbt-random-init-" not in str(adapter_config.get("base_model_name_or_path"))

    model = seen["model"]
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # every targeted projection of both layers is 4-bit
    assert all(m.weight.dtype == torch.uint8 for m in linears)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    changed = {n for n, p in model.named_parameters() if n in seen["before"] and not torch.equal(p, seen["before"][n])}
    assert changed and changed <= trainable and {n for n in trainable if "lora_B" in n} <= changed

    losses = card["loss_history"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    # Evaluation and the probe ran on the 4-bit model at both phases.
    saved = json.loads((job / "run.json").read_text())
    assert saved["config"]["model"]["quantization"] == "4bit"
    for phase in ("base", "step_2", "final"):
        summary = json.loads((job / "eval" / phase / "summary.json").read_text())
        for item_set in summary["item_sets"].values():
            # Every measure ran; a random model's generations rarely parse, its log-probs always score.
            assert all(m["n_rows"] > 0 for m in item_set["measures"].values())
            for name in ("letter_logprob", "logprob"):
                assert item_set["measures"][name]["n_scored"] == item_set["measures"][name]["n_rows"]
        assert (job / "probe" / f"{phase}.json").exists()

    tokenizer = load_tokenizer(cfg.model)
    base = load_model(cfg.model, tokenizer, torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(job / "adapter")).eval()
    assert isinstance(reloaded.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    ids = tokenizer("Should I water the basil?", return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


@needs_bnb
@pytest.mark.parametrize("adapters,adapter_dtype", [("fp32", torch.float32), ("autocast", torch.float32),
                                                    ("bf16", torch.bfloat16)])
def test_wrap_lora_prepares_a_4bit_base_and_keeps_the_dtype_policy(adapters, adapter_dtype, monkeypatch):
    """peft's prepare_model_for_kbit_training ran, without gradient checkpointing; the unquantized base
    weights keep the job's dtype (its fp32 upcast is undone: fp32 activations did not fit on a GPU), and the
    adapters follow hardware.fast.adapters as on a bf16 base."""
    import peft
    from peft import prepare_model_for_kbit_training
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lbt.model import lora as lora_mod
    from tests.conftest import compose_train

    calls = []

    def prepare(model, **kwargs):
        calls.append(kwargs)
        return prepare_model_for_kbit_training(model, **kwargs)

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    cfg = compose_train(SMALL_4BIT)
    model = load_model(cfg.model, load_tokenizer(cfg.model), torch.bfloat16)
    base_dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert base_dtypes["model.norm.weight"] == torch.bfloat16
    wrapped = lora_mod.wrap_lora(model, cfg.train.lora, adapters=adapters)
    assert calls == [{"use_gradient_checkpointing": False}]
    inner = wrapped.base_model.model
    kept = {n.replace(".base_layer", ""): p.dtype for n, p in inner.named_parameters() if "lora_" not in n}
    assert kept == base_dtypes
    assert not inner.is_gradient_checkpointing
    assert not any(p.requires_grad for n, p in inner.named_parameters() if "lora_" not in n)
    lora = {p.dtype for n, p in wrapped.named_parameters() if "lora_" in n}
    assert lora == {adapter_dtype}
    layers = [m for m in wrapped.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.cast_input_dtype_enabled == (adapters != "autocast") for m in layers)
