"""W&B: one run per job with group/job_type/name/tags and a deterministic id; offline without a key or a
network, with one notice and the `wandb sync` command; metrics and config (without secrets) in the run
file; training unaffected."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lbt import loggers
from lbt import train as train_mod
from lbt import wandb_keys as keys
from lbt.loggers import finish_wandb, job_run_id, run_id, wandb_key_in_netrc, wandb_mode
from tests.conftest import ROOT, compose_train, write_toy_corpus
from tests.test_directions import write_paired_corpora

SECRETS = {"HF_TOKEN": "hf_env_secret_4a1b", "LBT_LLM_API_KEY": "sk-llm-secret-77c2"}
CONFIG_SECRETS = ("hf_config_secret_9d3e", "sk-config-secret-51f0")


def wandb_records(path: Path):
    """The records of an offline .wandb file: W&B's 7-byte header, then LevelDB-log framing (32 KiB blocks,
    7-byte chunk headers: crc32c, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4), each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, chunks = 7, 32768, []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:                     # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunks.append(raw[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def history(records) -> list[dict]:
    """The run's logged rows (one per log call), key → value."""
    return [{(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def isolate_wandb(monkeypatch, tmp_path: Path) -> None:
    """No key anywhere W&B looks (env, NETRC, ~/.netrc under HOME), mode unset, HOME in tmp."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "NETRC", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "home" / ".cache" / "wandb"))


def test_offline_job_logs_metrics_and_config_without_secrets(tmp_path, monkeypatch, caplog):
    isolate_wandb(monkeypatch, tmp_path)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    corpus = write_toy_corpus(tmp_path / "toy.jsonl", n=16)
    common = [f"arm.corpus={corpus}", "data.require_validation=false", "eval=none", "probe=none",
              "train.effective_batch=8", "train.micro_batch=4", "train.epochs=1", "train.max_length=96",
              f"+model.hf_token={CONFIG_SECRETS[0]}", f"+extra.api_key={CONFIG_SECRETS[1]}"]
    identity = train_mod.job_identity
    monkeypatch.setattr(train_mod, "job_identity", lambda cfg: {**identity(cfg), "sweep": "wb-sweep"})
    caplog.set_level(logging.WARNING, logger="lbt.loggers")
    try:
        card = train_mod.train(compose_train([*common, "logger=wandb", f"+job_dir={tmp_path / 'job'}"]))
    finally:
        finish_wandb()
    notices = [r.getMessage() for r in caplog.records if r.name == "lbt.loggers"]
    assert len(notices) == 1 and "offline" in notices[0] and "wandb sync" in notices[0]

    plain = train_mod.train(compose_train([*common, "logger=none", f"+job_dir={tmp_path / 'plain'}"]))
    assert card["loss_history"] == plain["loss_history"]                 # training unaffected

    (run_file,) = (tmp_path / "job" / "wandb_files" / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(run_file))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    name = "tiny-plus-s0"
    assert (run.display_name, run.run_group, run.job_type, run.project) == (name, "wb-sweep", "train", "lbt")
    assert run.run_id == run_id("wb-sweep", name)
    assert set(run.tags) == {"model:tiny", "arm:plus", "seed:0", "experiment:none"}
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["seed"] == 0 and config["train"]["effective_batch"] == 8
    assert config["model"]["hf_token"] == "<redacted>" and config["extra"]["api_key"] == "<redacted>"
    losses = [row[keys.TRAIN_LOSS] for row in history(records) if keys.TRAIN_LOSS in row]
    assert losses == pytest.approx(card["loss_history"])

    for path in (tmp_path / "job").rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            for secret in (*SECRETS.values(), *CONFIG_SECRETS):
                assert secret.encode() not in text, (path, secret)


def test_mode_follows_key_netrc_and_network(tmp_path, monkeypatch):
    isolate_wandb(monkeypatch, tmp_path)
    monkeypatch.setattr(loggers, "wandb_host_reachable", lambda host=None: True)
    assert wandb_mode("auto") == ("offline", "no WANDB_API_KEY and no W&B login in ~/.netrc")
    netrc = tmp_path / "home" / ".netrc"
    netrc.write_text("machine github.com login me password ghp_x\n")
    netrc.chmod(0o600)
    assert not wandb_key_in_netrc() and wandb_mode("auto")[0] == "offline"   # a netrc for another host
    netrc.write_text("machine api.wandb.ai login user password k123\n")
    assert wandb_key_in_netrc() and wandb_mode("auto") == ("online", None)
    monkeypatch.setattr(loggers, "wandb_host_reachable", lambda host=None: False)
    assert wandb_mode("auto") == ("offline", "W&B is not reachable (no network)")
    assert wandb_mode("offline") == ("offline", None) and wandb_mode("disabled") == ("disabled", None)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")          # self-hosted server
    assert not wandb_key_in_netrc()


def test_run_id_is_stable_per_sweep_job_and_distinct_otherwise(tmp_path):
    job = {"model": "tiny", "arm": "plus", "seed": 0, "sweep": "s1"}
    name = "tiny-plus-s0"
    first = job_run_id(job, tmp_path / "a", name)
    assert first == job_run_id(job, tmp_path / "elsewhere", name)       # a requeued job continues its run
    assert first != job_run_id({**job, "sweep": "s2"}, tmp_path / "a", name)
    assert first != job_run_id(job, tmp_path / "a", "tiny-plus-s1")
    single = {**job, "sweep": None}                                       # two single runs never share a run
    assert job_run_id(single, tmp_path / "a", name) != job_run_id(single, tmp_path / "b", name)
    assert len(first) == 16 and int(first, 16) >= 0


def test_a_run_logs_every_value_on_one_step_axis_with_shifts_and_one_table_per_measure(tmp_path, monkeypatch):
    """A job with the stance battery and the probe, 4 optimizer steps, phases base, step_2, final: every
    scalar sits at the optimizer steps its model has had (train/loss of the n-th step at n, like the phase
    step_n), shift_vs_base is the stance minus base's (0 at base), one rows table per measure."""
    isolate_wandb(monkeypatch, tmp_path)
    corpora = write_paired_corpora(tmp_path, n=16)
    cfg = compose_train([
        f"arm.corpus={corpora['plus']}", "data.require_validation=false", "logger=wandb",
        "eval.stance.max_items=2", "eval.stance.measures=[letter_logprob,logprob]", "eval.capability=null",
        "probe=default", f"probe.items={ROOT / 'data' / 'eval' / 'target_items.jsonl'}", "probe.max_items=4",
        f"directions.arms.plus.corpus={corpora['plus']}",
        f"directions.arms.minus.corpus={corpora['minus']}", f"paths.cache_dir={tmp_path / 'cache'}",
        "train.effective_batch=4", "train.micro_batch=4", "train.max_steps=4", "train.max_length=96",
        "train.checkpoint_fractions=[0.5,1.0]", f"+job_dir={tmp_path / 'job'}", "sweep_name=axis"])
    try:
        card = train_mod.train(cfg)
    finally:
        finish_wandb()
    (run_file,) = (tmp_path / "job" / "wandb_files" / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(run_file))
    step_metrics = {(r.metric.glob_name, r.metric.step_metric) for r in records if r.WhichOneof("record_type") == "metric"}
    assert ("*", keys.STEP) in step_metrics                              # W&B plots every key against STEP
    rows = history(records)
    assert all(keys.STEP in row for row in rows)

    def steps(key: str) -> list[int]:
        """Steps of a scalar, or of a table or plot (logged as `<key>/<field>` items)."""
        return [row[keys.STEP] for row in rows if key in row or any(k.startswith(f"{key}/") for k in row)]

    def values(key: str) -> list[float]:
        return [row[key] for row in rows if key in row]

    assert steps(keys.TRAIN_LOSS) == [1, 2, 3, 4] and values(keys.TRAIN_LOSS) == pytest.approx(card["loss_history"])
    assert steps(keys.VAL_LOSS) == [v["step"] for v in card["val_loss"]] == [2, 4]
    for measure in ("letter_logprob", "logprob"):
        stance, shift = keys.stance("target", measure), keys.shift_vs_base("target", measure)
        assert steps(stance) == steps(shift) == [0, 2, 4]
        assert values(shift) == pytest.approx([v - values(stance)[0] for v in values(stance)])
        assert values(shift)[0] == 0.0
        assert steps(keys.rows_table(measure)) == [0, 2, 4]
    for position in keys.PROBE_POSITIONS:
        assert steps(keys.probe_shift_at_l_star(position)) == [0, 2, 4]
    assert steps(keys.probe_layer_plot("step_2", "answer_shift") + "_table") == [2]     # W&B's name for a plot
    assert not [key for row in rows for key in row if key.startswith(("eval_rows/step_", "eval_rows/base/"))]
    # The last version of a measure's table holds every phase's rows, phase first.
    path = f"{keys.rows_table('letter_logprob')}/path"
    (final_table,) = [row[path] for row in rows if row[keys.STEP] == 4 and path in row]
    table = json.loads((run_file.parent / "files" / final_table).read_text())
    assert table["columns"][:2] == ["phase", "item_set"]
    assert [r[0] for r in table["data"]] == ["base"] * 8 + ["step_2"] * 8 + ["final"] * 8


def test_a_job_without_wandb_never_imports_it():
    """Closing a job's W&B run (every job's exit) imports nothing where no W&B run was opened: the import
    costs about half a second per job of a sweep that logs to CSV."""
    code = ("import sys; from lbt.loggers import finish_wandb, mark_wandb_preempting; "
            "finish_wandb(); mark_wandb_preempting(); print('wandb' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
