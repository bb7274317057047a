"""The names a training job uses in W&B: metric keys, the step axis, job types, run names, tags and the
config keys a sweep is grouped by. The loggers and the dashboard (`lbt.dashboard`) both read them here, so a
panel never points at a key nobody logs.

Who logs what: `train/*` and `val/loss` (lbt.model.module), `eval/<item_set>/<measure>/stance` and its
`parse_rate`, `domain/<d>` and `validity/<measure>` siblings (lbt.eval.summary.flat_metrics),
`shift_vs_base/<item_set>/<measure>`, `eval/seconds` and the rows tables `eval_rows/<measure>`
(lbt.eval.evaluators), the capability scalars `cap/*`, the probe scalars at ℓ*
`probe/<position>_<projection|shift>_lstar` and the layerwise line plots `probe/<phase>/<column>`
(lbt.probe.evaluator), and the analysis run's `tables/<name>`, `figures/<name>` and summary
`combined_d/<family>/<measure>` (lbt.analyze.wandb_run). All of a training run's values are logged at the
one step `STEP` (lbt.loggers.log_at_step).

This module imports nothing heavy: the dashboard command reads it without loading torch.
"""

from __future__ import annotations

from collections.abc import Mapping

# -- the run: where it sits and how it is found ------------------------------------------------------------

# Lightning's WandbLogger writes this key with every log_metrics(step=...) call and declares it the step
# metric of every other key, so it is the one x axis every scalar of a training run shares. Its value is the
# number of optimizer steps completed: phase base is 0, step_<n> is n, final the last step; the loss of the
# n-th optimizer step (the step that made model n) and val/loss of model n are at n too.
STEP = "trainer/global_step"

JOB_TYPE_TRAIN = "train"        # every training job, whatever its arm (the arm is in config and tags)
JOB_TYPE_ANALYSIS = "analysis"  # lbt.analyze: tables, figures, headline numbers
JOB_TYPE_INTERP = "interp"      # lbt.interp

# Config keys as W&B flattens the job's resolved config (nested dicts joined by dots): the run's arm, model
# family and seed. A sweep's runs are grouped by ARM_CONFIG, and by MODEL_CONFIG when families differ.
ARM_CONFIG = "arm.name"
MODEL_CONFIG = "model.name"
SEED_CONFIG = "seed"


def run_group(sweep_name: str) -> str:
    """The W&B group of a sweep's runs (training, analysis and interp alike): the sweep's name."""
    return str(sweep_name)


def run_name(model: str, arm: str, seed: int) -> str:
    return f"{model}-{arm}-s{seed}"


def run_tags(model: str, arm: str, seed: int, experiment: str | None) -> list[str]:
    return [f"model:{model}", f"arm:{arm}", f"seed:{seed}", f"experiment:{experiment or 'none'}"]


# -- training ---------------------------------------------------------------------------------------------

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_TOKENS_PER_S = "train/tokens_per_s"
VAL_LOSS = "val/loss"

# -- the stance battery, per phase ------------------------------------------------------------------------

EVAL_PREFIX = "eval"
EVAL_SECONDS = "eval/seconds"
SHIFT_PREFIX = "shift_vs_base"


def stance(item_set: str, measure: str) -> str:
    """Mean stance of an item set on a measure at the phase (positive = pro-change)."""
    return f"{EVAL_PREFIX}/{item_set}/{measure}/stance"


def parse_rate(item_set: str, measure: str) -> str:
    return f"{EVAL_PREFIX}/{item_set}/{measure}/parse_rate"


def domain_stance(item_set: str, measure: str, domain: str) -> str:
    return f"{EVAL_PREFIX}/{item_set}/{measure}/domain/{domain}"


def validity(item_set: str, measure: str) -> str:
    """Agreement of a measure with the forced choice on the item set."""
    return f"{EVAL_PREFIX}/{item_set}/validity/{measure}"


def shift_vs_base(item_set: str, measure: str) -> str:
    """The study's quantity per run: mean stance at the phase minus at base, same item set and measure."""
    return f"{SHIFT_PREFIX}/{item_set}/{measure}"


def stance_shifts(phase_metrics: Mapping[str, float], base_metrics: Mapping[str, float]) -> dict[str, float]:
    """shift_vs_base scalars from two phases' flat metrics (keys `stance(...)`): phase minus base, for every
    (item set, measure) whose mean stance both phases have."""
    shifts = {}
    for key, value in phase_metrics.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == EVAL_PREFIX and parts[3] == "stance" and key in base_metrics:
            shifts[shift_vs_base(parts[1], parts[2])] = float(value) - float(base_metrics[key])
    return shifts


def rows_table(measure: str) -> str:
    """One W&B table per measure, every phase and item set in it (columns ROWS_TABLE_COLUMNS first); logged
    again at each phase, its latest version holds every phase so far."""
    return f"eval_rows/{measure}"


ROWS_TABLE_COLUMNS = ("phase", "item_set")


# -- capability guardrails --------------------------------------------------------------------------------

PERPLEXITY = "cap/perplexity"
MMLU_ACCURACY = "cap/mmlu_accuracy"
COMPLY_CORRECT_RATE = "cap/comply_correct_rate"
REFUSE_CORRECT_RATE = "cap/refuse_correct_rate"
CAPABILITY = (PERPLEXITY, MMLU_ACCURACY, COMPLY_CORRECT_RATE, REFUSE_CORRECT_RATE)

# -- the probe: projection on the base model's cautious↔eager direction -----------------------------------

# Where the residual stream is read: the answer position (last prompt token) and the mean over prompt tokens.
PROBE_POSITIONS = ("answer", "prompt_mean")
PROBE_QUANTITIES = ("projection", "shift")  # shift: phase minus base, paired per prompt


def probe_at_l_star(position: str, quantity: str) -> str:
    """The mean projection (or its shift from base) at the probe's chosen layer ℓ*, at a position."""
    return f"probe/{position}_{quantity}_lstar"


def probe_shift_at_l_star(position: str = "answer") -> str:
    return probe_at_l_star(position, "shift")


def probe_layer_plot(phase: str, column: str) -> str:
    """The layerwise line plot of one phase; column `<position>_<quantity>`."""
    return f"probe/{phase}/{column}"


# -- the analysis run -------------------------------------------------------------------------------------

ANALYSIS_FIGURES = ("forest", "asymmetry", "projection_shift", "dynamics")  # lbt.analyze.figures


def analysis_figure(name: str) -> str:
    return f"figures/{name}"


def analysis_table(name: str) -> str:
    return f"tables/{name}"


def combined_d(family: str, measure: str) -> str:
    """Summary key of the analysis run: the combined directional d of a family on a measure."""
    return f"combined_d/{family}/{measure}"
