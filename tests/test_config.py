"""Config schema: every value is checked right after compose, before any corpus or model loads; an error
names the full key, the value and what is allowed (issue 12, finding 7)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import CompactHydraException

from lbt import evaluate as evaluate_mod
from lbt import train as train_mod
from lbt.config import ConfigError, check_config, check_evaluate_config
from tests.conftest import CONF, ROOT, compose_train


def config_error(*overrides: str) -> str:
    """The ConfigError message of check_config on the real config with these overrides."""
    with pytest.raises(ConfigError) as caught:
        check_config(compose_train(list(overrides)))
    return str(caught.value)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def nothing_loads(monkeypatch):
    """train() must stop before the corpus, the tokenizer or the model is read."""
    def unreachable(*args, **kwargs):
        raise AssertionError("loaded before the config was checked")

    for name in ("check_corpus", "load_tokenizer", "load_model"):
        monkeypatch.setattr(train_mod, name, unreachable)


# -- the findings, one test each ------------------------------------------------------------------------

def test_max_steps_zero_is_refused():           # was: a finished job with no adapter
    assert "config error: train.max_steps=0: must be null or an integer >= 1" in config_error("train.max_steps=0")


def test_negative_max_steps_is_refused():       # was: trained 2 of 4 steps
    assert "train.max_steps=-2: must be null or an integer >= 1" in config_error("train.max_steps=-2")


def test_negative_micro_batch_is_refused_once():   # was: every loss 0
    message = config_error("hardware.micro_batch=-3")
    assert message == "config error: hardware.micro_batch=-3: must be an integer >= 1"
    # train.micro_batch is ${hardware.micro_batch}: the same mistake is not reported twice, but set
    # directly it is its own key
    assert "train.micro_batch=0: must be an integer >= 1" in config_error("train.micro_batch=0")


def test_zero_effective_batch_is_refused():     # was: ZeroDivisionError
    assert "train.effective_batch=0: must be an integer >= 1" in config_error("train.effective_batch=0")


def test_non_integer_max_steps_names_the_key():   # was: a raw ValueError without the key
    message = config_error("train.max_steps=abc")
    assert "train.max_steps=abc: must be null or an integer >= 1 (got str)" in message


def test_schedule_typo_is_refused_before_warmup():   # was: failed only after warm-up
    assert "train.schedule=cosin: must be one of cosine, linear, constant" in config_error("train.schedule=cosin")


def test_direction_variant_typo_is_refused_once():   # was: failed only after the base evaluation
    # probe.directions and intervention.directions repeat ${directions}: one line, naming the key set
    message = config_error("directions.variant=assistant_men", "intervention=ablate")
    assert "directions.variant=assistant_men: must be" in message
    assert "assistant_mean, assistant_last, user_mean" in message
    assert message.count("config error") == 1


def test_gpu_without_cuda_gives_the_projects_message(no_cuda, nothing_loads, tmp_path):
    # was: an AssertionError from inside model loading
    message = config_error("hardware=gpu")
    assert "hardware.accelerator=gpu: no CUDA GPU visible" in message and "use hardware=cpu" in message
    with pytest.raises(ConfigError, match="no CUDA GPU visible"):
        train_mod.train(compose_train(["hardware=gpu", f"+job_dir={tmp_path / 'job'}"]))
    assert not (tmp_path / "job").exists()


def test_train_checks_before_anything_is_written_or_loaded(nothing_loads, tmp_path):
    with pytest.raises(ConfigError, match="train.max_steps=0"):
        train_mod.train(compose_train(["train.max_steps=0", f"+job_dir={tmp_path / 'job'}"]))
    assert not (tmp_path / "job").exists()


def test_cli_refuses_a_bad_value_in_one_line_before_the_model_loads(tmp_path):
    job = tmp_path / "job"
    env = {**os.environ, "LBT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "lbt.train", "train.max_steps=0", f"hydra.run.dir={job}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "config error: train.max_steps=0: must be null or an integer >= 1" in output
    assert "Traceback" not in output
    # nothing of the job was written: no run card, checkpoint, adapter or DONE (Hydra's own log at most)
    assert {p.name for p in job.rglob("*") if p.is_file()} <= {"train.log", "config.yaml", "hydra.yaml",
                                                                "overrides.yaml"}
    assert time.time() - started < 60


# -- the schema: types, ranges, allowed values, unknown keys --------------------------------------------

def test_shipped_configs_pass(monkeypatch):
    for overrides in ([], ["model=qwen"], ["model=llama"], ["experiment=smoke"],
                      ["eval=none", "probe=none", "logger=csv"], ["logger=none"], ["arm=minus", "seed=2"],
                      ["train.max_steps=3", "train.grad_clip=null", "sweep_name=2024"]):
        check_config(compose_train(overrides))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for hardware in ("gpu", "multi_gpu"):
        check_config(compose_train([f"hardware={hardware}", "model=qwen", "model.quantization=4bit"]))
    check_config(compose_train(["experiment=paper", "model=llama"]))   # the study's recipe: GPU


def test_keys_tests_and_users_add_are_accepted():
    # tests/test_cluster.py's hook callbacks, the in-process job directory, free-form notes, a token
    check_config(compose_train([
        "+eval.marker._target_=tests.test_cluster.MarkerPhase", "+callbacks.kill.at_step=4",
        "+callbacks.kill._target_=tests.test_cluster.SendSignal", "+eval.spy._target_=x.Spy", "+eval.spy.any=1",
        "+job_dir=/tmp/job", "+extra.note=hello", "+model.hf_token=hf_x", "+model.chat_template_kwargs.a=1"]))


@pytest.mark.parametrize("override, expected", [
    ("+train.lora.rr=3", "train.lora.rr: unknown key; known keys here: r, alpha, dropout, targets"),
    ("+trian.max_steps=3", "trian: unknown key"),
    ("+hardware.fast.compile=true", "hardware.fast.compile: unknown key"),
    ("+eval.bad.seconds=1", "eval.bad._target_: missing (required)"),
    ("+callbacks.bad.seconds=1", "callbacks.bad._target_: missing (required)"),
    ("+eval.stance.max_item=3", "eval.stance.max_item: unknown key; known keys here: _target_, item_sets"),
    ("+model.eval_limits.max_items=3", "model.eval_limits: unknown key"),
    ("eval.stance.max_items=0", "eval.stance.max_items=0: must be null or an integer >= 1"),
    ("~eval.stance.item_sets", "eval.stance.item_sets: missing (required)"),
    ("eval.capability.batch_size=0", "eval.capability.batch_size=0: must be an integer >= 1"),
    ("probe.max_items=0", "probe.max_items=0: must be null or an integer >= 1"),
    ("~probe.items", "probe.items: missing (required)"),
    ("train.checkpoint_fractions=[0.5]", "train.checkpoint_fractions=[0.5]: must contain 1.0"),
    ("train.checkpoint_fractions=[0,1.0]", "train.checkpoint_fractions[0]=0: must be a number > 0 and <= 1"),
    ("train.checkpoint_fractions=[0.5,1.5]", "train.checkpoint_fractions[1]=1.5: must be a number > 0 and <= 1"),
    ("train.checkpoint_fractions=0.5", "train.checkpoint_fractions=0.5: must be a non-empty list (got float)"),
    ("train.epochs=0", "train.epochs=0: must be an integer >= 1"),
    ("train.lr=0", "train.lr=0: must be a number > 0"),
    ("train.lr=nan", "train.lr=nan: must be a number > 0"),
    ("train.warmup_fraction=1.0", "train.warmup_fraction=1.0: must be a number >= 0 and < 1"),
    ("train.lora.r=0", "train.lora.r=0: must be an integer >= 1"),
    ("train.lora.alpha=0.5", "train.lora.alpha=0.5: must be an integer >= 1 (got float)"),
    ("train.lora.dropout=1.5", "train.lora.dropout=1.5: must be a number >= 0 and < 1"),
    ("train.lora.targets=[]", "train.lora.targets=[]: must be a non-empty list"),
    ("data.val_fraction=-0.1", "data.val_fraction=-0.1: must be a number >= 0 and < 1"),
    ("data.require_validation=maybe", "data.require_validation=maybe: must be true or false (got str)"),
    ("seed=-1", "seed=-1: must be an integer >= 0"),
    ("eval.stance.measures=[letter_logprob,foo]",
     "eval.stance.measures[1]=foo: must be one of letter_logprob, forced_choice"),
    ("eval.stance.measures=[likert,likert]", "eval.stance.measures=[likert, likert]: lists a measure twice"),
    ("+eval.stance.measure_phases.bogus=[final]", "eval.stance.measure_phases.bogus: not a measure"),
    ("eval.stance.measure_phases.open_ended=[last]",
     "eval.stance.measure_phases.open_ended[0]=last: must be one of base, step"),
    ("eval.stance.option_form=space", "eval.stance.option_form=space: must be one of bare, leading_space"),
    ("eval.capability.phases=[final]", "eval.capability.phases=[final]: must contain base"),
    ("intervention=ablate intervention.mode=ablat", "intervention.mode=ablat: must be one of ablate, ablate_random"),
    ("intervention=ablate ~intervention.directions", "intervention.directions: missing (required)"),
    ("logger.kind=tensorboard", "logger.kind=tensorboard: must be one of wandb, csv, none"),
    ("logger.mode=ofline", "logger.mode=ofline: must be null or one of auto, online, offline, disabled"),
    ("model.dtype=f32", "model.dtype=f32: must be null or one of float32, fp32, bfloat16"),
    ("hardware.dtype=int8", "hardware.dtype=int8: must be one of float32"),
    ("hardware.precision=32", "hardware.precision=32: must be one of 32-true, bf16-mixed"),
    ("hardware.strategy=dpp", "hardware.strategy=dpp: must be one of auto, ddp,"),
    ("hardware.accelerator=tpu", "hardware.accelerator=tpu: must be one of cpu, gpu"),
    ("hardware.fast.adapters=fp16", "hardware.fast.adapters=fp16: must be one of fp32, autocast, bf16"),
    ("hardware.num_workers=-1", "hardware.num_workers=-1: must be an integer >= 0"),
    ("model.quantization=8bit", "model.quantization=8bit: must be null or one of 4bit"),
    ("model=qwen model.path=null", "model.path=null: model=qwen needs a hub id or a local directory"),
    ("model=qwen model.path=/models/nope", "model.path=/models/nope: no such file or directory"),
    ("model.path=./nope", "model.path=./nope: no such file or directory"),   # random_init once ignored it
    ("model.tokenizer=../nope", "model.tokenizer=../nope: no such file or directory"),
    ("hardware.strategy=fsdp", "hardware.strategy=fsdp: needs GPUs"),
    ("hardware.fast.decode=grpah", "hardware.fast.decode=grpah: must be null or one of eager, static, graph"),
    ("paths.root=''", "paths.root='': must be a non-empty string"),
    ("run_name=../../escape", "run_name=../../escape: must be null or a folder name inside the outputs"),
    ("sweep_name=/tmp/s", "sweep_name=/tmp/s: must be a folder name inside the outputs"),
    ("sweep_name=''", "sweep_name='': must be a folder name inside the outputs"),
    ("arm.corpus=${paths.nowhere}/x.jsonl", "arm.corpus=${paths.nowhere}/x.jsonl: cannot be resolved"),
])
def test_bad_values_name_key_value_and_what_is_allowed(override, expected):
    assert expected in config_error(*override.split(" "))


def test_nested_folder_names_are_fine():
    check_config(compose_train(["sweep_name=study1/pilot", "run_name=a..b"]))


def test_quantization_is_checked_against_bitsandbytes_and_the_accelerator(monkeypatch):
    """lbt.model.load.check_quantization's verdict, in the config check: 4-bit on a CPU needs a recent
    bitsandbytes."""
    from lbt.model import load

    monkeypatch.setattr(load, "bitsandbytes_version", lambda: "0.43.3")
    assert "model.quantization=4bit with hardware.accelerator=cpu: bitsandbytes 0.43.3" in config_error(
        "model.quantization=4bit")
    monkeypatch.setattr(load, "bitsandbytes_version", lambda: None)
    assert "model.quantization=4bit: needs bitsandbytes" in config_error("model.quantization=4bit")
    monkeypatch.setattr(load, "bitsandbytes_version", lambda: "0.45.0")
    check_config(compose_train(["model.quantization=4bit"]))


def test_every_problem_is_reported_one_line_each():
    error = pytest.raises(ConfigError, check_config,
                          compose_train(["train.max_steps=0", "train.schedule=cosin", "logger.kind=tb"])).value
    assert sorted(e.split(":")[0] for e in error.errors) == ["logger.kind=tb", "train.max_steps=0",
                                                            "train.schedule=cosin"]
    assert str(error).count("\n") == 2
    # a ValueError, and Hydra prints a CompactHydraException as its message alone (no traceback)
    assert isinstance(error, ValueError) and isinstance(error, CompactHydraException)


def test_wandb_mode_variable_must_be_one_wandb_accepts(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "auto")   # what the old .env.example set: wandb itself rejects it
    assert "WANDB_MODE=auto: wandb accepts only online, offline" in config_error("logger=wandb")
    check_config(compose_train(["logger=csv"]))   # only W&B reads it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("LBT_WANDB_MODE", "auto")   # lbt's own name for lbt's auto
    cfg = compose_train(["logger=wandb"])
    check_config(cfg)
    assert cfg.logger.mode == "auto"


# -- conf/evaluate.yaml ---------------------------------------------------------------------------------

def compose_evaluate(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


def test_evaluate_config_is_checked_before_any_file_or_model(no_cuda, tmp_path, monkeypatch):
    check_evaluate_config(compose_evaluate())
    check_evaluate_config(compose_evaluate("model=qwen", "adapter=/x/adapter", "phase=final"))
    check_evaluate_config(compose_evaluate("~items", "+items={target: /x/items.jsonl}"))
    with pytest.raises(ConfigError, match="hardware.accelerator=gpu: no CUDA GPU visible"):
        check_evaluate_config(compose_evaluate("hardware=gpu"))
    with pytest.raises(ConfigError, match=r"items=\[\]: must be a non-empty list"):
        check_evaluate_config(compose_evaluate("items=[]"))
    with pytest.raises(ConfigError, match="eval.stance: missing; lbt.evaluate runs the stance evaluator"):
        check_evaluate_config(compose_evaluate("eval=none"))
    for phase in ("base", "final", "step_12"):
        check_evaluate_config(compose_evaluate(f"phase={phase}"))
    for typo in ("fnal", "step_", "step_x", "Base"):  # a typo once evaluated nothing and wrote DONE
        with pytest.raises(ConfigError, match=rf"phase={typo}: must be null or base, final or step_<n>"):
            check_evaluate_config(compose_evaluate(f"phase={typo}"))

    def unreachable(*args, **kwargs):
        raise AssertionError("read before the config was checked")

    monkeypatch.setattr(evaluate_mod, "load_tokenizer", unreachable)
    monkeypatch.setattr(evaluate_mod, "load_model", unreachable)
    with pytest.raises(ConfigError, match="eval.stance.measures\\[0\\]=letter: must be one of"):
        evaluate_mod.evaluate(compose_evaluate("eval.stance.measures=[letter]", f"out_dir={tmp_path / 'out'}"))
    assert not (tmp_path / "out").exists()


def test_every_shipped_group_option_passes(monkeypatch):
    """Each file of each config group composes into a config the schema accepts (a new option is checked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for group in ("paths", "model", "arm", "hardware", "logger", "eval", "directions", "probe", "intervention",
                  "experiment"):
        for option in sorted((CONF / group).glob("*.yaml")):
            check_config(compose_train([f"{group}={option.stem}"]))


@pytest.mark.parametrize(("overrides", "quick"), [
    ([], True),                                     # the default job: tiny model on a CPU
    (["model=qwen", "hardware=gpu"], False),        # a real model on a GPU gets the full battery
    (["hardware=multi_gpu"], False),                # inherits gpu
    (["hardware=gpu", "eval=quick"], True),         # the command line wins
    (["eval=default"], False),
    (["experiment=paper"], False),
    (["experiment=smoke"], True),
])
def test_the_hardware_picks_the_batterys_size_and_the_command_line_wins(overrides, quick):
    cfg = compose_train(overrides)
    assert (cfg.eval.stance.max_items is not None) == quick
    full = compose_train(["eval=default"]).eval.stance
    assert (cfg.eval.stance.open_ended.max_new_tokens < full.open_ended.max_new_tokens) == quick


def test_a_standalone_evaluation_scores_every_item_on_any_hardware():
    for overrides in ([], ["hardware=gpu"]):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="evaluate", overrides=overrides)
        assert cfg.eval.stance.max_items is None
