"""The base phase evaluated once per sweep (lbt.eval.base_cache): the key, the cache's faults, a whole job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lbt.eval import base_cache
from lbt.eval.base_cache import BaseCache, base_key
from lbt.eval.session import Evaluator, Session
from lbt.rundir import Expected, RunDir, read_json, write_json_once, write_rows
from tests.conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model=tiny", "hardware=cpu"]


def key_of(*overrides: str) -> str:
    return base_key(compose_train([*BASE, *overrides]))


# -- the key --------------------------------------------------------------------------------------------

# One override per input the key covers; each alone must give another key.
CHANGES = {
    "model path": "model.path=/somewhere/else",
    "model revision": "+model.revision=abc123",
    "random_init seed": "model.init_seed=1",
    "model config": "model.arch.hidden_size=96",
    "tokenizer": f"model.tokenizer={ROOT / 'src/lbt/assets/tiny_tokenizer'}",
    "chat template kwargs": "+model.chat_template_kwargs.enable_thinking=false",
    "model dtype": "model.dtype=bfloat16",
    "hardware dtype": "hardware.dtype=bfloat16",
    "precision": "hardware.precision=bf16-mixed",
    "attention backend": "model.attn_implementation=eager",
    "quantization": "model.quantization=nf4",
    "decode mode": "+hardware.fast.decode=static",
    "eval batch size": "hardware.eval_batch_size=64",
    "ranks": "hardware.devices=2",
    "adapter precision": "hardware.fast.adapters=bf16",
    "stance setting": "eval.stance.option_form=labelled",
    "stance items taken": "eval.stance.max_items=5",
    "stance generation": "eval.stance.forced_choice.max_new_tokens=5",
    "capability setting": "eval.capability.max_texts=7",
    "capability phases": "eval.capability.phases=[base]",
    "evaluator off": "eval.capability=null",
    "probe setting": "probe.batch_size=8",
    "probe off": "probe=none",
    "directions setting": "directions.variant=user_mean",
    "lora init": "+train.lora.use_dora=true",
    "lora rank": "train.lora.r=8",
    "intervention": "intervention=ablate",
}


def test_same_config_same_key():
    assert key_of() == key_of()
    # What does not touch the base phase shares it: the arm, the seed, training settings, the switch itself.
    assert key_of() == key_of("arm=minus", "seed=3", "train.lr=1e-3", "hardware.fast.share_base=false",
                              "hardware.micro_batch=2", "hardware.fast.ce_chunk=64", "hardware.fast.fused_ce=true", "hardware.fast.pack_tokens=512",
                              "hardware.fast.compile_layers=true", "hardware.fast.compile_cache=false")


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_any_one_change_gives_another_key(name):
    try:
        changed = key_of(CHANGES[name])
    except Exception as err:  # noqa: BLE001 -- an override the config tree lacks is a broken test, not a pass
        pytest.fail(f"{name}: {CHANGES[name]} does not compose ({err})")
    assert changed != key_of(), name


def test_item_file_content_changes_the_key(tmp_path):
    cfg = compose_train(BASE)
    items = tmp_path / "items.jsonl"
    items.write_bytes(Path(str(cfg.eval.stance.item_sets.target)).read_bytes())
    cfg.eval.stance.item_sets.target = str(items)
    before = base_key(cfg)
    assert base_key(cfg) == before
    items.write_bytes(items.read_bytes() + b"\n")  # the same path, another content
    assert base_key(cfg) != before


@pytest.mark.parametrize("package", base_cache.PACKAGES)
def test_a_package_version_changes_the_key(package, monkeypatch):
    cfg = compose_train(BASE)
    before = base_key(cfg)
    versions = base_cache._versions()
    monkeypatch.setattr(base_cache, "_versions", lambda: {**versions, package: "0.0.0-other"})
    assert base_key(cfg) != before


def test_a_change_to_lbts_own_code_changes_the_key(tmp_path, monkeypatch):
    """A fixed scorer with an unchanged version number must not be served the old base rows."""
    package = tmp_path / "lbt"
    (package / "eval").mkdir(parents=True)
    (package / "eval" / "parse.py").write_text("ANSWER = 'A'\n")
    before = base_cache.code_identity(package)
    (package / "eval" / "parse.py").write_text("ANSWER = 'B'\n")
    assert base_cache.code_identity(package) != before
    cfg = compose_train(BASE)
    key = base_key(cfg)
    monkeypatch.setattr(base_cache, "code_identity", lambda package=None: "another tree")
    assert base_key(cfg) != key


def test_same_key_across_processes():
    code = ("from tests.conftest import compose_train; from lbt.eval.base_cache import base_key; "
            f"print(base_key(compose_train({BASE!r})))")
    keys = set()
    for seed in ("0", "1"):  # another hash seed: nothing in the key may depend on set or dict hashing order
        done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONHASHSEED=seed))
        assert done.returncode == 0, done.stderr[-2000:]
        keys.add(done.stdout.strip().splitlines()[-1])
    assert keys == {key_of()}


# -- the cache's faults ------------------------------------------------------------------------------------

class Counting(Evaluator):
    """Writes a rows file and a JSON record per phase, counting its evaluations (as the real ones: a phase
    whose files are intact is skipped)."""

    def __init__(self, delay: float = 0.0):
        self.calls, self.delay = 0, delay

    def planned_files(self, run: RunDir, phase: str) -> list[Expected]:
        return [Expected(run.rows(phase, "target", "logprob"), 2), Expected(run.summary(phase))]

    def evaluate(self, model, phase: str, session: Session):
        files = self.planned_files(session.run, phase)
        if all(e.path.exists() for e in files):
            return None
        self.calls += 1
        time.sleep(self.delay)
        write_rows(files[0].path, [{"item_id": "a", "stance": 0.5}, {"item_id": "b", "stance": -0.25}])
        write_json_once(files[1].path, {"phase": phase, "mean": 0.125})
        return True


def run_base(cache: BaseCache, job: Path, evaluator: Evaluator, rank: int = 0, sent: list | None = None
             ) -> list[Evaluator]:
    """The base phase as CheckpointPhases.dispatch runs it; on rank > 0, `sent` is what rank 0 broadcasts."""
    session = Session(run=RunDir(job), rank=rank, world=2 if rank else 1,
                      broadcast=(lambda value: sent) if rank else (lambda value: value))
    with cache.shared([evaluator], session) as served:
        if evaluator not in served:
            evaluator.evaluate(None, "base", session)
    return served


def job_bytes(job: Path) -> dict[str, bytes]:
    return {str(p.relative_to(job)): p.read_bytes() for p in sorted(job.rglob("*")) if p.is_file()}


def test_miss_then_hit(tmp_path):
    cache = BaseCache(tmp_path / "cache", "tiny-k")
    first, second = Counting(), Counting()
    assert run_base(cache, tmp_path / "a", first) == []
    assert run_base(cache, tmp_path / "b", second) == [second]
    assert (first.calls, second.calls) == (1, 0)
    assert job_bytes(tmp_path / "a") == job_bytes(tmp_path / "b")
    assert sorted(job_bytes(cache.entry)) == ["entry.json", "eval/base/summary.json", "eval/base/target/logprob.jsonl"]


@pytest.mark.parametrize("fault", ["missing", "truncated", "not json"])
def test_a_bad_entry_is_set_aside_and_the_base_evaluated_again(tmp_path, fault):
    cache = BaseCache(tmp_path / "cache", "tiny-k")
    run_base(cache, tmp_path / "a", Counting())
    rows = cache.entry / "eval/base/target/logprob.jsonl"
    summary = cache.entry / "eval/base/summary.json"
    if fault == "missing":
        rows.unlink()
    elif fault == "truncated":
        rows.write_text(rows.read_text().splitlines()[0] + "\n")
    else:
        summary.write_text("{not json")
    again = Counting()
    assert run_base(cache, tmp_path / "b", again) == []
    assert again.calls == 1
    assert job_bytes(tmp_path / "b") == job_bytes(tmp_path / "a")
    if fault != "missing":  # kept for inspection, never deleted
        assert len(list(cache.entry.rglob("*.corrupt-*"))) == 1
    # The entry is whole again: a third job copies it.
    third = Counting()
    assert run_base(cache, tmp_path / "c", third) == [third] and third.calls == 0
    assert job_bytes(tmp_path / "c") == job_bytes(tmp_path / "a")


def test_an_intact_job_file_is_never_overwritten(tmp_path):
    cache = BaseCache(tmp_path / "cache", "tiny-k")
    run_base(cache, tmp_path / "a", Counting())
    job = RunDir(tmp_path / "b")
    write_json_once(job.summary("base"), {"phase": "base", "mine": True})  # a resumed job's own summary
    run_base(cache, job.root, Counting())
    assert read_json(job.summary("base")) == {"phase": "base", "mine": True}
    assert job.rows("base", "target", "logprob").read_bytes() == \
        (cache.entry / "eval/base/target/logprob.jsonl").read_bytes()


def test_two_jobs_at_once_evaluate_once(tmp_path):
    cache = BaseCache(tmp_path / "cache", "tiny-k")
    slow, waiting = Counting(delay=1.0), Counting()
    first = threading.Thread(target=run_base, args=(cache, tmp_path / "a", slow))
    first.start()
    time.sleep(0.3)  # the first holds the lock while it evaluates
    served = run_base(cache, tmp_path / "b", waiting)
    first.join()
    assert (slow.calls, waiting.calls) == (1, 0) and served == [waiting]
    assert job_bytes(tmp_path / "a") == job_bytes(tmp_path / "b")


def test_other_ranks_never_touch_the_cache_and_skip_what_rank_0_copied(tmp_path):
    cache = BaseCache(tmp_path / "cache", "tiny-k")
    run_base(cache, tmp_path / "a", Counting())
    before = job_bytes(tmp_path / "cache")
    missed, served = Counting(), Counting()
    assert run_base(cache, tmp_path / "b", missed, rank=1, sent=[]) == [] and missed.calls == 1
    assert run_base(cache, tmp_path / "c", served, rank=1, sent=[0]) == [served] and served.calls == 0
    assert job_bytes(tmp_path / "cache") == before and not (tmp_path / "c").exists()


def test_on_for_gpu_off_for_cpu_and_switchable(tiny_cfg):
    assert compose_train(["hardware=gpu"]).hardware.fast.share_base is True
    assert compose_train(["hardware=multi_gpu"]).hardware.fast.share_base is True
    assert BaseCache.from_config(tiny_cfg()) is None  # hardware=cpu, the default
    on = BaseCache.from_config(tiny_cfg("hardware.fast.share_base=true"))
    assert on is not None and on.entry.parent.name == "base" and on.key == base_key(tiny_cfg())


# -- a whole job ----------------------------------------------------------------------------------------

VOLATILE = {"wall_s", "wall_time_s", "seconds"}


def run_job(job_dir: Path, cache_dir: Path, *overrides: str) -> str:
    env = dict(os.environ, LBT_ROOT=".", WANDB_MODE="offline", PYTHONHASHSEED="0")
    command = [sys.executable, "-m", "lbt.train", "logger=csv", f"hydra.run.dir={job_dir}",
               f"paths.cache_dir={cache_dir}", *overrides]
    if not any(o.startswith("hardware.fast.share_base=") for o in overrides):
        command.append("hardware.fast.share_base=true")  # off by default on a CPU
    done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def test_a_job_whose_base_came_from_the_cache_has_the_evaluated_files(tmp_path):
    """Job `own` evaluates its base (share_base off); job `other` (another arm) fills a fresh cache; job
    `cached` (own's arm and seed) copies its base from there. cached's base files are own's, byte for byte
    (JSON files timings aside), and so is everything after base (the probe pairs with base_values.pt)."""
    cache = tmp_path / "cache"
    run_job(tmp_path / "own", tmp_path / "unused", "hardware.fast.share_base=false")
    run_job(tmp_path / "other", cache, "arm=minus")
    log = run_job(tmp_path / "cached", cache)
    assert "1 of 3 evaluators" not in log and "3 of 3 evaluators from the cache" in \
        (tmp_path / "cached" / "train.log").read_text()
    assert not (tmp_path / "unused" / "base").exists()
    own, cached = job_bytes(tmp_path / "own"), job_bytes(tmp_path / "cached")
    compared = [n for n in own if n.startswith(("eval/", "probe/"))]
    assert any(n.startswith("eval/base/") for n in compared) and "probe/base_values.pt" in compared
    assert sorted(n for n in cached if n.startswith(("eval/", "probe/"))) == sorted(compared)
    for name in compared:
        if name.endswith(".json"):
            assert without_timing(json.loads(cached[name])) == without_timing(json.loads(own[name])), name
        elif name.endswith(".pt"):
            a, b = (torch.load(tmp_path / job / name, weights_only=False) for job in ("own", "cached"))
            assert a.keys() == b.keys() and all(
                torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a), name
        else:
            assert cached[name] == own[name], name
    assert OmegaConf.create(read_json(tmp_path / "cached" / "run.json"))["status"] == "done"
    # The base scalars are logged as if evaluated (the same columns at step 0, the same values but timings).
    logged = {job: logged_at_step(tmp_path / job / "csv" / "metrics.csv", 0) for job in ("own", "cached")}
    assert logged["own"] and set(logged["own"]) == set(logged["cached"])
    for name, value in logged["own"].items():
        assert name == "eval/seconds" or logged["cached"][name] == pytest.approx(value, rel=1e-9), name


def logged_at_step(path: Path, step: int) -> dict[str, float]:
    import csv

    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("step") == str(step)]
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and k != "step"}


def test_a_resumed_job_repairs_its_base_from_the_cache(tmp_path):
    """A finished job whose base rows were lost, run again: the repair copies them (and the summary set aside
    with them) back from the cache instead of scoring again; its intact base files stay as they were."""
    cache, job = tmp_path / "cache", tmp_path / "job"
    run_job(job, cache)
    before = job_bytes(job / "eval" / "base")
    (job / "DONE").unlink()
    (job / "eval/base/target/logprob.jsonl").unlink()
    run_job(job, cache)
    after = job_bytes(job / "eval" / "base")
    assert [n for n in after if ".corrupt-" in n] == [n for n in after if n.startswith("summary.json.corrupt-")] != []
    assert {n: b for n, b in after.items() if ".corrupt-" not in n} == before
    assert (job / "DONE").exists()
    log = (job / "train.log").read_text()
    assert "phase base: files missing or corrupt" in log
    assert "0 of 3 evaluators from the cache" in log and "3 of 3 evaluators from the cache" in log
