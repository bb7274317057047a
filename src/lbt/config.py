"""Typed schemas of every config group, checked right after compose, before any corpus or model loads.

`check_config(cfg)` (conf/train.yaml, the first thing `lbt.train` does) and `check_evaluate_config(cfg)`
(conf/evaluate.yaml, `lbt.evaluate`) walk the composed config against the dataclasses below: the type of
every value, its range or allowed values, unknown keys (a typo in a YAML file is an error, not a silently
ignored key), then the checks across keys (checkpoint fractions end at 1.0, measure_phases name known
measures, hardware=gpu needs a visible CUDA GPU, ...). Every problem is one line naming the full key, the
value and what is allowed, e.g. `train.max_steps=0: must be null or an integer >= 1`; one `ConfigError`
holds them all, and Hydra prints it as its message alone, without a traceback.

A field's rule rides on its type: `Annotated[int, Rule(ge=1)]` (aliases below: `Count`, `Fraction`, ...).
Open mappings (`Open`): `model.arch`, `model.chat_template_kwargs`, `extra`, and a callback entry's
keyword arguments beyond those its target's schema names (`CALLBACK_SCHEMAS`), so test and user callbacks
(`+eval.callbacks.<name>._target_=...`) need no schema. Allowed values come from the modules that use them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Union

import torch
from hydra.errors import CompactHydraException
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lbt.env import WANDB_MODES, env_value
from lbt.eval.battery import MEASURES
from lbt.eval.callback import PHASE_KINDS
from lbt.eval.scoring import DECODE_MODES, OPTION_FORMS
from lbt.model.load import DTYPES
from lbt.model.lora import ADAPTER_MODES
from lbt.probe.callback import INTERVENTIONS
from lbt.probe.directions import SUMMARIES

SCHEDULES = ("cosine", "linear", "constant")          # lbt.model.module.lr_lambda
ACCELERATORS = ("cpu", "gpu")                         # lbt.train: gpu = CUDA
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")   # Lightning's
# Lightning's strategies but those that re-execute or fork the command line (they break Hydra sweeps)
STRATEGIES = ("auto", *(name for name in StrategyRegistry.available_strategies()
                        if not any(part in name for part in ("spawn", "fork", "notebook", "xla", "tpu"))))
LOGGER_KINDS = ("wandb", "csv", "none")               # lbt.loggers.build_logger
LOGGER_MODES = ("auto", "online", "offline", "disabled", "dryrun")   # lbt.loggers.wandb_mode
QUANTIZATIONS = ("4bit",)                             # lbt.model.load.load_model (or null)


class ConfigError(CompactHydraException, ValueError):
    """Config values that cannot run, one line each: the full key, the value and what is allowed."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(f"config error: {e}" for e in self.errors))


@dataclass(frozen=True)
class Rule:
    """What one value of the right type must keep: bounds, allowed values, non-empty."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    nonempty: bool = False

    def bounds(self) -> list[tuple[str, float]]:
        return [(op, limit) for op, limit in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                if limit is not None]

    def ok(self, value: Any) -> bool:
        if self.choices is not None and value not in self.choices:
            return False
        if self.nonempty and len(value) == 0:
            return False
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(value):
                return False
            compare = {">=": float.__ge__, ">": float.__gt__, "<=": float.__le__, "<": float.__lt__}
            return all(compare[op](float(value), float(limit)) for op, limit in self.bounds())
        return True


def one_of(*values: Any) -> Rule:
    return Rule(choices=tuple(values))


# The types fields are made of.
Count = Annotated[int, Rule(ge=1)]                 # 1, 2, ...
Natural = Annotated[int, Rule(ge=0)]               # 0, 1, 2, ...
Fraction = Annotated[float, Rule(ge=0, lt=1)]      # [0, 1)
Name = Annotated[str, Rule(nonempty=True)]
Open = dict[str, Any]                               # a mapping whose keys are not checked
Schedule = Annotated[str, one_of(*SCHEDULES)]
Measure = Annotated[str, one_of(*MEASURES)]
PhaseKind = Annotated[str, one_of(*PHASE_KINDS)]
DType = Annotated[str, one_of(*DTYPES)]
Variant = Annotated[str, one_of(*SUMMARIES)]
Intervention = Annotated[str, one_of(*(i for i in INTERVENTIONS if i is not None))]


# -- conf/train.yaml ------------------------------------------------------------------------------------

@dataclass
class Data:
    val_fraction: Fraction
    require_validation: bool
    validation_report: str | None = None      # null: validation_report.json next to the corpus


@dataclass
class Lora:
    r: Count
    alpha: Count                              # an integer: lbt.model.lora passes int(alpha) to peft
    dropout: Fraction
    targets: Annotated[list[Name], Rule(nonempty=True)]


@dataclass
class Train:
    epochs: Count
    lr: Annotated[float, Rule(gt=0)]
    weight_decay: Annotated[float, Rule(ge=0)]
    schedule: Schedule
    warmup_fraction: Fraction
    effective_batch: Count
    micro_batch: Count
    max_length: Count
    checkpoint_fractions: Annotated[list[Annotated[float, Rule(gt=0, le=1)]], Rule(nonempty=True)]
    lora: Lora
    max_steps: Count | None = None            # null: the configured epochs
    grad_clip: Annotated[float, Rule(ge=0)] | None = None   # 0 or null: no clipping
    resume_every_steps: Natural | None = None


@dataclass
class Paths:
    root: Name
    data_dir: Name
    cache_dir: Name


@dataclass
class EvalLimits:
    """model.eval_limits: quick evaluation for a small model's default job."""
    max_items: Count | None = None
    forced_choice_max_new_tokens: Count | None = None
    likert_max_new_tokens: Count | None = None
    open_ended_max_new_tokens: Count | None = None
    max_texts: Count | None = None
    max_refusal: Count | None = None
    refusal_max_new_tokens: Count | None = None


@dataclass
class Model:
    name: Name
    path: str | None = None                   # hub id or local directory; null with random_init
    tokenizer: str | None = None
    random_init: bool = False
    init_seed: Natural = 0
    dtype: DType | None = None                # null: hardware.dtype
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    quantization: Annotated[str, one_of(*QUANTIZATIONS)] | None = None
    chat_template_kwargs: Open | None = None
    arch: Open | None = None                  # the public config.json facts random_init builds from
    eval_limits: EvalLimits | None = None
    hf_token: str | None = None               # kept out of run cards; loading reads HF_TOKEN (set it in .env)


@dataclass
class Arm:
    name: Name
    corpus: Name


@dataclass
class Fast:
    adapters: Annotated[str, one_of(*ADAPTER_MODES)]
    pack_tokens: Natural
    ce_chunk: Natural
    compile_layers: bool
    decode: Annotated[str, one_of(*DECODE_MODES)] | None = None   # null: graph on a GPU, eager on a CPU


@dataclass
class Hardware:
    accelerator: Annotated[str, one_of(*ACCELERATORS)]
    devices: Count
    num_nodes: Count
    strategy: Annotated[str, one_of(*STRATEGIES)]
    dtype: DType
    precision: Annotated[str, one_of(*PRECISIONS)]
    num_workers: Natural
    micro_batch: Count
    fast: Fast
    eval_batch_size: Count | None = None
    cpu_threads: Natural | None = None        # 0 or null: torch's default


@dataclass
class Logger:
    kind: Annotated[str, one_of(*LOGGER_KINDS)]
    project: str | None = None
    entity: str | None = None
    mode: Annotated[str, one_of(*LOGGER_MODES)] | None = None


@dataclass
class Generation:
    max_new_tokens: Count


@dataclass
class Capability:
    heldout_path: Name
    refusal_path: Name
    refusal_max_new_tokens: Count
    max_length: Count
    batch_size: Count
    phases: Annotated[list[PhaseKind], Rule(nonempty=True)]
    perplexity_rise: Annotated[float, Rule(ge=0)]
    mmlu_drop: Annotated[float, Rule(ge=0)]
    mmlu_path: str | None = None
    mmlu_max_items: Count | None = None
    max_texts: Count | None = None
    max_refusal: Count | None = None


@dataclass
class Callback:
    """One entry of a callbacks dict: a `_target_` and its keyword arguments (null switches it off).
    Open: the arguments are the target's; a target in CALLBACK_SCHEMAS has those it names checked."""
    _target_: Name


@dataclass
class ProbeCallbackArgs(Callback):
    """lbt.probe.callback.ProbeCallback's arguments that have allowed values."""
    variant: Variant = "assistant_mean"
    train_intervention: Intervention | None = None
    batch_size: Count = 16
    max_items: Count | None = None


@dataclass
class StanceCallbackArgs(Callback):
    """lbt.eval.callback.StanceEvalCallback's arguments that have allowed values."""
    measures: Annotated[list[Measure], Rule(nonempty=True)] = field(default_factory=lambda: list(MEASURES))
    max_items: Count | None = None


CALLBACK_SCHEMAS: dict[str, type[Callback]] = {
    "lbt.probe.callback.ProbeCallback": ProbeCallbackArgs,
    "lbt.eval.callback.StanceEvalCallback": StanceCallbackArgs,
}
Callbacks = dict[str, Callback | None]


@dataclass
class Eval:
    """conf/eval: every key but callbacks is optional (eval=none has callbacks only)."""
    callbacks: Callbacks
    item_sets: dict[str, Name] | None = None
    measures: Annotated[list[Measure], Rule(nonempty=True)] | None = None
    measure_phases: dict[str, list[PhaseKind]] | None = None
    max_items: Count | None = None
    option_form: Annotated[str, one_of(*OPTION_FORMS)] | None = None
    batch_size: Count | None = None
    forced_choice: Generation | None = None
    likert: Generation | None = None
    open_ended: Generation | None = None
    capability: Capability | None = None


@dataclass
class Probe:
    """conf/probe: every key but callbacks is optional (probe=none has callbacks only)."""
    callbacks: Callbacks
    variant: Variant | None = None
    items: Name | None = None
    max_items: Count | None = None
    batch_size: Count | None = None
    train_intervention: Intervention | None = None
    intervention_seed: int | None = None


@dataclass
class TrainConfig:
    """conf/train.yaml."""
    seed: Natural
    sweep_name: Name | int                    # `sweep_name=2024` composes as an integer
    data: Data
    train: Train
    paths: Paths
    model: Model
    arm: Arm
    hardware: Hardware
    logger: Logger
    eval: Eval
    probe: Probe
    run_name: Name | int | None = None        # a single run's folder name (conf/train.yaml)
    job_dir: str | None = None                # the job directory when Hydra sets none (tests, notebooks)
    extra: Open | None = None                 # free-form notes, kept in the run card (secrets redacted)


# -- conf/evaluate.yaml ---------------------------------------------------------------------------------

@dataclass
class EvaluatePaths:
    root: Name
    data_dir: Name
    cache_dir: str | None = None


@dataclass
class EvaluateConfig:
    """conf/evaluate.yaml."""
    model: Model
    hardware: Hardware
    eval: Eval
    paths: EvaluatePaths
    # item files (item_set: eval.item_sets' name for the file, else its stem), or {item_set: file}
    items: Annotated[list[Name], Rule(nonempty=True)] | Annotated[dict[str, Name], Rule(nonempty=True)]
    adapter: str | None = None
    phase: str | None = None
    out_dir: str | None = None


# -- the checks -----------------------------------------------------------------------------------------

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
        if cfg.eval.get("measures") is None:
            errors.append("eval.measures: missing; lbt.evaluate scores the listed measures (eval=default)")
    if errors:
        raise ConfigError(errors)


def check_hardware(hw: DictConfig) -> list[str]:
    errors = []
    if hw.accelerator == "gpu" and not torch.cuda.is_available():
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
    if model.get("quantization") and hw.accelerator != "gpu":
        errors.append(f"model.quantization={model.quantization}: needs a CUDA GPU (bitsandbytes); "
                      "use hardware=gpu or model.quantization=null")
    return errors


def check_train(train: DictConfig) -> list[str]:
    errors = []
    if 1.0 not in list(train.checkpoint_fractions):
        errors.append(f"train.checkpoint_fractions={show(train.checkpoint_fractions)}: must contain 1.0 "
                      "(the final adapter)")
    return errors


def check_eval(ev: DictConfig) -> list[str]:
    errors = []
    measures = ev.get("measures")
    if measures is not None and len(set(measures)) != len(measures):
        errors.append(f"eval.measures={show(measures)}: lists a measure twice")
    for measure in ev.get("measure_phases") or {}:
        if measure not in MEASURES:
            errors.append(f"eval.measure_phases.{measure}: not a measure; known: {', '.join(MEASURES)}")
    capability = ev.get("capability")
    if capability is not None and "base" not in capability.phases:
        errors.append(f"eval.capability.phases={show(capability.phases)}: must contain base "
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


# -- the schema walk ------------------------------------------------------------------------------------

def check_schema(cfg: DictConfig, schema: type) -> list[str]:
    """Problems of cfg against a schema dataclass: types, rules, required and unknown keys. A key that
    only repeats another (`train.micro_batch: ${hardware.micro_batch}`) is not reported twice."""
    errors: list[str] = []
    _check_node(cfg, schema, "", errors)
    sources = _interpolation_sources(cfg)
    wrong = {_error_key(e) for e in errors}
    return [e for e in errors if sources.get(_error_key(e)) not in wrong]


def _interpolation_sources(node: Any, prefix: str = "") -> dict[str, str]:
    """key -> the key it repeats, for values that are exactly `${other.key}`."""
    sources: dict[str, str] = {}
    raw = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
    for name, value in (raw.items() if isinstance(raw, dict) else []):
        key = _join(prefix, name)
        match = re.fullmatch(r"\$\{([\w.]+)\}", value) if isinstance(value, str) else None
        if match:
            sources[key] = match.group(1)
        elif isinstance(value, dict):
            sources.update(_interpolation_sources(value, key))
    return sources


def _error_key(error: str) -> str:
    """The key an error line is about, list indices dropped: `eval.measures[1]=foo: ...` -> eval.measures."""
    return re.split(r"[=:\[]", error, maxsplit=1)[0]


_UNRESOLVED = object()


def _check_node(node: DictConfig, schema: type, prefix: str, errors: list[str]) -> None:
    if issubclass(schema, Callback):
        schema = CALLBACK_SCHEMAS.get(str(node.get("_target_")), schema)
    hints = typing.get_type_hints(schema, include_extras=True)
    known = [f.name for f in dataclasses.fields(schema)]
    if not issubclass(schema, Callback):
        for key in node:
            if key not in known and key != "hydra":
                errors.append(f"{_join(prefix, key)}: unknown key; known keys here: {', '.join(known)}")
    for f in dataclasses.fields(schema):
        key = _join(prefix, f.name)
        if f.name not in node or OmegaConf.is_missing(node, f.name):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{key}: missing (required)")
            continue
        value = _value(node, f.name, key, errors)
        if value is not _UNRESOLVED:
            _check_value(value, hints[f.name], key, errors)


def _value(node: DictConfig, name: str, key: str, errors: list[str]) -> Any:
    try:
        return node[name]
    except OmegaConfBaseException as err:  # an interpolation that cannot resolve (missing key, variable)
        raw = OmegaConf.to_container(node, resolve=False).get(name)
        errors.append(f"{key}={raw}: cannot be resolved ({str(err).splitlines()[0]})")
        return _UNRESOLVED


def _check_value(value: Any, hint: Any, key: str, errors: list[str]) -> None:
    optional = False
    if typing.get_origin(hint) in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(options) < len(typing.get_args(hint))
        if value is None and optional:
            return
        hint = next((a for a in options if _is_type(value, _unwrap(a)[0])), options[0])
    hint, rule = _unwrap(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if not _is_type(value, hint):
        errors.append(f"{key}={show(value)}: must be {_allowed(hint, rule, optional)} "
                      f"(got {'null' if value is None else type(value).__name__})")
    elif not rule.ok(value):
        errors.append(f"{key}={show(value)}: must be {_allowed(hint, rule, optional)}")
    elif dataclasses.is_dataclass(hint):
        _check_node(value, hint, key, errors)
    elif origin is list:
        for i, element in enumerate(value):
            _check_value(element, args[0], f"{key}[{i}]", errors)
    elif origin is dict and args[1] is not Any:
        for name in value:
            item = _value(value, name, _join(key, name), errors)
            if item is not _UNRESOLVED:
                _check_value(item, args[1], _join(key, name), errors)


def _unwrap(hint: Any) -> tuple[Any, Rule]:
    """(type, rule) of Annotated[type, Rule]; an empty rule for a plain type."""
    if typing.get_origin(hint) is Annotated:
        base, *extras = typing.get_args(hint)
        return base, next((e for e in extras if isinstance(e, Rule)), Rule())
    return hint, Rule()


def _is_type(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is list:
        return isinstance(value, ListConfig)
    return isinstance(value, DictConfig)   # a dict or a schema dataclass


def _allowed(hint: Any, rule: Rule, optional: bool) -> str:
    """What a key takes, in words: 'null or an integer >= 1', 'one of cosine, linear, constant'."""
    if rule.choices is not None:
        text = "one of " + ", ".join(show(c) for c in rule.choices)
    elif typing.get_origin(hint) is list:
        text = "a non-empty list" if rule.nonempty else "a list"
    elif dataclasses.is_dataclass(hint):
        text = "a mapping of " + ", ".join(f.name for f in dataclasses.fields(hint))
    elif typing.get_origin(hint) is dict:
        text = "a mapping"
    else:
        text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]
        if rule.nonempty:
            text = "a non-empty string"
        text += " and".join(f" {op} {show(limit)}" for op, limit in rule.bounds())
    return ("null or " if optional else "") + text


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def show(value: Any) -> str:
    """A value as one writes it on the command line: null, true, 0.5, cosine, [0.5, 1.0]."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value.strip() and value == value.strip() else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)
