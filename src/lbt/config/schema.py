"""Typed schemas of every config group: one dataclass per group or entry, the allowed values taken from
`lbt.choices` (where the modules that use them take them too) and, for the strategy, Lightning's registry.
`lbt.config.rules` walks a composed config against them. Nothing heavy is imported here: `--help`,
`--cfg job` and a config error answer before torch or Lightning load."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from lbt.choices import (
    ADAPTER_MODES,
    DECODE_MODES,
    DTYPE_NAMES,
    INTERVENTION_MODES,
    OPTION_FORMS,
    QUANTIZATIONS,
    SUMMARIES,
)
from lbt.config.rules import (
    ENTRY_SCHEMAS,
    Count,
    Entry,
    Fraction,
    LazyChoices,
    Name,
    Natural,
    Open,
    Rule,
    one_of,
)
from lbt.study import MEASURES, PHASE_KINDS, is_phase

SCHEDULES = ("cosine", "linear", "constant")          # lbt.model.module.lr_lambda
ACCELERATORS = ("cpu", "gpu")                         # lbt.train: gpu = CUDA
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")   # Lightning's


def lightning_strategies() -> tuple[str, ...]:
    """Lightning's strategies but those that re-execute or fork the command line (they break Hydra sweeps)."""
    from lightning.pytorch.strategies import StrategyRegistry

    return ("auto", *(name for name in StrategyRegistry.available_strategies()
                      if not any(part in name for part in ("spawn", "fork", "notebook", "xla", "tpu"))))


STRATEGIES = LazyChoices(("auto",), lightning_strategies)   # the registry is read for a value other than auto
LOGGER_KINDS = ("wandb", "csv", "none")               # lbt.loggers.build_logger
LOGGER_MODES = ("auto", "online", "offline", "disabled", "dryrun")   # lbt.loggers.wandb_mode

STANCE = "lbt.eval.evaluators.StanceEvaluator"
CAPABILITY = "lbt.eval.evaluators.CapabilityEvaluator"
PROBE = "lbt.probe.evaluator.ProbeEvaluator"
INTERVENTION = "lbt.probe.callback.TrainIntervention"

Schedule = Annotated[str, one_of(*SCHEDULES)]
Measure = Annotated[str, one_of(*MEASURES)]
PhaseKind = Annotated[str, one_of(*PHASE_KINDS)]
DType = Annotated[str, one_of(*DTYPE_NAMES)]
Variant = Annotated[str, one_of(*SUMMARIES)]
Entries = dict[str, Entry | None]                   # {name: entry}; a null entry is switched off


# -- training ---------------------------------------------------------------------------------------------

@dataclass
class Data:
    val_fraction: Fraction
    require_validation: bool
    validation_report: str | None = None      # null: validation_report.json next to the corpus
    drop_long_prompts: bool = False           # records whose prompt fills train.max_length: refused if false


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
    log_every_steps: Count | None = None      # a progress line every n steps without a terminal; null: ~10 %


@dataclass
class Paths:
    root: Name
    data_dir: Name
    cache_dir: Name


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
    # With ce_chunk: each chunk's loss and gradient in one pass (lbt.model.fused_ce); on in hardware=gpu.
    fused_ce: bool = False
    # A wide LoRA layer's B product inside its base GEMM (lbt.model.folded_lora); off everywhere: measured,
    # not adopted (benchmarks/RESULTS.md).
    fold_lora: bool = False
    # Compiled layers cached in <paths.cache_dir>/inductor, shared by a sweep's jobs.
    compile_cache: bool = True
    # Greedy decoding (lbt.eval.decode); null: eager. hardware=gpu sets graph.
    decode: Annotated[str, one_of(*DECODE_MODES)] | None = None
    # The base phase evaluated once per sweep (lbt.eval.base_cache); on in hardware=gpu.
    share_base: bool = False
    # A phase's measures and item sets in one engine call per kind (lbt.eval.battery).
    pool_measures: bool = True
    # Prompts that open alike run their common prefix once (lbt.eval.prefix); on in hardware=gpu.
    share_prefix: bool = False
    # Evaluation runs each RMSNorm as one kernel (lbt.model.fused_norm); on in hardware=gpu.
    fused_norm: bool = False
    # Masked prompt forwards read grouped key/value heads in place (lbt.model.gqa); on in hardware=gpu.
    sdpa_gqa: bool = False
    # Evaluation adds each LoRA delta inside its B GEMM (lbt.model.lora.delta_in_gemm); off everywhere: not
    # shown to pay.
    addmm_lora: bool = False
    # Long-lived objects skip Python's full garbage collections during training (lbt.heap); on in
    # hardware=gpu.
    freeze_heap: bool = False


@dataclass
class Hardware:
    accelerator: Annotated[str, one_of(*ACCELERATORS)]
    devices: Count
    num_nodes: Count
    strategy: Annotated[str, Rule(choices=STRATEGIES)]
    dtype: DType
    precision: Annotated[str, one_of(*PRECISIONS)]
    num_workers: Natural
    micro_batch: Count
    eval_batch_size: Count
    fast: Fast
    cpu_threads: Natural | None = None        # 0 or null: torch's default


@dataclass
class Logger:
    kind: Annotated[str, one_of(*LOGGER_KINDS)]
    project: str | None = None
    entity: str | None = None
    mode: Annotated[str, one_of(*LOGGER_MODES)] | None = None


# -- evaluators (conf/eval, conf/probe) and the intervention ------------------------------------------

@dataclass
class Generation:
    max_new_tokens: Count


@dataclass
class Stance(Entry):
    """lbt.eval.evaluators.StanceEvaluator: the eval group's `stance` entry."""
    item_sets: Annotated[dict[str, Name], Rule(nonempty=True)]
    measures: Annotated[list[Measure], Rule(nonempty=True)]
    measure_phases: dict[str, list[PhaseKind]] | None = None
    max_items: Count | None = None
    option_form: Annotated[str, one_of(*OPTION_FORMS)] = "bare"
    batch_size: Count = 128
    forced_choice: Generation | None = None
    likert: Generation | None = None
    open_ended: Generation | None = None
    log_tables: bool = True


@dataclass
class Capability(Entry):
    """lbt.eval.evaluators.CapabilityEvaluator: the eval group's `capability` entry."""
    heldout_path: Name | None
    refusal_path: Name | None
    mmlu_path: str | None = None
    batch_size: Count = 16
    max_length: Count = 512
    refusal_max_new_tokens: Count = 48
    generation_batch_size: Count | None = None
    max_texts: Count | None = None
    max_refusal: Count | None = None
    mmlu_max_items: Count | None = None
    option_form: Annotated[str, one_of(*OPTION_FORMS)] = "bare"
    perplexity_rise: Annotated[float, Rule(ge=0)] = 0.05
    mmlu_drop: Annotated[float, Rule(ge=0)] = 0.02
    phases: Annotated[list[PhaseKind], Rule(nonempty=True)] = field(default_factory=lambda: list(PHASE_KINDS))


@dataclass
class Directions:
    """conf/directions: the base model's direction set (lbt.probe.evaluator.DirectionSource)."""
    arms: dict[str, Arm]
    variant: Variant
    batch_size: Count
    max_length: Count
    cache_dir: Name


@dataclass
class Probe(Entry):
    """lbt.probe.evaluator.ProbeEvaluator: conf/probe."""
    directions: Directions
    items: Name
    max_items: Count | None = None
    batch_size: Count = 16


@dataclass
class Intervention(Entry):
    """lbt.probe.callback.TrainIntervention: conf/intervention."""
    mode: Annotated[str, one_of(*INTERVENTION_MODES)]
    directions: Directions
    seed: int = 0


ENTRY_SCHEMAS.update({STANCE: Stance, CAPABILITY: Capability, PROBE: Probe, INTERVENTION: Intervention})


# -- the two commands --------------------------------------------------------------------------------------

def stays_inside(name: str) -> bool:
    """A folder name under outputs/runs or multirun: not absolute, no '..' part (a nested name is fine)."""
    return bool(name) and not name.startswith(("/", "~")) and ".." not in name.replace("\\", "/").split("/")


FolderName = Annotated[str, Rule(accepts=stays_inside,
                                 named="a folder name inside the outputs (no leading / or ~, no '..' part)")]


@dataclass
class TrainConfig:
    """conf/train.yaml."""
    seed: Natural
    sweep_name: FolderName | int              # `sweep_name=2024` composes as an integer
    data: Data
    train: Train
    paths: Paths
    model: Model
    arm: Arm
    hardware: Hardware
    logger: Logger
    eval: Entries
    directions: Directions
    probe: Entry
    intervention: Entry
    callbacks: Entries = field(default_factory=dict)   # Lightning callbacks besides the phases (tests, users)
    run_name: FolderName | int | None = None  # a single run's folder name (conf/train.yaml)
    job_dir: str | None = None                # the job directory when Hydra sets none (tests, notebooks)
    extra: Open | None = None                 # free-form notes, kept in the run card (secrets redacted)


@dataclass
class EvaluateConfig:
    """conf/evaluate.yaml."""
    model: Model
    hardware: Hardware
    eval: Entries
    paths: Paths
    # item files (item_set: eval.stance.item_sets' name for the file, else its stem), or {item_set: file}
    items: Annotated[list[Name], Rule(nonempty=True)] | Annotated[dict[str, Name], Rule(nonempty=True)]
    adapter: str | None = None
    phase: Annotated[str, Rule(accepts=is_phase, named="base, final or step_<n>")] | None = None
    out_dir: str | None = None
