"""lbt.study, the study's vocabulary, agrees with the config tree and with itself."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lbt import study
from tests.conftest import CONF


def test_each_arm_config_is_named_and_aliased_as_the_study_says():
    for arm in study.ARMS.values():
        cfg = OmegaConf.to_container(OmegaConf.load(CONF / "arm" / f"{arm.alias}.yaml"), resolve=False)
        assert cfg["name"] == arm.name
        assert cfg["corpus"].endswith(f"corpora/{arm.name}.jsonl")
    assert sorted(p.stem for p in (CONF / "arm").glob("*.yaml")) == sorted(a.alias for a in study.ARMS.values())


def test_predicted_signs_oppose_and_the_reference_has_none():
    assert study.PREDICTED_SIGN == {"frame_plus": -1, "frame_minus": +1}
    assert study.REFERENCE_ARM == "neutral" and study.ARMS["neutral"].predicted_sign == 0
    assert study.FRAMED_ARMS == ("frame_plus", "frame_minus")
    assert len({arm.colour for arm in study.ARMS.values()}) == 3
    assert study.arm_colour("some_pilot_arm") == study.OTHER_COLOUR


def test_arm_by_alias_takes_either_name_and_names_the_choices():
    assert study.arm_by_alias("plus") is study.FRAME_PLUS
    assert study.arm_by_alias("frame_minus") is study.FRAME_MINUS
    with pytest.raises(KeyError, match="plus, minus, neutral"):
        study.arm_by_alias("plsu")


def test_measures_the_battery_runs_are_the_default_eval_measures():
    assert list(study.MEASURES) == list(OmegaConf.load(CONF / "eval" / "default.yaml").stance.measures)
    assert study.HEADLINE_MEASURES == ("letter_logprob", "forced_choice")
    assert "judge" not in study.MEASURES and "judge" in study.PARSED_MEASURES
    assert set(study.CONTINUOUS_MEASURES) == {"letter_logprob", "logprob", "likert", "judge"}
    assert study.ORDERS == ("original", "swapped")


@pytest.mark.parametrize(("phase", "kind", "step"), [("base", "base", 0), ("step_12", "step", 12),
                                                     ("final", "final", 90)])
def test_phase_names_kinds_and_steps(phase, kind, step):
    assert study.is_phase(phase) and study.phase_kind(phase) == kind
    assert study.phase_step(phase, total_steps=90) == step


def test_phases_sort_by_step_and_strangers_are_no_phases():
    names = ["final", "step_10", "base", "step_2", "notes"]
    assert sorted(names, key=study.phase_key) == ["base", "step_2", "step_10", "final", "notes"]
    assert not study.is_phase("notes") and not study.is_phase("step_x")
    with pytest.raises(ValueError, match="unknown phase 'step_x'"):
        study.phase_step("step_x", 10)
    assert study.step_phase(7) == "step_7"
