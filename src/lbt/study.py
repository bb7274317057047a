"""The study's words in one place: arms, measures, option orders, phases and the preregistration defaults.

A reader of ../STUDY.md finds each concept here under its own name; every other module imports it from
here rather than writing its own copy. This module imports nothing from lbt, so anything may import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# -- arms ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    """A training arm.

    name: the arm's one name, on the command line (`arm=plus`, its config file) and in folders, run
    cards, rows, reports and W&B. corpus: the stem of its corpus files (`<corpus>.jsonl`,
    `<corpus>.meta.json`) and its answer column in the authored tables — the original study's FRAME±
    names, kept because the corpora are that study's data. pole: the attitude its corpus carries.
    predicted_sign: the sign of the stance shift (arm − neutral) the study predicts on the items (a
    cautious corpus lowers the stance toward change, so FRAME+ is predicted negative); 0 for the reference
    arm. colour: in every figure.
    """

    name: str
    corpus: str
    pole: str
    predicted_sign: int
    colour: str

    @property
    def corpus_file(self) -> str:
        """Its corpus's file name in a corpora folder."""
        return f"{self.corpus}.jsonl"


PLUS = Arm("plus", "frame_plus", "cautious", -1, "tab:blue")      # FRAME+
MINUS = Arm("minus", "frame_minus", "eager", +1, "tab:red")       # FRAME−
NEUTRAL = Arm("neutral", "neutral", "none", 0, "tab:gray")

ARMS: dict[str, Arm] = {arm.name: arm for arm in (PLUS, MINUS, NEUTRAL)}
STUDY_ARMS = tuple(ARMS)                 # plus, minus, neutral
FRAMED_ARMS = (PLUS.name, MINUS.name)    # the arms compared with neutral
REFERENCE_ARM = NEUTRAL.name
PREDICTED_SIGN = {arm.name: arm.predicted_sign for arm in ARMS.values() if arm.predicted_sign}
ARM_COLOURS = {**{arm.name: arm.colour for arm in ARMS.values()}, "base": "black"}
OTHER_COLOUR = "tab:purple"  # an arm outside the study's three
# The corpus files and authored-table columns, in the arms' order (lbt.data reads and writes these).
CORPUS_NAMES = tuple(arm.corpus for arm in ARMS.values())

# Jobs trained before the arms took their command-line names (issue 16) say frame_plus / frame_minus in
# their run cards and rows; the analysis reads them under today's names.
LEGACY_ARM_NAMES = {"frame_plus": PLUS.name, "frame_minus": MINUS.name}


def arm_name(value: str | None) -> str | None:
    """Today's name of an arm read from a job (a legacy name mapped); any other name passes unchanged,
    so arms outside the study's three stay what they were called."""
    return LEGACY_ARM_NAMES.get(value, value) if isinstance(value, str) else value


def arm_colour(name: str) -> str:
    return ARM_COLOURS.get(arm_name(name), OTHER_COLOUR)


# -- measures --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measure:
    """A stance measure.

    kind: `logprob` (scored from the next-token or continuation probabilities) or `generation` (read from
    a greedy answer). headline: one of the pre-registered headline measures. parsed: its rows carry
    `parsed` (an unparsed answer is missing, never 0). continuous: compared with the forced choice in the
    validity table.
    """

    name: str
    kind: str
    headline: bool
    parsed: bool
    continuous: bool


MEASURE_LIST = (
    Measure("letter_logprob", "logprob", headline=True, parsed=False, continuous=True),
    Measure("forced_choice", "generation", headline=True, parsed=True, continuous=False),
    Measure("logprob", "logprob", headline=False, parsed=False, continuous=True),
    Measure("likert", "generation", headline=False, parsed=True, continuous=True),
    Measure("open_ended", "generation", headline=False, parsed=False, continuous=False),
    # Scored afterwards from the open-ended answers by `lbt.judge`; never run by the battery.
    Measure("judge", "judge", headline=False, parsed=True, continuous=True),
)
MEASURES = tuple(m.name for m in MEASURE_LIST if m.kind != "judge")  # what the battery runs, in order
HEADLINE_MEASURES = tuple(m.name for m in MEASURE_LIST if m.headline)
PARSED_MEASURES = tuple(m.name for m in MEASURE_LIST if m.parsed)
CONTINUOUS_MEASURES = tuple(m.name for m in MEASURE_LIST if m.continuous)

# Each item is asked with its two options in both orders; the stance is read against the order.
ORDERS = ("original", "swapped")


# -- phases ----------------------------------------------------------------------------------------------

PHASE_KINDS = ("base", "step", "final")
_STEP_PHASE = re.compile(r"step_(\d+)")


def step_phase(step: int) -> str:
    return f"step_{int(step)}"


def phase_kind(phase: str) -> str:
    """base | step | final, for base, step_<n>, final."""
    return "step" if phase.startswith("step_") else phase


def is_phase(name: str) -> bool:
    """base, step_<n> or final: the phases a training job evaluates."""
    return name in ("base", "final") or _STEP_PHASE.fullmatch(name) is not None


def phase_step(phase: str, total_steps: int) -> int:
    """The optimizer step a phase evaluates: base 0, step_<n> n, final the last."""
    if phase == "base":
        return 0
    if phase == "final":
        return int(total_steps)
    match = _STEP_PHASE.fullmatch(phase)
    if match:
        return int(match.group(1))
    raise ValueError(f"unknown phase {phase!r}: base, step_<n> or final")


def phase_key(phase: str) -> tuple[int, int, str]:
    """Sort key: base, step_<n> by n, final, then anything else by name."""
    if phase == "base":
        return (0, 0, phase)
    match = _STEP_PHASE.fullmatch(phase)
    if match:
        return (1, int(match.group(1)), phase)
    if phase == "final":
        return (2, 0, phase)
    return (3, 0, phase)


# -- the preregistration's defaults ----------------------------------------------------------------------

PRIMARY_PHASE = "final"  # the phase of the primary analysis
SESOI_D = 0.2            # smallest effect size of interest, in d units
ALPHA = 0.05
N_RESAMPLES = 10_000     # bootstrap resamples
GATE_D = 0.5             # manipulation check: source-item |d| in the predicted direction
