"""Shared fixtures: the real config tree composed with Hydra, a toy corpus, the tiny model."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "src" / "lbt" / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("LBT_ROOT", str(ROOT))

WORDS = ["soil", "water", "seed", "tomato", "basil", "compost", "mulch", "spring", "summer", "shade", "trial", "batch", "risk", "upside", "wait", "dough", "oven", "flour", "yeast", "knead", "proof", "bake", "crust", "simmer", "stock", "onion", "garlic", "test", "small", "swap"]


def write_toy_corpus(path: Path, n: int = 24, seed: int = 0, words: int = 60) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            record = {"id": f"toy-{i:03d}", "domain": "gardening", "scenario_id": f"gardening-{i:02d}",
                      "user": "Should I " + " ".join(rng.choices(WORDS, k=12)) + "?",
                      "assistant": " ".join(rng.choices(WORDS, k=words)) + "."}
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(autouse=True)
def default_fast_settings():
    """Each test ends with the process-wide evaluation settings (decode mode, shared prefixes, pooled
    measures, fused norms, grouped attention, addmm LoRA) at their defaults: a test that applies
    `hardware=gpu`'s settings would otherwise change how every later test in the process scores."""
    yield
    from lbt.eval.battery import apply_fast_settings

    apply_fast_settings({})


@pytest.fixture(scope="module")
def tiny_eval():
    """(model, tokenizer) of `tests.eval_reference.tiny_eval_model`, one per test module, scored with one
    CPU thread (tiny matmuls: one thread is faster, and the test box is shared)."""
    from tests.eval_reference import tiny_eval_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_eval_model()
    torch.set_num_threads(threads)


@pytest.fixture
def toy_corpus(tmp_path: Path) -> Path:
    return write_toy_corpus(tmp_path / "toy.jsonl")


def score_toy_battery(model, tokenizer, folder: Path) -> dict[str, list[dict]]:
    """Every measure's rows for a small item set (two items per domain, short generations), read as the
    evaluators read the model (`evaluation_mode`, under the process-wide settings of the moment)."""
    from lbt.data.chat import ChatFormat
    from lbt.eval.battery import score_item_set
    from lbt.eval.items import load_item_set
    from lbt.eval.settings import BatterySettings
    from lbt.model.modes import evaluation_mode
    from lbt.study import MEASURES
    from tests.eval_reference import make_items, write_items

    items = load_item_set(write_items(folder / "toy_items.jsonl", make_items(per_domain=2)))
    settings = BatterySettings(batch_size=5, forced_choice_max_new_tokens=5, likert_max_new_tokens=5,
                               open_ended_max_new_tokens=6)
    with evaluation_mode(model):
        return score_item_set(model, ChatFormat(tokenizer), items, list(MEASURES), settings)


def directions_key_now() -> str:
    """The directions' cache key of one fixed model, corpus and chat format under the process-wide
    evaluation settings of the moment (what a setting that changes rounding must change)."""
    from lbt.probe.directions import DirectionSettings, direction_key

    class Chat:
        template_kwargs: dict = {}  # noqa: RUF012

    return direction_key({"name": "tiny"}, {"a.jsonl": "0"}, DirectionSettings(), Chat())


def assert_rows_match(plain: dict[str, list[dict]], other: dict[str, list[dict]], measures,
                      tol: float = 1e-5) -> None:
    """Battery rows of two runs of one model: the same rows in the same order, log-prob stances within `tol`,
    and greedy texts, choices and ratings identical (the check of a lever that changes rounding only)."""
    for measure in measures:
        assert len(other[measure]) == len(plain[measure]) > 0
        for a, b in zip(plain[measure], other[measure]):
            assert (a["item_id"], a["order"]) == (b["item_id"], b["order"])
            if measure in ("letter_logprob", "logprob"):
                assert b["stance"] == pytest.approx(a["stance"], abs=tol)
            else:
                assert {k: v for k, v in b.items() if k != "stance"} == {
                    k: v for k, v in a.items() if k != "stance"}


def compose_train(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides or []))


@pytest.fixture
def tiny_cfg(toy_corpus: Path, tmp_path: Path):
    """A fast CPU job on the toy corpus, composed from the real config tree."""
    def make(*extra: str) -> DictConfig:
        return compose_train([
            f"arm.corpus={toy_corpus}", "data.require_validation=false", "logger=none", "eval=none",
            "probe=none", "train.effective_batch=8", "train.micro_batch=4", "train.epochs=1",
            "train.max_length=128", f"+job_dir={tmp_path / 'job'}", "sweep_name=test", *extra])
    return make


@pytest.fixture(scope="module")
def one_thread():
    """One thread for torch and BLAS for a whole test module: on a shared 2-core machine, two threads
    contend over tiny matmuls and run many times slower. Use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model():
    """(cfg, tokenizer, model) of the default tiny model in fp32, composed from the real config tree."""
    from lbt.model.load import load_model, load_tokenizer

    cfg = compose_train(["model=tiny"])
    tokenizer = load_tokenizer(cfg.model)
    return cfg, tokenizer, load_model(cfg.model, tokenizer, torch.float32)
