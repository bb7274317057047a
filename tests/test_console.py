"""The console: commands answer at once (no heavy import for --help / --cfg job / a config error), a user
error is one line with exit code 2, training shows progress, known library noise is silenced."""

from __future__ import annotations

import importlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest

from lbt import choices, console
from lbt.config import ConfigError
from tests.conftest import CONF, ROOT, compose_train, write_toy_corpus

HEAVY = ("torch", "lightning", "transformers", "peft")


def heavy_imports(*command: str, env: dict[str, str] | None = None) -> tuple[set[str], subprocess.CompletedProcess]:
    """The heavy libraries a command imported (Python's -X importtime names every module it loads)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *command], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False, env={**os.environ, **(env or {})})
    loaded = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return {m for m in loaded if m.split(".")[0] in HEAVY}, proc


def script(name: str) -> list[str]:
    path = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if path is None:
        pytest.skip(f"console script {name} not installed (pip install -e .)")
    return [path]


@pytest.mark.parametrize("command,shows", [
    (["-m", "lbt.train", "--cfg", "job"], "seed: 0"), (["-m", "lbt.train", "--help"], "powered by Hydra"),
    (["-m", "lbt.evaluate", "--cfg", "job"], "items:"), (["-m", "lbt.evaluate", "--help"], "powered by Hydra"),
    (["lbt-train", "--cfg", "job"], "seed: 0"), (["lbt-evaluate", "--help"], "powered by Hydra"),
    (["-m", "lbt.interp", "--help"], "--preset"), (["lbt-interp", "--help"], "--preset"),
    (["-m", "lbt.judge", "--help"], "usage:"),
])
def test_help_and_cfg_job_import_no_heavy_library(command, shows):
    """Counted in modules, not seconds, so that it holds on a loaded machine (~0.3 s idle, was 5-9 s)."""
    args = script(command[0]) + command[1:] if not command[0].startswith("-") else command
    heavy, proc = heavy_imports(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert heavy == set()
    assert shows in proc.stdout


def test_a_config_error_is_one_line_exit_2_before_any_heavy_import(tmp_path):
    heavy, proc = heavy_imports("-m", "lbt.train", "train.max_steps=0", f"hydra.run.dir={tmp_path / 'job'}",
                                env={"HYDRA_FULL_ERROR": ""})
    output = proc.stdout + proc.stderr
    assert proc.returncode == console.USER_ERROR_EXIT, output[-2000:]
    assert "train.max_steps=0: must be null or an integer >= 1" in output and "LBT_TRACEBACK=1" in output
    assert "Traceback" not in output and heavy == set()


def test_a_bad_corpus_is_one_line_and_the_traceback_comes_on_request(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"id": "a", "domain": "d", "scenario_id": "s", "assistant": "x"}\n')
    args = [sys.executable, "-m", "lbt.train", f"arm.corpus={corpus}", "data.require_validation=false",
            "logger=none", "eval=none", "probe=none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": ""}
    plain = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'a'}"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300, check=False)
    output = plain.stdout + plain.stderr
    assert plain.returncode == 2, output[-3000:]
    assert f"{corpus}:1: field 'user' is missing" in output and "Traceback" not in output
    assert sum(f"{corpus}:1" in line for line in output.splitlines()) == 1
    traced = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'b'}"], cwd=ROOT, capture_output=True, text=True,
                            env={**env, console.TRACEBACK_ENV: "1"}, timeout=300, check=False)
    assert traced.returncode != 0 and "Traceback" in traced.stdout + traced.stderr


def test_a_user_error_of_the_module_run_as_the_command_is_one_line(tmp_path):
    """`python -m lbt.evaluate` defines its AdapterError in `__main__`: still one line and exit 2."""
    proc = subprocess.run([sys.executable, "-m", "lbt.evaluate", f"adapter={tmp_path / 'nope'}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "HYDRA_FULL_ERROR": ""})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert f"adapter={tmp_path / 'nope'}: no adapter_config.json there" in output
    assert "Traceback" not in output


def test_user_errors_are_named_by_real_exception_classes():
    for dotted in console.USER_ERRORS:
        module, _, name = dotted.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), name), BaseException), dotted


def test_user_errors_turns_only_user_errors_into_exit_2(monkeypatch, caplog):
    monkeypatch.delenv(console.TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit) as stop, console.user_errors("lbt.test"):
        raise ConfigError(["train.lr=0: must be a number > 0"])
    assert stop.value.code == 2 and "config error: train.lr=0" in caplog.text
    with pytest.raises(FileNotFoundError), console.user_errors("lbt.test", reraise=True):   # a sweep's job
        raise FileNotFoundError("x")
    with pytest.raises(RuntimeError), console.user_errors("lbt.test"):        # a bug keeps its traceback
        raise RuntimeError("bug")
    monkeypatch.setenv(console.TRACEBACK_ENV, "1")
    with pytest.raises(ConfigError), console.user_errors("lbt.test"):
        raise ConfigError(["x"])


def test_allowed_values_have_one_definition():
    from lbt.config import schema
    from lbt.eval import decode, scoring
    from lbt.model import load, lora
    from lbt.probe import callback, directions

    assert decode.DECODE_MODES is choices.DECODE_MODES and scoring.OPTION_FORMS is choices.OPTION_FORMS
    assert lora.ADAPTER_MODES is choices.ADAPTER_MODES and callback.MODES is choices.INTERVENTION_MODES
    assert directions.SUMMARIES is choices.SUMMARIES and load.QUANTIZATIONS is choices.QUANTIZATIONS
    assert set(load.DTYPES) == set(choices.DTYPE_NAMES)
    assert all(str(dtype) == f"torch.{choices.DTYPE_NAMES[name]}" for name, dtype in load.DTYPES.items())
    # The strategies are Lightning's registry, read when a value other than auto needs it.
    assert "ddp" in schema.STRATEGIES and "auto" in schema.STRATEGIES and "ddp_spawn" not in schema.STRATEGIES
    assert list(schema.STRATEGIES) == list(schema.lightning_strategies())


def test_checking_a_cpu_config_imports_no_torch():
    code = ("import sys; from hydra import compose, initialize_config_dir; from lbt.config import check_config\n"
            f"with initialize_config_dir(config_dir={str(CONF)!r}, version_base='1.3'):\n"
            "    check_config(compose(config_name='train'))\n"
            f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""


# -- progress ---------------------------------------------------------------------------------------------

def fake_step(progress, step: int, total: int = 10):
    trainer = SimpleNamespace(global_step=step, max_steps=total, is_global_zero=True)
    module = SimpleNamespace(loss_history=[2.5 - step / 10], tokens_per_second=1234.0)
    progress.on_train_batch_end(trainer, module, None, None, step - 1)
    return trainer, module


def test_progress_redraws_one_line_in_a_terminal_and_logs_every_n_steps_elsewhere(caplog):
    from lbt.progress import Progress, default_every

    terminal = io.StringIO()
    bar = Progress(stream=terminal, tty=True)
    bar.on_train_start(SimpleNamespace(global_step=0, max_steps=10), None)
    for step in range(1, 11):
        bar.on_train_batch_start(SimpleNamespace(is_global_zero=True), None, None, step - 1)
        assert terminal.getvalue().endswith("\r\x1b[K")   # cleared while a step (and its logs) runs
        fake_step(bar, step)
    text = terminal.getvalue()
    assert text.count("\r[") == 10 and text.endswith("\n") and text.count("\n") == 1
    assert "step 10/10 (100%)" in text and "loss 1.5000" in text and "1234 tokens/s" in text and "ETA 0:00" in text

    caplog.set_level(logging.INFO, logger="lbt.progress")
    plain = Progress(every=4, stream=io.StringIO(), tty=False)
    plain.on_train_start(SimpleNamespace(global_step=0, max_steps=10), None)
    for step in range(1, 11):
        fake_step(plain, step)
    lines = [r.getMessage() for r in caplog.records if r.name == "lbt.progress"]
    assert [re.search(r"step (\d+)/", line).group(1) for line in lines] == ["4", "8", "10"]
    assert all("tokens/s" in line and "ETA" in line and "loss" in line for line in lines)
    assert default_every(40) == 4 and default_every(3) == 1


@pytest.mark.slow
def test_a_job_logs_progress_and_no_known_library_noise(tmp_path):
    """A real job, as a user runs it (no terminal): progress lines, none of the warnings and tips every run
    printed before (transformers' FutureWarning, Lightning's litlogger tip and weights_only notice, ...)."""
    corpus = write_toy_corpus(tmp_path / "toy.jsonl")
    proc = subprocess.run(
        [sys.executable, "-m", "lbt.train", f"arm.corpus={corpus}", "data.require_validation=false",
         "logger=none", "eval=none", "probe=none", "train.effective_batch=8", "train.micro_batch=4",
         "train.epochs=1", "train.max_length=128",
         "data.drop_long_prompts=true", "train.log_every_steps=1", "train.resume_every_steps=1",
         f"hydra.run.dir={tmp_path / 'job'}"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
        check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    steps = [int(m) for m in re.findall(r"train step (\d+)/\d+ \(\d+%\)  loss \d\.\d{4}  \d+ tokens/s  ETA ", output)]
    assert steps and steps == list(range(1, max(steps) + 1))
    for noise in ("FutureWarning", "litlogger", "`weights_only` was not set", "LeafSpec", "srun"):
        assert noise not in output, noise
    # Lightning's lines show once (not also through its own "INFO: ..." handler), and reach train.log
    assert output.count("`Trainer.fit` stopped") == 1 and "INFO: " not in output
    assert "`Trainer.fit` stopped" in (tmp_path / "job" / "train.log").read_text()


def test_quiet_libraries_filters_precisely():
    console.quiet_libraries()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default", append=True)
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "x.py", 1,
                               module="transformers.modeling_utils")
        warnings.warn_explicit("something else is deprecated", FutureWarning, "x.py", 2,
                               module="transformers.modeling_utils")
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    record = logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, "x", 1,
                               "💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/)", None, None)
    assert not logging.getLogger("lightning.pytorch.utilities.rank_zero").filter(record)
    other = logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, "x", 1, "GPU available",
                              None, None)
    assert logging.getLogger("lightning.pytorch.utilities.rank_zero").filter(other)


def test_log_every_steps_is_checked():
    from lbt.config import check_config

    check_config(compose_train(["train.log_every_steps=5"]))
    with pytest.raises(ConfigError, match="train.log_every_steps=0: must be null or an integer >= 1"):
        check_config(compose_train(["train.log_every_steps=0"]))


def test_direction_computing_logs_its_progress(tiny_model, tmp_path, caplog):
    """The base model's direction set took ~27 s on a CPU without a word; now each arm's records count up."""
    from lbt.data.chat import ChatFormat
    from lbt.probe import directions as dirs
    from tests.test_directions import write_paired_corpora

    cfg, tokenizer, model = tiny_model
    corpora = write_paired_corpora(tmp_path)
    caplog.set_level(logging.INFO, logger="lbt.probe.directions")
    dirs.get_directions(model, ChatFormat(tokenizer), cfg.model, corpora, tmp_path / "cache",
                        dirs.DirectionSettings(max_length=96, batch_size=2))
    lines = [r.getMessage() for r in caplog.records if r.name == "lbt.probe.directions"]
    assert "not cached; computing them from 12 plus records and 12 minus records" in lines[0]
    counts = [line for line in lines if line.startswith("directions: plus records")]
    assert len(counts) >= 3 and counts[-1].startswith("directions: plus records 12/12")
