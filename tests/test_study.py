"""lbt.study, the study's vocabulary, agrees with the config tree and with itself."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lbt import study
from tests.conftest import CONF


def test_each_arm_config_is_named_as_the_study_says_and_reads_its_frame_corpus():
    for arm in study.ARMS.values():
        cfg = OmegaConf.to_container(OmegaConf.load(CONF / "arm" / f"{arm.name}.yaml"), resolve=False)
        assert cfg["name"] == arm.name  # one name: the config file's, in folders, cards and rows too
        assert cfg["corpus"].endswith(f"corpora/{arm.corpus_file}")
    assert sorted(p.stem for p in (CONF / "arm").glob("*.yaml")) == sorted(study.STUDY_ARMS)
    assert study.STUDY_ARMS == ("plus", "minus", "neutral")
    # The corpora keep the original study's file names.
    assert study.CORPUS_NAMES == ("frame_plus", "frame_minus", "neutral")


def test_predicted_signs_oppose_and_the_reference_has_none():
    assert study.PREDICTED_SIGN == {"plus": -1, "minus": +1}
    assert study.REFERENCE_ARM == "neutral" and study.ARMS["neutral"].predicted_sign == 0
    assert study.FRAMED_ARMS == ("plus", "minus")
    assert len({arm.colour for arm in study.ARMS.values()}) == 3
    assert study.arm_colour("some_pilot_arm") == study.OTHER_COLOUR


def test_legacy_arm_names_map_to_todays_and_other_names_pass_unchanged():
    assert study.arm_name("frame_plus") == "plus" and study.arm_name("frame_minus") == "minus"
    assert [study.arm_name(a) for a in study.STUDY_ARMS] == list(study.STUDY_ARMS)
    assert study.arm_name("some_pilot_arm") == "some_pilot_arm"
    assert study.arm_name(None) is None
    assert study.arm_colour("frame_plus") == study.PLUS.colour


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
