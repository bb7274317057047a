"""python -m lbt.evaluate: the battery on a base model or an adapter, any item file in the published schema
(the original study's items unchanged), the job-directory layout, append-only, and errors before loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lbt import evaluate as evaluate_mod
from lbt.eval import evaluators as evaluators_mod
from lbt.eval.items import ItemError
from lbt.eval.rows import read_rows
from tests.conftest import CONF, ROOT
from tests.eval_reference import make_item, make_items, write_items

SEED_ITEMS = ROOT.parent / "shared" / "reference" / "seed-eval" / "target_items.jsonl"
SHORT = [
    "eval.stance.forced_choice.max_new_tokens=2",
    "eval.stance.likert.max_new_tokens=2",
    "eval.stance.open_ended.max_new_tokens=2",
]
pytestmark = pytest.mark.usefixtures("one_thread")


def compose_evaluate(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


@pytest.fixture
def toy_items(tmp_path) -> Path:
    return write_items(tmp_path / "toy_items.jsonl", make_items(per_domain=1))


def test_base_model_writes_job_layout(toy_items, tmp_path):
    out = tmp_path / "out"
    summary = evaluate_mod.evaluate(compose_evaluate(f"items=[{toy_items}]", f"out_dir={out}", *SHORT))
    for measure in ("letter_logprob", "forced_choice", "logprob", "likert", "open_ended"):
        rows = read_rows(out / "eval/base/toy" / f"{measure}.jsonl")
        assert rows and {r["item_set"] for r in rows} == {"toy"} and {r["phase"] for r in rows} == {"base"}
    card = json.loads((out / "run.json").read_text())
    assert card["job"]["arm"] == "base" and card["job"]["model"] == "tiny" and card["phase"] == "base"
    assert card["items"][0]["n_items"] == 2 and card["items"][0]["item_set"] == "toy"
    assert card["status"] == "done" and "missing" not in card and (out / "DONE").exists()
    assert not (out / "job.lock").exists()
    assert json.loads((out / "eval/base/summary.json").read_text()) == json.loads(json.dumps(summary))
    files = sorted((out / "eval").rglob("*.json*"))
    before = [f.read_bytes() for f in files]
    evaluate_mod.evaluate(compose_evaluate(f"items=[{toy_items}]", f"out_dir={out}", *SHORT))
    assert [f.read_bytes() for f in files] == before  # append-only: the finished phase is skipped


def _adapter(tmp_path) -> Path:
    """A LoRA adapter of the tiny model with non-zero B (so it changes scores), inside a fake job dir."""
    from lbt.model.load import load_model, load_tokenizer
    from lbt.model.lora import wrap_lora

    cfg = compose_evaluate()
    tokenizer = load_tokenizer(cfg.model)
    model = wrap_lora(
        load_model(cfg.model, tokenizer, torch.float32),
        OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}),
    )
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
    job = tmp_path / "job"
    (job / "checkpoints").mkdir(parents=True)
    model.save_pretrained(str(job / "checkpoints" / "adapter_step_4"))
    (job / "run.json").write_text(
        json.dumps(
            {"job": {"model": "tiny", "arm": "frame_plus", "seed": 3, "experiment": None, "sweep": "s"}}
        )
    )
    return job / "checkpoints" / "adapter_step_4"


def test_adapter_takes_arm_and_phase_from_its_job(toy_items, tmp_path):
    adapter = _adapter(tmp_path)
    evaluate_mod.evaluate(
        compose_evaluate(
            f"items=[{toy_items}]", f"out_dir={tmp_path / 'b'}", "eval.stance.measures=[letter_logprob]"
        )
    )
    tuned = evaluate_mod.evaluate(
        compose_evaluate(
            f"items=[{toy_items}]",
            f"out_dir={tmp_path / 'a'}",
            f"adapter={adapter}",
            "eval.stance.measures=[letter_logprob]",
        )
    )
    card = json.loads((tmp_path / "a/run.json").read_text())
    # The adapter's job was trained before issue 16 (arm frame_plus): the new card says today's name.
    assert card["job"]["arm"] == "plus" and card["job"]["seed"] == 3 and card["phase"] == "step_4"
    assert tuned["phase"] == "step_4" and (tmp_path / "a/eval/step_4/toy/letter_logprob.jsonl").exists()
    # The adapter is applied: the rows move (row by row; a 4-step tiny adapter moves their mean by ~1e-4).
    rows = [[json.loads(line)["stance"] for line in (tmp_path / path).read_text().splitlines()]
            for path in ("b/eval/base/toy/letter_logprob.jsonl", "a/eval/step_4/toy/letter_logprob.jsonl")]
    assert len(rows[0]) == len(rows[1]) > 0
    assert max(abs(b - a) for b, a in zip(*rows)) > 1e-5


@pytest.mark.skipif(not SEED_ITEMS.exists(), reason="../shared/reference/seed-eval is absent")
def test_published_items_score_unchanged(tmp_path):
    out = tmp_path / "seed"
    summary = evaluate_mod.evaluate(
        compose_evaluate(
            f"items=[{SEED_ITEMS}]",
            f"out_dir={out}",
            *SHORT,
            "eval.stance.measures=[letter_logprob,forced_choice,likert]",
        )
    )
    stats = summary["item_sets"]["target"]
    assert stats["n_items"] == 54
    assert (
        stats["measures"]["letter_logprob"]["n_rows"] == 108 and stats["measures"]["likert"]["n_rows"] == 108
    )
    rows = read_rows(out / "eval/base/target/letter_logprob.jsonl")
    assert {r["pro_option"] for r in rows} == {"A", "B"} and len({r["domain"] for r in rows}) == 6
    full = evaluate_mod.evaluate(
        compose_evaluate(f"items=[{SEED_ITEMS}]", f"out_dir={tmp_path / 'all'}", *SHORT, "eval.stance.max_items=6")
    )
    assert set(full["item_sets"]["target"]["measures"]) == {
        "letter_logprob",
        "forced_choice",
        "logprob",
        "likert",
        "open_ended",
    }


def _no_model(monkeypatch):
    monkeypatch.setattr(
        evaluate_mod, "load_model", lambda *a, **k: pytest.fail("model loaded before the check")
    )


def test_bad_items_fail_before_the_model_loads(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    with pytest.raises(ItemError, match="nope.jsonl: item file not found"):
        evaluate_mod.evaluate(compose_evaluate(f"items=[{tmp_path / 'nope.jsonl'}]", f"out_dir={tmp_path}"))
    bad = make_item("park_rules", 0)
    bad["forced_choice"]["pro_label"] = "Ω"
    path = write_items(tmp_path / "omega.jsonl", [bad])
    with pytest.raises(
        ItemError, match=r"omega\.jsonl:1: item 'park_rules-000-p0', field 'forced_choice\.pro_label'"
    ):
        evaluate_mod.evaluate(compose_evaluate(f"items=[{path}]", f"out_dir={tmp_path / 'o'}"))


def test_bad_adapter_and_duplicate_stems_fail_before_the_model_loads(toy_items, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    with pytest.raises(evaluate_mod.AdapterError, match="adapter_config.json"):
        evaluate_mod.evaluate(
            compose_evaluate(f"items=[{toy_items}]", f"adapter={tmp_path}", f"out_dir={tmp_path}")
        )
    other = tmp_path / "other"
    other.mkdir()
    twin = write_items(other / "toy_items.jsonl", make_items(1))
    with pytest.raises(ValueError, match="both make item set 'toy'"):
        evaluate_mod.evaluate(compose_evaluate(f"items=[{toy_items},{twin}]", f"out_dir={tmp_path}"))


def test_item_sets_are_named_as_the_training_callback_names_them(tmp_path):
    configured = OmegaConf.to_container(compose_evaluate().eval.stance.item_sets, resolve=True)
    project = ROOT / "data" / "eval"
    names = evaluate_mod.item_files(
        [project / "target_items.jsonl", project / "source_items.jsonl", tmp_path / "extra.jsonl"], configured
    )
    assert names == {"target": project / "target_items.jsonl", "source": project / "source_items.jsonl",
                     "extra": tmp_path / "extra.jsonl"}
    # Not a configured file: its stem without `_items` (the original study's target_items.jsonl → target).
    assert evaluate_mod.item_set_name(tmp_path / "seed" / "target_items.jsonl", configured) == "target"
    # Configured under another name: the config's name wins over the stem.
    assert evaluate_mod.item_set_name(tmp_path / "mine.jsonl", {"target": str(tmp_path / "mine.jsonl")}) == "target"
    # A mapping names its sets itself (two target files side by side).
    assert evaluate_mod.item_files({"target": "a/target_items.jsonl", "seed": "b/target_items.jsonl"}) == {
        "target": Path("a/target_items.jsonl"), "seed": Path("b/target_items.jsonl")}
    cfg = compose_evaluate("~items", f"+items={{mine: {project / 'target_items.jsonl'}}}")
    assert evaluate_mod.item_files(OmegaConf.to_container(cfg["items"]), configured) == {
        "mine": project / "target_items.jsonl"}


def test_evaluate_and_a_training_job_write_the_same_rows(tmp_path):
    """lbt.evaluate and a training job's stance evaluator (built from conf/train.yaml as lbt.train builds
    it), on the same model and item files: the same files, item sets and rows, and lbt.analyze reads them
    alike (item set role `target` / `source`)."""
    from lbt import analyze
    from lbt import train as train_mod
    from lbt.data.chat import ChatFormat
    from lbt.eval.evaluators import StanceEvaluator
    from lbt.eval.session import Session
    from lbt.model.load import load_model, load_tokenizer
    from lbt.rundir import RunDir
    from tests.conftest import compose_train

    project = ROOT / "data" / "eval"
    cfg = compose_evaluate(f"items=[{project / 'target_items.jsonl'},{project / 'source_items.jsonl'}]",
                           "eval.stance.max_items=2", "eval.stance.measures=[letter_logprob,logprob]", "phase=final",
                           f"out_dir={tmp_path / 'evaluate'}")
    evaluate_mod.evaluate(cfg)
    train_cfg = compose_train(["eval=default", "eval.stance.max_items=2", "probe=none",
                               "eval.stance.measures=[letter_logprob,logprob]"])
    tokenizer = load_tokenizer(train_cfg.model)
    (stance, *_) = [e for e in train_mod.job_evaluators(train_cfg, ChatFormat.of(tokenizer, train_cfg.model))
                    if isinstance(e, StanceEvaluator)]
    stance.evaluate(load_model(train_cfg.model, tokenizer, torch.float32), "final", Session(RunDir(tmp_path / "train")))

    def rows_files(root):
        return sorted(p.relative_to(root) for p in (root / "eval").rglob("*.jsonl"))

    made = {name: tmp_path / name for name in ("evaluate", "train")}
    assert rows_files(made["evaluate"]) == rows_files(made["train"]) == [
        Path(f"eval/final/{s}/{m}.jsonl") for s in ("source", "target") for m in ("letter_logprob", "logprob")]
    for path in rows_files(made["train"]):
        assert read_rows(made["evaluate"] / path) == read_rows(made["train"] / path)
    (made["train"] / "run.json").write_text(json.dumps({"job": {"model": "tiny", "arm": "neutral", "seed": 0}}))
    read = {name: analyze.load_rows(analyze.load_job(root / "run.json"), str) for name, root in made.items()}
    key = [(r["phase"], r["item_set"], r["measure"], r["base_item"], r["stance"]) for r in read["train"]]
    assert key == [(r["phase"], r["item_set"], r["measure"], r["base_item"], r["stance"]) for r in read["evaluate"]]
    assert {analyze.ITEM_SET_ROLES[r["item_set"]] for r in read["evaluate"]} == {"target", "source"}


def test_done_only_after_the_check_and_a_rerun_completes_what_is_missing(toy_items, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = (f"items=[{toy_items}]", f"out_dir={out}", "eval.stance.measures=[letter_logprob,likert]", *SHORT)
    real_write = evaluators_mod.write_rows

    def short_likert(path, rows):  # a writer that loses the last row of one file
        real_write(path, rows[:-1] if path.name == "likert.jsonl" else rows)

    monkeypatch.setattr(evaluators_mod, "write_rows", short_likert)
    with pytest.raises(evaluate_mod.IncompleteEvaluation, match="likert.jsonl: 3 rows, 4 expected"):
        evaluate_mod.evaluate(compose_evaluate(*args))
    card = json.loads((out / "run.json").read_text())
    assert card["status"] == "incomplete" and not (out / "DONE").exists()
    assert any("likert.jsonl: 3 rows, 4 expected" in m for m in card["missing"])
    monkeypatch.setattr(evaluators_mod, "write_rows", real_write)
    letter = out / "eval/base/toy/letter_logprob.jsonl"
    kept = (letter.read_bytes(), letter.stat().st_mtime_ns)
    asked = []
    real_score = evaluators_mod.score_item_sets
    monkeypatch.setattr(evaluators_mod, "score_item_sets", lambda m, t, sets, *a, **k: asked.extend(
        list(measures) for _, measures in sets.values()) or real_score(m, t, sets, *a, **k))
    evaluate_mod.evaluate(compose_evaluate(*args))  # the same command again
    assert asked == [["likert"]] and (letter.read_bytes(), letter.stat().st_mtime_ns) == kept
    card = json.loads((out / "run.json").read_text())
    assert card["status"] == "done" and "missing" not in card and (out / "DONE").exists()
    assert len(read_rows(out / "eval/base/toy/likert.jsonl")) == 4
    assert len(list((out / "eval/base/toy").glob("likert.jsonl.corrupt-*"))) == 1  # set aside, not deleted
    # A corrupt file under DONE: found, set aside, scored again; DONE only once it is whole again.
    letter.write_text('{"measure": "letter_logprob", "stance": \n')
    evaluate_mod.evaluate(compose_evaluate(*args))
    assert asked[-1] == ["letter_logprob"] and (out / "DONE").exists()
    assert len(read_rows(letter)) == 4


def test_a_failure_is_recorded_in_the_run_card(toy_items, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def boom(*args, **kwargs):
        raise RuntimeError("scoring broke")

    monkeypatch.setattr(evaluators_mod, "score_item_sets", boom)
    with pytest.raises(RuntimeError, match="scoring broke"):
        evaluate_mod.evaluate(compose_evaluate(f"items=[{toy_items}]", f"out_dir={out}",
                                               "eval.stance.measures=[letter_logprob]"))
    card = json.loads((out / "run.json").read_text())
    assert card["status"] == "failed" and card["error"]["type"] == "RuntimeError"
    assert "scoring broke" in card["error"]["message"] and "boom" in card["error"]["traceback"]
    assert not (out / "DONE").exists() and not (out / "job.lock").exists()


def test_phase_inference():
    assert evaluate_mod.infer_phase(None) == "base"
    assert evaluate_mod.infer_phase(Path("job/adapter")) == "final"
    assert evaluate_mod.infer_phase(Path("job/checkpoints/adapter_step_12")) == "step_12"


@pytest.mark.slow
def test_cli(toy_items, tmp_path):
    out = tmp_path / "cli"
    command = [
        sys.executable,
        "-m",
        "lbt.evaluate",
        f"items=[{toy_items}]",
        f"out_dir={out}",
        "eval.stance.measures=[letter_logprob]",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny matmuls on a shared box: one thread is faster
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(read_rows(out / "eval/base/toy/letter_logprob.jsonl")) == 4
