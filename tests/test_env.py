""".env and environment variables: `.env.example` works when copied verbatim, empty means unset, the shell
wins (issue 12, finding 8)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dotenv import dotenv_values
from omegaconf import OmegaConf

from lbt.env import load_env
from tests.conftest import CONF, ROOT, compose_train, write_toy_corpus

EXAMPLE = ROOT / ".env.example"
EXAMPLE_NAMES = list(dotenv_values(EXAMPLE))


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No variable of .env.example (nor W&B's mode) set, and an empty working directory."""
    for name in [*EXAMPLE_NAMES, "WANDB_MODE", "LBT_WANDB_MODE", "LBT_ROOT"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_load_env_sets_values_skips_empty_and_never_overrides(clean_env, monkeypatch):
    (clean_env / ".env").write_text("LBT_LLM_MODEL='from-dotenv'\nHF_HOME=\nWANDB_PROJECT=p\nexport LBT_GPUS=0,1\n")
    monkeypatch.setenv("WANDB_PROJECT", "from-shell")
    loaded = load_env()
    assert os.environ["LBT_LLM_MODEL"] == "from-dotenv" and os.environ["LBT_GPUS"] == "0,1"
    assert "HF_HOME" not in os.environ                      # empty in .env: left unset
    assert os.environ["WANDB_PROJECT"] == "from-shell"       # the shell wins
    assert set(loaded) == {"LBT_LLM_MODEL", "LBT_GPUS"}


def test_load_env_reads_lbt_root_after_the_working_directory(clean_env, tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("root")
    (root / ".env").write_text("LBT_LLM_MODEL=from-root\nLBT_LLM_API_KEY=k\n")
    (clean_env / ".env").write_text(f"LBT_ROOT={root}\nLBT_LLM_MODEL=from-cwd\n")
    load_env()
    assert (os.environ["LBT_LLM_MODEL"], os.environ["LBT_LLM_API_KEY"]) == ("from-cwd", "k")


def test_empty_variables_of_lbt_wandb_and_hf_behave_as_unset(clean_env, monkeypatch):
    for name in ("HF_HOME", "HF_HUB_OFFLINE", "WANDB_ENTITY", "LBT_ROOT", "LBT_SLURM_PARTITION"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("OTHER_TOOL_SETTING", "")
    load_env()
    assert not {"HF_HOME", "HF_HUB_OFFLINE", "WANDB_ENTITY", "LBT_ROOT", "LBT_SLURM_PARTITION"} & set(os.environ)
    assert os.environ["OTHER_TOOL_SETTING"] == ""            # not lbt's to touch


def test_config_reads_an_empty_variable_as_unset(monkeypatch):
    for name in ("LBT_ROOT", "WANDB_PROJECT", "WANDB_ENTITY", "LBT_WANDB_MODE", "WANDB_MODE"):
        monkeypatch.setenv(name, "")   # set after load_env: the resolver itself treats "" as unset
    cfg = compose_train(["logger=wandb"])
    assert cfg.paths.root == "." and cfg.arm.corpus == "./data/corpora/frame_plus.jsonl"
    assert (cfg.logger.project, cfg.logger.entity, cfg.logger.mode) == ("lbt", None, "auto")
    monkeypatch.setenv("LBT_ROOT", "/somewhere")
    monkeypatch.setenv("WANDB_MODE", "offline")      # wandb's own variable still sets logger.mode
    cfg = compose_train(["logger=wandb"])
    assert cfg.paths.root == "/somewhere" and cfg.logger.mode == "offline"
    monkeypatch.setenv("LBT_WANDB_MODE", "disabled")  # lbt's name wins
    assert compose_train(["logger=wandb"]).logger.mode == "disabled"


def test_a_bad_value_from_the_environment_names_the_variable(monkeypatch):
    from lbt.config import ConfigError, check_config

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("LBT_WANDB_MODE", "ofline")   # a .env line mistyped: the variable is what to fix
    named = r"logger\.mode=ofline: must be .* \(set by the environment variable LBT_WANDB_MODE\)"
    with pytest.raises(ConfigError, match=named):
        check_config(compose_train(["logger=wandb"]))
    monkeypatch.delenv("LBT_WANDB_MODE")
    with pytest.raises(ConfigError) as err:           # given on the command line: no variable to name
        check_config(compose_train(["logger=wandb", "logger.mode=ofline"]))
    assert "environment" not in str(err.value)


def test_a_corpus_missing_under_lbt_root_names_the_variable(monkeypatch, tmp_path):
    from lbt import train as train_mod
    from lbt.data.records import CorpusError

    monkeypatch.setenv("LBT_ROOT", str(tmp_path / "nope"))
    cfg = compose_train(["logger=none", f"+job_dir={tmp_path / 'job'}"])
    named = (rf"{tmp_path / 'nope'}/data/corpora/frame_plus.jsonl: corpus file not found, under paths.root=.* "
             rf"from the environment variable LBT_ROOT")
    with pytest.raises(CorpusError, match=named):
        train_mod.train(cfg)


def test_launcher_presets_read_empty_variables_as_unset(monkeypatch):
    for name in ("LBT_SLURM_PARTITION", "LBT_SLURM_TIME_MIN", "LBT_MAX_PARALLEL", "LBT_JOBS_PER_GPU"):
        monkeypatch.setenv(name, "")
    slurm = OmegaConf.load(CONF / "hydra/launcher/slurm.yaml")
    local = OmegaConf.load(CONF / "hydra/launcher/local_gpus.yaml")
    assert (slurm.partition, slurm.timeout_min, local.max_parallel, local.jobs_per_gpu) == (None, 240, None, 1)
    monkeypatch.setenv("LBT_SLURM_TIME_MIN", "30")
    monkeypatch.setenv("LBT_MAX_PARALLEL", "2")
    monkeypatch.setenv("LBT_JOBS_PER_GPU", "2")
    assert (slurm.timeout_min, local.max_parallel, local.jobs_per_gpu) == (30, 2, 2)


def test_no_config_reads_lbt_wandb_or_hf_variables_with_oc_env():
    """oc.env returns "" for a variable set empty; ${lbt.env:...} gives the default instead."""
    for path in CONF.rglob("*.yaml"):
        assert not re.search(r"oc\.env:(LBT_|WANDB_|HF_)", path.read_text()), path


def test_env_example_sets_no_value_a_library_would_reject():
    values = dotenv_values(EXAMPLE)
    assert "WANDB_MODE" not in values        # wandb validates it itself and has no `auto`
    assert values["LBT_WANDB_MODE"] == "auto"
    names = set(values)
    text = EXAMPLE.read_text()
    assert "LBT_WANDB_MODE" in "".join(line for line in text.splitlines() if line.startswith("#"))
    assert names >= {"WANDB_API_KEY", "HF_TOKEN", "HF_HOME", "HF_HUB_OFFLINE", "LBT_ROOT", "LBT_LLM_API_KEY"}


def test_compose_without_lbt_imported_knows_the_resolver(tmp_path):
    """Hydra imports lbt's launcher plugin whenever it composes, and the plugin registers ${lbt.env:...}."""
    code = ("import sys; from hydra import compose, initialize_config_dir\n"
            f"with initialize_config_dir(config_dir={str(CONF)!r}, version_base='1.3'):\n"
            "    cfg = compose(config_name='train')\n"
            "print(cfg.paths.root, 'torch' in sys.modules)\n")
    env = {**os.environ, "LBT_ROOT": ""}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.split() == [".", "False"]


def test_copied_env_example_runs_a_job_offline(tmp_path):
    """cp .env.example .env, then a short job from that folder: data/ under the cwd (LBT_ROOT= is empty),
    W&B offline (no key), DONE."""
    shutil.copyfile(EXAMPLE, tmp_path / ".env")
    (tmp_path / "data" / "corpora").mkdir(parents=True)
    write_toy_corpus(tmp_path / "data" / "corpora" / "frame_plus.jsonl", n=16)
    env = {k: v for k, v in os.environ.items()
           if k not in {*EXAMPLE_NAMES, "WANDB_MODE", "LBT_WANDB_MODE", "HYDRA_FULL_ERROR"}}
    env.update(NETRC=str(tmp_path / "no-netrc"), OMP_NUM_THREADS="1", WANDB_SILENT="true")
    job = tmp_path / "job"
    args = ["data.require_validation=false", "eval=none", "probe=none", "logger=wandb", "train.effective_batch=4",
            "train.micro_batch=4", "train.epochs=1", "train.max_length=128",
            "data.drop_long_prompts=true", "train.max_steps=2",
            f"hydra.run.dir={job}"]
    proc = subprocess.run([sys.executable, "-m", "lbt.train", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert (job / "DONE").exists(), output[-3000:]
    card = json.loads((job / "run.json").read_text())
    assert card["status"] == "done" and Path(card["corpus"]["path"]) == Path("data/corpora/frame_plus.jsonl")
    assert card["config"]["logger"]["mode"] == "auto"
    assert list((job / "wandb_files" / "wandb").glob("offline-run-*")), "W&B did not log offline"
