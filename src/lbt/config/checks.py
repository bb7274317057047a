"""The checks across keys, after the schema walk: what `lbt.train` and `lbt.evaluate` run first."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from lbt.config.rules import ConfigError, check_schema, show
from lbt.config.schema import CAPABILITY, LOGGER_MODES, STANCE, EvaluateConfig, TrainConfig
from lbt.env import WANDB_MODES, env_value
from lbt.study import MEASURES


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for every value of a composed conf/train.yaml that cannot run."""
    errors = check_schema(cfg, TrainConfig)
    if not errors:   # the checks across keys read values of the right types
        errors = [*check_hardware(cfg.hardware), *check_model(cfg.model, cfg.hardware), *check_train(cfg.train),
                  *check_eval(cfg.eval), *check_logger(cfg.logger)]
    if errors:
        raise ConfigError(errors)


def check_evaluate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for every value of a composed conf/evaluate.yaml that cannot run."""
    errors = check_schema(cfg, EvaluateConfig)
    if not errors:
        errors = [*check_hardware(cfg.hardware), *check_model(cfg.model, cfg.hardware), *check_eval(cfg.eval)]
        if not cfg.eval.get("stance") or cfg.eval.stance._target_ != STANCE:
            errors.append(f"eval.stance: missing; lbt.evaluate runs the stance evaluator ({STANCE}: "
                          "eval=default)")
    if errors:
        raise ConfigError(errors)


# A model path that can only be a local one (a hub id is org/name): checked to exist before anything loads.
LOCAL_PREFIXES = ("/", "./", "../", "~")
GPU_ONLY_STRATEGIES = ("fsdp", "deepspeed")


def check_hardware(hw: DictConfig) -> list[str]:
    errors = []
    if hw.accelerator == "cpu" and str(hw.strategy).startswith(GPU_ONLY_STRATEGIES):
        errors.append(f"hardware.strategy={hw.strategy}: needs GPUs (hardware=gpu or multi_gpu); "
                      f"on a CPU use auto or ddp")
    if hw.accelerator == "gpu" and not cuda_available():
        visible = env_value("CUDA_VISIBLE_DEVICES") or "unset"
        errors.append(f"hardware.accelerator=gpu: no CUDA GPU visible (CUDA_VISIBLE_DEVICES={visible}); "
                      "use hardware=cpu")
    return errors


def check_model(model: DictConfig, hw: DictConfig) -> list[str]:
    errors = []
    if not model.get("random_init") and not model.get("path"):
        errors.append(f"model.path=null: model={model.name} needs a hub id or a local directory "
                      "(or model.random_init=true with model.arch)")
    if model.get("random_init") and not model.get("arch"):
        errors.append(f"model.arch: missing; model.random_init=true builds model={model.name} from it")
    for key in ("path", "tokenizer"):
        value = model.get(key)
        local = isinstance(value, str) and value.startswith(LOCAL_PREFIXES)
        if local and not Path(value).expanduser().exists():
            errors.append(f"model.{key}={value}: no such file or directory (a hub id is written org/name)")
    if model.get("quantization") is None:
        return errors
    from lbt.model.load import check_quantization  # torch: only for a quantized model

    return errors + check_quantization(model, hw)   # bitsandbytes and the accelerator it runs 4-bit on


def cuda_available() -> bool:
    """torch.cuda.is_available(), torch imported only for a GPU job (a CPU job's check stays light)."""
    import torch

    return torch.cuda.is_available()


def check_train(train: DictConfig) -> list[str]:
    errors = []
    if 1.0 not in list(train.checkpoint_fractions):
        errors.append(f"train.checkpoint_fractions={show(train.checkpoint_fractions)}: must contain 1.0 "
                      "(the final adapter)")
    return errors


def check_eval(ev: DictConfig) -> list[str]:
    """The stance and capability entries' checks across keys (other evaluators are their own)."""
    errors = []
    for name, entry in ev.items():
        target = entry.get("_target_") if entry else None
        key = f"eval.{name}"
        if target == STANCE:
            measures = entry.measures
            if len(set(measures)) != len(measures):
                errors.append(f"{key}.measures={show(measures)}: lists a measure twice")
            for measure in entry.get("measure_phases") or {}:
                if measure not in MEASURES:
                    errors.append(f"{key}.measure_phases.{measure}: not a measure; known: {', '.join(MEASURES)}")
        elif target == CAPABILITY and "base" not in entry.phases:
            errors.append(f"{key}.phases={show(entry.phases)}: must contain base "
                          "(the guardrails compare with the base model)")
    return errors


def check_logger(logger: DictConfig) -> list[str]:
    """wandb reads WANDB_MODE itself and accepts only its own modes; lbt's `auto` is LBT_WANDB_MODE's."""
    errors = []
    mode = env_value("WANDB_MODE")
    if logger.kind == "wandb" and mode is not None and mode not in WANDB_MODES:
        errors.append(f"environment WANDB_MODE={mode}: wandb accepts only {', '.join(WANDB_MODES)}; "
                      f"for lbt's own modes ({', '.join(LOGGER_MODES)}) set LBT_WANDB_MODE instead")
    return errors

