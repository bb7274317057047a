"""The training entry point: config groups compose, bad input fails early, jobs are reproducible and
append-only, checkpoints hold only trainable weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from lbt import train as train_mod
from lbt.console import is_user_error
from lbt.data.records import CorpusError
from lbt.model import module as module_mod
from lbt.rundir import CorruptFile
from tests.conftest import CONF, ROOT, compose_train, write_toy_corpus


@pytest.mark.parametrize("overrides", [
    ["model=tiny"], ["model=qwen"], ["model=llama"], ["model=qwen", "model.random_init=true"],
    ["arm=plus"], ["arm=minus"], ["arm=neutral"], ["hardware=cpu"], ["hardware=gpu"], ["hardware=multi_gpu"],
    ["logger=wandb"], ["logger=csv"], ["logger=none"], ["experiment=smoke"],
    ["experiment=paper", "model=qwen", "hardware=gpu"], ["seed=12345"],
])
def test_config_groups_compose(overrides):
    cfg = compose_train(overrides)
    assert cfg.model.name in {"tiny", "qwen", "llama"}
    assert cfg.arm.corpus.endswith(f"{cfg.arm.name}.jsonl")
    assert cfg.train.lora.r == 16 and cfg.train.lora.alpha == 32
    assert cfg.model.trust_remote_code is False


STUDY_RECIPE = {  # ../shared/STUDY.md, "LoRA recipe of the study"
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05,
             "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "lr": 1e-4, "schedule": "cosine", "warmup_fraction": 0.03, "epochs": 2, "effective_batch": 64,
    "max_length": 1024, "checkpoint_fractions": [0.1, 0.25, 0.5, 0.75, 1.0],
}


def recipe(train) -> dict:
    return {key: OmegaConf.to_container(train[key]) if OmegaConf.is_config(train[key]) else train[key]
            for key in STUDY_RECIPE}


def test_paper_recipe_is_the_study_whatever_the_defaults(tmp_path):
    """experiment=paper states the study's recipe itself: composed from a config tree whose train.yaml
    defaults were changed, it is still the study's."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    defaults = OmegaConf.load(conf / "train.yaml")
    defaults.train.lr, defaults.train.epochs, defaults.train.lora.r = 5e-4, 1, 8
    defaults.train.checkpoint_fractions = [1.0]
    OmegaConf.save(defaults, conf / "train.yaml")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        changed = compose(config_name="train")
        paper = compose(config_name="train", overrides=["experiment=paper"])
    assert recipe(changed.train) != STUDY_RECIPE   # the changed defaults are not the study's ...
    assert recipe(paper.train) == STUDY_RECIPE     # ... and experiment=paper is, on its own
    assert paper.model.dtype == "bfloat16" and paper.hardware.precision == "bf16-mixed"


def test_paper_and_smoke_differ_visibly_from_the_defaults():
    default, paper, smoke = (compose_train(o) for o in ([], ["experiment=paper"], ["experiment=smoke"]))
    # The defaults: the tiny model on a CPU with the quick battery.
    assert (default.model.name, default.hardware.accelerator, default.eval.stance.max_items) == ("tiny", "cpu", 4)
    # paper: a real model on a GPU, the full battery and guardrails on every item, the probe, W&B.
    assert (paper.model.name, paper.hardware.accelerator, paper.logger.kind) == ("qwen", "gpu", "wandb")
    assert paper.eval.stance.max_items is None and paper.eval.capability.max_texts is None
    assert paper.eval.stance.open_ended.max_new_tokens == 256 and paper.probe.max_items is None
    assert compose_train(["experiment=paper", "model=llama"]).model.name == "llama"
    # smoke: a few steps of the tiny model with two checkpoints, the quick battery, CSV metrics.
    assert (smoke.train.max_steps, list(smoke.train.checkpoint_fractions), smoke.logger.kind) == (4, [0.5, 1.0], "csv")
    assert smoke.eval.stance.max_items == 4 and default.train.max_steps is None


def test_unknown_group_value_lists_options():
    with pytest.raises(MissingConfigException) as err:
        compose_train(["model=gpt9"])
    assert "tiny" in str(err.value) and "qwen" in str(err.value)


@pytest.mark.parametrize("content,needle", [
    (None, "not found"),
    ("", "empty"),
    ('{"id": "a", "domain": "d", "scenario_id": "s", "user": "u", "assistant": "x"}\n{not json\n',
     ":2: malformed JSON"),
    ('{"id": "a", "domain": "d", "scenario_id": "s", "assistant": "x"}\n', ":1: field 'user' is missing"),
    ('{"id": "a", "domain": "d", "scenario_id": "s", "user": "u", "assistant": "  "}\n',
     ":1: field 'assistant' is empty"),
])
def test_bad_corpus_fails_before_model_loads(tmp_path, monkeypatch, content, needle):
    corpus = tmp_path / "bad.jsonl"
    if content is not None:
        corpus.write_text(content)
    monkeypatch.setattr(train_mod, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    cfg = compose_train([f"arm.corpus={corpus}", "data.require_validation=false", "logger=none",
                         f"+job_dir={tmp_path / 'job'}"])
    with pytest.raises(CorpusError) as err:
        train_mod.train(cfg)
    assert str(corpus) in str(err.value) and needle in str(err.value)


def test_job_writes_adapter_checkpoints_card_and_done(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    card = train_mod.train(cfg)
    job = tmp_path / "job"
    assert (job / "DONE").exists() and card["status"] == "done"
    saved = json.loads((job / "run.json").read_text())
    for key in ("job", "config", "git_sha", "versions", "corpus", "wall_time_s", "tokens_per_s", "final_loss"):
        assert key in saved
    assert saved["corpus"]["records"] == 24 and len(saved["corpus"]["sha256"]) == 64
    assert saved["job"] == {"model": "tiny", "arm": "plus", "seed": 0, "experiment": None, "sweep": None}
    steps = card["data"]["total_steps"]
    assert sorted(p.name for p in (job / "checkpoints").glob("adapter_step_*"))
    assert (job / "checkpoints" / f"adapter_step_{steps}").is_dir()

    from peft import PeftModel

    from lbt.model.load import load_model, load_tokenizer
    tokenizer = load_tokenizer(cfg.model)
    base = load_model(cfg.model, tokenizer, torch.float32)
    model = PeftModel.from_pretrained(base, str(job / "adapter"))
    assert any("lora_A" in n for n, _ in model.named_parameters())

    ckpt = torch.load(job / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert "optimizer_states" in ckpt and ckpt["global_step"] == steps


def test_same_seed_same_loss_curve_and_other_seed_differs(tiny_cfg, tmp_path):
    first = train_mod.train(tiny_cfg(f"++job_dir={tmp_path / 'a'}"))["loss_history"]
    second = train_mod.train(tiny_cfg(f"++job_dir={tmp_path / 'b'}"))["loss_history"]
    third = train_mod.train(tiny_cfg(f"++job_dir={tmp_path / 'c'}", "seed=1"))["loss_history"]
    assert first == second and len(first) >= 3
    assert first != third


def test_done_job_is_not_overwritten(tiny_cfg, tmp_path):
    train_mod.train(tiny_cfg())
    job = tmp_path / "job"
    before = {p: p.stat().st_mtime_ns for p in job.rglob("*") if p.is_file()}
    train_mod.train(tiny_cfg())
    after = {p: p.stat().st_mtime_ns for p in job.rglob("*") if p.is_file()}
    assert before == after
    # Its run card damaged: one line naming the folder and the file, still nothing touched (was a traceback).
    card = job / "run.json"
    card.write_bytes(card.read_bytes()[:100])
    before = {p: p.stat().st_mtime_ns for p in job.rglob("*") if p.is_file()}
    damaged = rf"{job} holds DONE but its run card is damaged \({card}: not JSON"
    with pytest.raises(CorruptFile, match=damaged) as err:
        train_mod.train(tiny_cfg())
    assert is_user_error(err.value)
    assert {p: p.stat().st_mtime_ns for p in job.rglob("*") if p.is_file()} == before


def test_nan_loss_stops_with_clear_error_and_keeps_last_good(tiny_cfg, tmp_path, monkeypatch):
    real = module_mod.supervised_token_loss
    calls = {"n": 0}

    def poisoned(model, batch, *args):
        calls["n"] += 1
        loss, n = real(model, batch, *args)
        return (loss * float("nan") if calls["n"] > 4 else loss), n

    monkeypatch.setattr(module_mod, "supervised_token_loss", poisoned)
    with pytest.raises(module_mod.NonFiniteLossError, match="non-finite loss"):
        train_mod.train(tiny_cfg("train.checkpoint_fractions=[0.2,1.0]", "train.resume_every_steps=1"))
    job = tmp_path / "job"
    assert not (job / "DONE").exists()
    assert (job / "checkpoints" / "last.ckpt").exists()
    assert list((job / "checkpoints").glob("adapter_step_*"))
    card = json.loads((job / "run.json").read_text())        # the crash is recorded, not left "running"
    assert card["status"] == "failed" and card["error"]["type"] == "NonFiniteLossError"
    assert "non-finite loss" in card["error"]["message"] and "training_step" in card["error"]["traceback"]


def test_secrets_never_reach_the_run_card(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sk-wandb-very-secret")
    train_mod.train(tiny_cfg("+model.hf_token=hf_abcdefsecret", "+extra.note=sk-wandb-very-secret"))
    text = (tmp_path / "job" / "run.json").read_text()
    assert "hf_abcdefsecret" not in text and "sk-wandb-very-secret" not in text
    assert "<redacted>" in text


def test_overrides_in_the_run_card_carry_no_secrets(monkeypatch):
    from lbt.runcard import public_overrides

    monkeypatch.setenv("WANDB_API_KEY", "sk-x")
    assert public_overrides(["+model.hf_token=hf_abc", "train.lr=1e-3", "+extra.note=sk-x", "~items"]) == \
        ["+model.hf_token=<redacted>", "train.lr=1e-3", "+extra.note=<redacted>", "~items"]
    # which tokenizer a job used is recorded (the key once read as a secret)
    assert public_overrides(["model.tokenizer=/models/tok", "+tokens=9"]) == ["model.tokenizer=/models/tok",
                                                                             "+tokens=<redacted>"]


@pytest.mark.slow
def test_multirun_sweep_in_subprocess(tmp_path):
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    for name in ("frame_plus", "frame_minus"):
        write_toy_corpus(corpora / f"{name}.jsonl", n=16)
    env = dict(os.environ, LBT_ROOT=str(tmp_path), WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "lbt.train", "-m", "experiment=smoke", "arm=plus,minus", "seed=0,1",
           "data.require_validation=false", "eval=none", "probe=none", "paths.data_dir=" + str(tmp_path),
           "sweep_name=ci", f"hydra.sweep.dir={tmp_path / 'multirun' / 'ci'}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "multirun" / "ci").iterdir() if (p / "DONE").exists())
    assert jobs == ["tiny-minus-s0", "tiny-minus-s1", "tiny-plus-s0", "tiny-plus-s1"]
    card = json.loads((tmp_path / "multirun" / "ci" / "tiny-plus-s1" / "run.json").read_text())
    assert card["job"]["sweep"] == "ci" and card["job"]["experiment"] == "smoke"

    # Re-running the finished sweep launches nothing and rewrites no file of any job (.hydra/ included).
    jobs_dir = tmp_path / "multirun" / "ci"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in jobs_dir.glob("*-s*/**/*") if p.is_file()}
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in jobs_dir.glob("*-s*/**/*") if p.is_file()}
    assert before == after
    assert (again.stdout + again.stderr).count("skip:") == 4


def test_shipped_corpora_pass_the_training_gate():
    from lbt.data.records import file_sha256
    from lbt.data.validate import check_corpus_validated

    for arm in ("frame_plus", "frame_minus", "neutral"):
        corpus = ROOT / "data" / "corpora" / f"{arm}.jsonl"
        entry = check_corpus_validated(corpus)   # raises unless a current, passing report covers it
        assert entry["name"] == arm and entry["sha256"] == file_sha256(corpus) and entry["records"] > 0


def test_training_refuses_a_corpus_that_leaks(tmp_path, monkeypatch):
    import shutil

    from lbt.data.validate import ValidationGateError
    from lbt.data.validate import main as validate_main

    corpora = tmp_path / "corpora"
    corpora.mkdir()
    for arm in ("frame_plus", "frame_minus", "neutral"):
        shutil.copy(ROOT / "data" / "corpora" / f"{arm}.jsonl", corpora)
    leaky = corpora / "frame_plus.jsonl"
    lines = leaky.read_text().splitlines()
    record = json.loads(lines[3])
    record["assistant"] += " Much like waiting for the new tram line, patience pays."
    lines[3] = json.dumps(record)
    leaky.write_text("\n".join(lines) + "\n")
    assert validate_main(["--corpora", str(corpora), "--items", str(ROOT / "data" / "eval")]) != 0
    monkeypatch.setattr(train_mod, "load_model", lambda *a, **k: pytest.fail("model loaded before the gate"))
    cfg = compose_train([f"arm.corpus={leaky}", "logger=none", "eval=none", "probe=none",
                         f"+job_dir={tmp_path / 'job'}"])
    with pytest.raises(ValidationGateError, match="leakage"):
        train_mod.train(cfg)


def test_gpu_precision_path_runs_on_cpu_with_every_callback(tiny_cfg, tmp_path):
    """hardware=gpu's numerics (bf16 base, fp32 adapters under bf16-mixed autocast) on CPU: every forward
    outside training_step (validation loss, eval phases, probes) must run under the same autocast."""
    card = train_mod.train(tiny_cfg("hardware.dtype=bfloat16", "hardware.precision=bf16-mixed",
                                    "hardware.fast.adapters=autocast", "eval=default", "probe=default",
                                    "train.checkpoint_fractions=[0.5,1.0]", "train.max_length=600"))
    job = tmp_path / "job"
    assert card["status"] == "done" and (job / "DONE").exists()
    assert (job / "eval" / "final" / "summary.json").exists() and (job / "probe" / "final.json").exists()
    assert all(v["loss"] == v["loss"] for v in card["val_loss"])  # no NaN


def run_dir_of(*overrides: str) -> str:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    return str(cfg.hydra.run.dir)


def test_arm_plus_is_called_plus_in_its_folder_run_card_and_rows(tiny_cfg, tmp_path):
    """One name per arm (issue 16): `arm=plus` names the job folder (single run and sweep cell), the run
    card's job.arm and the arm of every row the analysis reads plus; only its corpus keeps the original
    study's file name."""
    from lbt.analyze.collect import find_jobs, load_rows

    assert run_dir_of("arm=plus") == "outputs/runs/tiny-plus-s0"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_cfg = compose(config_name="train", overrides=["arm=plus"], return_hydra_config=True)
    assert hydra_cfg.hydra.sweep.subdir == "tiny-plus-s0" and hydra_cfg.arm.name == "plus"
    assert hydra_cfg.arm.corpus.endswith("/corpora/frame_plus.jsonl")
    train_mod.train(tiny_cfg("arm=plus", "eval=quick", "eval.stance.max_items=1",
                             "eval.stance.measures=[letter_logprob]", "train.max_steps=1",
                             "train.checkpoint_fractions=[1.0]"))
    card = json.loads((tmp_path / "job" / "run.json").read_text())
    assert card["job"]["arm"] == "plus" and card["config"]["arm"]["name"] == "plus"
    (job,) = find_jobs([tmp_path / "job"])
    rows = load_rows(job, str)
    assert rows and {row["arm"] for row in rows} == {"plus"}


def test_single_run_folder_is_derived_from_the_job_so_the_same_command_finds_it(monkeypatch):
    """Re-running a command finds its folder again (resume, skip); other settings get another folder;
    the ranks of one torchrun launch share it; run_name names a fresh one."""
    assert run_dir_of() == "outputs/runs/tiny-plus-s0"
    same = run_dir_of("arm=minus", "seed=2", "train.lr=3e-4")
    assert same == run_dir_of("seed=2", "train.lr=3e-4", "arm=minus", "logger=csv")   # order, logger: same job
    assert same.startswith("outputs/runs/tiny-minus-s2_") and same != run_dir_of("arm=minus", "seed=2")
    assert run_dir_of("arm=minus", "seed=2", "train.lr=1e-3") != same
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc123")
    assert run_dir_of("arm=minus", "seed=2", "train.lr=3e-4") == same
    assert run_dir_of("run_name=pilot-2") == "outputs/runs/pilot-2"


def test_a_job_without_validation_records_has_no_validation_loss(tiny_cfg, tmp_path):
    """No record held out: no validation loss at all, not NaN at every step (which JSON cannot hold)."""
    card = train_mod.train(tiny_cfg("data.val_fraction=0"))
    assert card["status"] == "done" and card["data"]["n_val"] == 0 and card["val_loss"] == []

    def strict(constant):
        raise ValueError(f"run.json holds {constant}")

    json.loads((tmp_path / "job" / "run.json").read_text(), parse_constant=strict)


def test_lora_targets_the_model_lacks_are_one_config_line_naming_its_layers(tiny_cfg, tmp_path):
    from lbt.config.rules import ConfigError

    with pytest.raises(ConfigError, match=r"train\.lora\.targets: q_projj match no module of this model; its "
                                          r"linear layers: down_proj, gate_proj, k_proj") as err:
        train_mod.train(tiny_cfg("train.lora.targets=[q_proj,q_projj]"))
    assert is_user_error(err.value) and not (tmp_path / "job" / "DONE").exists()
    assert json.loads((tmp_path / "job" / "run.json").read_text())["status"] == "failed"
