"""Direction extraction: planted directions are recovered with the pro-change sign, the user-only control
sits at chance when user turns are shared, the cache key and lock compute each direction set once."""

from __future__ import annotations

import json
import multiprocessing
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lbt.data.chat import ChatFormat
from lbt.data.records import file_sha256
from lbt.probe import directions as dirs
from lbt.probe.directions import DirectionSettings
from lbt.study import MINUS, PLUS
from tests.conftest import compose_train

CAUTIOUS = ["wait", "test", "risk", "careful", "slowly", "check", "doubt", "small", "trial"]
EAGER = ["now", "jump", "upside", "fast", "bold", "switch", "try", "today", "regret"]
SHARED = ["soil", "water", "seed", "tomato", "basil", "compost", "oven", "flour", "dough", "bake"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_paired_corpora(folder: Path, n: int = 12, seed: int = 0) -> dict[str, Path]:
    """The plus/minus corpora (files frame_plus/frame_minus.jsonl) with the same user prompt per scenario
    and framed assistant turns; {arm name: path}, as get_directions takes them."""
    rng = random.Random(seed)
    users = ["Should I change my " + " ".join(rng.choices(SHARED, k=8)) + "?" for _ in range(n)]
    paths = {}
    for arm, words in ((PLUS, CAUTIOUS), (MINUS, EAGER)):
        path = folder / arm.corpus_file
        with open(path, "w", encoding="utf-8") as handle:
            for i, user in enumerate(users):
                text = " ".join(rng.choices(words + SHARED, k=30)) + "."
                handle.write(json.dumps({"id": f"{arm.corpus}-{i}", "domain": "gardening", "scenario_id": f"s{i:02d}",
                                         "user": user, "assistant": text}) + "\n")
        paths[arm.name] = path
    return paths


def planted(n: int = 40, layers: int = 3, dim: int = 16, seed: int = 0):
    """Paired activations: a shared per-scenario vector + noise; FRAME− is shifted along w by a
    layer-dependent amount (none, strong, medium)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=g)
    w = w / w.norm()
    scenario = torch.randn(n, layers, dim, generator=g)
    shift = torch.tensor([0.0, 6.0, 2.0])[:layers, None] * w
    plus = scenario + 0.3 * torch.randn(n, layers, dim, generator=g)
    minus = scenario + 0.3 * torch.randn(n, layers, dim, generator=g) + shift
    shared_user = torch.randn(n, layers, dim, generator=g)
    acts_plus = {"assistant_mean": plus, "assistant_last": plus, "user_mean": shared_user}
    acts_minus = {"assistant_mean": minus, "assistant_last": minus, "user_mean": shared_user.clone()}
    scen = [f"s{i}" for i in range(n)]
    return acts_plus, acts_minus, scen, w


@pytest.fixture(scope="module")
def fitted():
    plus, minus, scen, w = planted()
    return plus, minus, w, dirs.fit_directions(plus, minus, scen, scen)


def test_planted_direction_is_recovered_pointing_to_minus(fitted):
    plus, minus, w, fit = fitted
    v = fit["variants"]["assistant_mean"]
    cos = v["unit"] @ w
    assert cos[1] > 0.95 and cos[2] > 0.8  # sign: towards FRAME− (pro-change)
    assert v["accuracy"][1] > 0.9 and v["accuracy"][0] < 0.75
    assert fit["l_star"]["assistant_mean"] == 1
    assert v["consistency"][1] > v["consistency"][0]
    # Fully paired corpora: paired mean of differences == difference of class means.
    torch.testing.assert_close(v["paired_unit"], v["unit"], atol=1e-5, rtol=0)
    torch.testing.assert_close(v["norm"], (minus["assistant_mean"].mean(0) - plus["assistant_mean"].mean(0)).norm(dim=-1))
    assert v["norm"][1] == pytest.approx(6.0, rel=0.1)


def test_user_only_control_is_at_chance_when_user_turns_are_shared(fitted):
    fit = fitted[3]
    user = fit["variants"]["user_mean"]
    # Identical features in both arms: each held-out scenario's two rows get one prediction → exactly 1/2.
    assert user["accuracy"] == [0.5, 0.5, 0.5]
    assert float(user["norm"].max()) == 0.0 and float(user["unit"].abs().max()) == 0.0
    assert user["consistency"] == [0.0, 0.0, 0.0]


def test_mean_pairwise_cosine_matches_brute_force():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(2)).double()
    u = x / x.norm(dim=1, keepdim=True)
    cos = u @ u.T
    brute = (cos.sum() - cos.diagonal().sum()) / (6 * 5)
    assert dirs.mean_pairwise_cosine(x) == pytest.approx(float(brute), abs=1e-9)
    assert dirs.mean_pairwise_cosine(torch.ones(3, 4)) == pytest.approx(1.0)
    assert dirs.mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)


def test_cohens_d_by_hand():
    # means 3 and 1, variances 1 and 1 (ddof=1) → pooled SD 1 → d = 2
    assert dirs.cohens_d(np.array([2.0, 3.0, 4.0]), np.array([0.0, 1.0, 2.0])) == pytest.approx(2.0)
    assert dirs.cohens_d(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.0


def test_best_layer_tie_breaks():
    assert dirs.best_layer([0.6, 0.9, 0.8], [5, 1, 9]) == 1  # best accuracy wins
    assert dirs.best_layer([1.0, 1.0, 1.0], [2.0, -7.0, 3.0]) == 1  # tie → larger |separation|
    assert dirs.best_layer([1.0, 1.0, 0.5], [4.0, 4.0, 9.0]) == 0  # full tie → earlier layer
    assert dirs.best_layer([float("nan"), 0.7], [1.0, 1.0]) == 1


def test_random_directions_are_unit_and_covariance_matched(fitted):
    w = fitted[2]
    d = dirs.Directions({**fitted[3], "key": "k", "settings": {"variant": "assistant_mean"}})
    g = torch.Generator().manual_seed(0)
    iso = d.random(1, 200, "isotropic", g)
    cov = d.random(1, 200, "covariance", g)
    torch.testing.assert_close(iso.norm(dim=1), torch.ones(200))
    torch.testing.assert_close(cov.norm(dim=1), torch.ones(200))
    # The pooled activations vary most along w at layer 1 (the class split): covariance-matched directions
    # lean towards w far more than isotropic ones.
    assert (cov @ w).abs().mean() > 2 * (iso @ w).abs().mean()


def test_cache_key_depends_on_model_corpus_settings_and_chat_format(tiny_model):
    cfg = compose_train(["model=tiny"]).model
    chat = ChatFormat(tiny_model[1])
    ident = dirs.model_identity(cfg, torch.float32)
    s = DirectionSettings()
    # get_directions keys the corpora's sha256 by corpus name (frame_plus, frame_minus), not by arm name.
    base = dirs.direction_key(ident, {"frame_plus": "a", "frame_minus": "b"}, s, chat)
    assert base == dirs.direction_key(dict(ident), {"frame_plus": "a", "frame_minus": "b"}, DirectionSettings(),
                                      ChatFormat(tiny_model[1], {}))
    assert base.startswith("tiny-")
    assert base != dirs.direction_key(ident, {"frame_plus": "a", "frame_minus": "c"}, s, chat)
    assert base != dirs.direction_key(dirs.model_identity(cfg, torch.bfloat16), {"frame_plus": "a",
                                                                                  "frame_minus": "b"}, s, chat)
    other = compose_train(["model=tiny", "model.init_seed=1"]).model
    assert base != dirs.direction_key(dirs.model_identity(other, torch.float32),
                                      {"frame_plus": "a", "frame_minus": "b"}, s, chat)
    wider = compose_train(["model=tiny", "model.arch.hidden_size=128"]).model
    assert dirs.model_identity(wider, torch.float32)["arch_sha256"] != ident["arch_sha256"]
    assert base != dirs.direction_key(ident, {"frame_plus": "a", "frame_minus": "b"},
                                      DirectionSettings(max_length=64), chat)
    # Dialogues rendered with other template arguments are other activations.
    assert base != dirs.direction_key(ident, {"frame_plus": "a", "frame_minus": "b"}, s,
                                      ChatFormat(tiny_model[1], {"date_string": "26 Jul 2024"}))


def _compute_with_counter(cache_dir: str, counter: str) -> None:
    def compute():
        with open(counter, "a") as handle:
            handle.write("computed\n")
        time.sleep(0.5)
        return {"variants": {}, "l_star": {}, "value": 42}
    payload = dirs.load_or_compute(cache_dir, "k", compute)
    assert payload["value"] == 42 and payload["key"] == "k"


def test_parallel_jobs_compute_once(tmp_path):
    counter = tmp_path / "counter.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_compute_with_counter, args=(str(tmp_path), str(counter))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text().splitlines() == ["computed"]
    assert (tmp_path / "directions" / "k.pt").exists() and (tmp_path / "directions" / "k.json").exists()
    assert not list((tmp_path / "directions").glob("*.tmp"))


def test_tiny_model_end_to_end_and_cached(tiny_model, tmp_path, monkeypatch):
    cfg, tokenizer, model = tiny_model
    corpora = write_paired_corpora(tmp_path)
    settings = DirectionSettings(max_length=96, batch_size=5)
    d = dirs.get_directions(model, ChatFormat(tokenizer), cfg.model, corpora, tmp_path / "cache", settings)
    n_layers = cfg.model.arch.num_hidden_layers
    assert d.n_layers == n_layers and d.hidden_size == cfg.model.arch.hidden_size
    assert 0 <= d.l_star() < n_layers
    torch.testing.assert_close(d.unit().norm(dim=1), torch.ones(n_layers))
    # Shared user prompts: the user-only class means coincide up to float rounding of batch shapes.
    assert float(d.norm("user_mean").max()) < 1e-4 * float(d.norm().max())
    assert max(d.accuracy("user_mean")) <= 0.6
    summary = json.loads((tmp_path / "cache" / "directions" / f"{d.key}.json").read_text())
    assert summary["l_star"]["assistant_mean"] == d.l_star() and summary["n_pairs"] == 12
    # Keyed by the corpus files' names, as before the arms were renamed (issue 16): old caches stay valid.
    shas = {path.stem: file_sha256(path) for path in corpora.values()}
    assert set(shas) == {"frame_plus", "frame_minus"}
    assert d.key == dirs.direction_key(dirs.model_identity(cfg.model, next(model.parameters()).dtype), shas,
                                       settings, ChatFormat(tokenizer))
    # Second call: from the cache, no forward pass.
    monkeypatch.setattr(dirs, "corpus_activations", lambda *a, **k: pytest.fail("recomputed"))
    again = dirs.get_directions(model, ChatFormat(tokenizer), cfg.model, corpora, tmp_path / "cache", settings)
    torch.testing.assert_close(again.unit(), d.unit())


def test_batching_does_not_change_activations(tiny_model, tmp_path):
    _, tokenizer, model = tiny_model
    corpora = write_paired_corpora(tmp_path, n=5)
    from lbt.data.records import load_corpus
    records = load_corpus(corpora["plus"])
    one = dirs.corpus_activations(model, ChatFormat(tokenizer), records, DirectionSettings(max_length=96, batch_size=1))
    many = dirs.corpus_activations(model, ChatFormat(tokenizer), records, DirectionSettings(max_length=96, batch_size=4))
    for summary in dirs.SUMMARIES:
        torch.testing.assert_close(one[summary], many[summary], atol=1e-4, rtol=1e-4)


def test_missing_corpus_is_a_clear_error(tiny_model, tmp_path):
    cfg, tokenizer, model = tiny_model
    with pytest.raises(FileNotFoundError, match="corpora.plus"):
        dirs.get_directions(model, ChatFormat(tokenizer), cfg.model, {"plus": tmp_path / "nope.jsonl",
                                                          "minus": tmp_path / "nope2.jsonl"}, tmp_path)
    with pytest.raises(ValueError, match="variant"):
        dirs.get_directions(model, ChatFormat(tokenizer), cfg.model, {}, tmp_path, DirectionSettings(variant="bogus"))


def test_probe_accuracies_on_workers_equal_the_serial_ones(monkeypatch):
    """The probes of every summary and layer may fit on worker processes (`lbt.probe.accuracy`); each fit
    uses one BLAS thread there and here, so the accuracies, and so ℓ*, are the same numbers. Features wide
    enough for the workers, with a class difference that grows with the layer."""
    from lbt.probe import accuracy

    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(40), np.ones(40)]
    groups = [f"s{i % 20}" for i in range(80)]
    width = accuracy.PARALLEL_MIN_FEATURES
    features = [rng.normal(size=(80, width)) + 0.02 * layer * y[:, None] for layer in range(5)]
    serial = accuracy.probe_accuracies(features, y, groups, workers=1)
    spawned = []
    real = accuracy.probe_accuracy

    def counted(*args, **kwargs):  # runs in this process only when the fits are not on workers
        spawned.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(accuracy, "probe_accuracy", counted)
    on_workers = accuracy.probe_accuracies(features, y, groups, workers=2)
    assert spawned == []  # the fits ran on the workers (a worker appends to its own copy of the list)
    assert on_workers == serial
    assert serial[-1] > serial[0]
    narrow = [x[:, :8] for x in features]
    assert accuracy.probe_accuracies(narrow, y, groups, workers=2) == [real(x, y, groups) for x in narrow]
    assert len(spawned) == 5  # too narrow for workers: fitted here
