"""The process-wide evaluation settings of `hardware.fast` (lbt.fast_settings): each keeps its value until
set again, None restores its default, a value outside a setting's choices is refused, and
`apply_fast_settings` sets all six from a job's `hardware.fast`."""

import pytest

from lbt.eval.battery import POOL_MEASURES, apply_fast_settings
from lbt.eval.decode import DECODE, decode_mode
from lbt.eval.prefix import SHARE_PREFIX
from lbt.fast_settings import FastSetting
from lbt.model.fused_norm import FUSED_NORM
from lbt.model.gqa import SDPA_GQA
from lbt.model.lora import ADDMM_LORA
from tests.conftest import compose_train

ALL = (DECODE, SHARE_PREFIX, POOL_MEASURES, FUSED_NORM, SDPA_GQA, ADDMM_LORA)


def test_a_switch_reads_any_value_as_a_bool_and_none_as_its_default():
    switch = FastSetting("lever", True)
    assert switch.get() is True
    switch.set(0)
    assert switch.get() is False
    switch.set("yes")
    assert switch.get() is True
    switch.set(False)
    switch.set(None)
    assert switch.get() is True


def test_a_setting_with_choices_refuses_others_naming_the_key_and_the_choices():
    mode = FastSetting("decode", "eager", ("eager", "static", "graph"))
    mode.set("graph")
    assert mode.get() == "graph"
    with pytest.raises(ValueError, match=r"decode='grpah': use one of \['eager', 'static', 'graph'\]"):
        mode.set("grpah")
    assert mode.get() == "graph"  # a refused value changes nothing
    mode.set(None)
    assert mode.get() == "eager"


def test_every_setting_is_a_key_of_hardware_fast():
    fast = compose_train(["hardware=gpu"]).hardware.fast
    assert all(setting.key in fast for setting in ALL)
    assert len({setting.key for setting in ALL}) == len(ALL)


def test_apply_sets_all_six_from_a_job_and_an_empty_mapping_restores_the_defaults():
    gpu = compose_train(["hardware=gpu"]).hardware.fast
    apply_fast_settings(gpu)
    assert {s.key: s.get() for s in ALL} == {s.key: gpu[s.key] for s in ALL}
    assert DECODE.get() == "graph" and SHARE_PREFIX.get() and FUSED_NORM.get() and SDPA_GQA.get()
    apply_fast_settings({})
    assert {s.key: s.get() for s in ALL} == {s.key: s.default for s in ALL}
    assert not FUSED_NORM.get() and POOL_MEASURES.get() and DECODE.get() == "eager"


def test_apply_reaches_each_setting_away_from_its_default():
    others = {"decode": "static", "share_prefix": True, "pool_measures": False, "fused_norm": True,
              "sdpa_gqa": True, "addmm_lora": True}
    apply_fast_settings(others)
    assert {s.key: s.get() for s in ALL} == others


def test_a_mistyped_decode_mode_is_refused_before_any_scoring():
    with pytest.raises(ValueError, match="decode='fast'"):
        apply_fast_settings({"decode": "fast"})


def test_the_decode_setting_is_what_generation_runs_when_the_engine_names_none(tiny_eval):
    model, _ = tiny_eval
    assert decode_mode(model) == "eager"
    DECODE.set("static")
    assert decode_mode(model) == "static"
    assert decode_mode(model, "eager") == "eager"  # an engine's own mode wins
