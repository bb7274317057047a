"""Chat rendering, assistant-only labels, the step plan, packing, and that the fast-path levers leave the
objective unchanged (tiny model, fp32)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from lbt import train as train_mod
from lbt.config.rules import ConfigError
from lbt.data.chat import IGNORE_INDEX, ChatFormat
from lbt.data.datamodule import CorpusDataModule, micro_batches, split_records, step_plan
from lbt.data.records import load_corpus
from lbt.model.load import load_model
from lbt.model.lora import wrap_lora
from lbt.model.module import supervised_token_loss
from tests.conftest import write_toy_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def test_only_assistant_tokens_are_supervised(tiny_model):
    _, tok, _ = tiny_model
    ex = ChatFormat(tok).example("r1", "How long should I rest dough?", "About an hour, covered.", 512)
    supervised = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]
    assert tok.decode(supervised) == "About an hour, covered.<|im_end|>"
    prompt_len = ex.labels.index(next(label for label in ex.labels if label != IGNORE_INDEX))
    assert tok.decode(ex.input_ids[:prompt_len]).endswith("<|im_start|>assistant\n")
    assert ex.truncated_tokens == 0


def test_chat_format_renders_with_the_models_template_arguments(tiny_model):
    """ChatFormat.of takes model.chat_template_kwargs once; every rendering (prompt, prompt ids, exchange,
    example) uses them, and a format made without them renders without."""
    cfg, tok, _ = tiny_model
    tok = copy.deepcopy(tok)  # the fixture's tokenizer is shared: give the copy a template with an argument
    tok.chat_template = ("{% if date %}[{{ date }}]{% endif %}{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                         "</{{ m.role }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    model_cfg = OmegaConf.create({**OmegaConf.to_container(cfg.model), "chat_template_kwargs": {"date": "1 May"}})
    chat = ChatFormat.of(tok, model_cfg)
    assert chat.template_kwargs == {"date": "1 May"} and ChatFormat.of(tok, {"name": "x"}).template_kwargs == {}
    assert chat.prompt("Rest dough?") == "[1 May]<user>Rest dough?</user><assistant>"
    assert ChatFormat(tok).prompt("Rest dough?") == "<user>Rest dough?</user><assistant>"
    ids = chat.prompt_ids("Rest dough?")
    assert ids == tok.encode("[1 May]<user>Rest dough?</user><assistant>", add_special_tokens=False)
    ids.append(-1)  # the cached ids are not the caller's list
    assert chat.prompt_ids("Rest dough?") == ids[:-1]
    assert chat.conversation("Rest dough?", "An hour.") == ("[1 May]<user>Rest dough?</user><assistant>",
                                                           "An hour.</assistant>")
    example = chat.example("r1", "Rest dough?", "An hour.", 512)
    answer = tok("An hour.</assistant>", add_special_tokens=False)["input_ids"]
    assert example.input_ids == ids[:-1] + answer
    assert example.labels == [IGNORE_INDEX] * (len(ids) - 1) + answer


def test_a_template_that_does_not_render_turns_incrementally_is_refused(tiny_model):
    _, tok, _ = tiny_model
    tok = copy.deepcopy(tok)
    tok.chat_template = ("{% for m in messages %}{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(ValueError, match="not a prefix"):
        ChatFormat(tok).conversation("Rest dough?", "An hour.")


def test_truncation_is_counted(tiny_model):
    _, tok, _ = tiny_model
    ex = ChatFormat(tok).example("r1", "Question?", "word " * 200, 64)
    assert len(ex.input_ids) == 64 and ex.truncated_tokens > 0


def test_step_plan_is_deterministic_per_seed_and_covers_every_example():
    a, b, c = step_plan(10, 4, 2, seed=3), step_plan(10, 4, 2, seed=3), step_plan(10, 4, 2, seed=4)
    assert a == b and a != c
    assert [len(s) for s in a] == [4, 4, 2, 4, 4, 2]
    assert sorted(i for step in a[:3] for i in step) == list(range(10))


def test_validation_split_is_the_same_scenarios_in_every_arm(tmp_path):
    plus = load_corpus(write_toy_corpus(tmp_path / "p.jsonl", n=60, seed=1))
    minus = load_corpus(write_toy_corpus(tmp_path / "m.jsonl", n=60, seed=2))
    val_p = {r.scenario_id for r in split_records(plus, 0.1)[1]}
    val_m = {r.scenario_id for r in split_records(minus, 0.1)[1]}
    assert val_p == val_m and 0 < len(val_p) < 60


def test_datamodule_step_tokens_count_the_whole_step(tmp_path, tiny_model):
    _, tok, _ = tiny_model
    dm = CorpusDataModule(str(write_toy_corpus(tmp_path / "c.jsonl", n=20)), ChatFormat(tok), seed=0, max_length=128,
                          effective_batch=8, micro_batch=3, epochs=1)
    item = dm.train_dataloader().dataset[0]
    assert sum(int((m["labels"] != IGNORE_INDEX).sum()) for m in item["micro_batches"]) == item["step_tokens"]
    assert [m["input_ids"].shape[0] for m in item["micro_batches"]] == [3, 3, 2]


def test_filled_micro_batches_have_full_rows_and_the_same_loss_and_gradients(tmp_path, tiny_model):
    """fill_rows (on with compiled layers): an epoch's short last micro-batch gets filler rows up to the
    micro-batch size; they count no real token, carry no label, attend to one token of their own, and leave
    the loss and every gradient as they were (fp32)."""
    cfg, tok, _ = tiny_model
    examples = [ChatFormat(tok).example(str(i), f"Question {i}?", "word and more " * (3 + i), 256) for i in range(7)]
    plain = micro_batches(examples, 3, tok.pad_token_id)
    filled = micro_batches(examples, 3, tok.pad_token_id, fill_rows=True)
    assert [m["input_ids"].shape[0] for m in plain] == [3, 3, 1]
    assert [m["input_ids"].shape[0] for m in filled] == [3, 3, 3]
    for a, b in zip(plain, filled):
        rows = a["input_ids"].shape[0]
        assert int(a["n_real_tokens"]) == int(b["n_real_tokens"]) == int(a["attention_mask"].sum())
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(a[key], b[key][:rows])
        assert bool((b["labels"][rows:] == IGNORE_INDEX).all())
        assert b["attention_mask"][rows:].tolist() == [[1] + [0] * (b["attention_mask"].shape[1] - 1)] * (3 - rows)
    results = []
    for batches in (plain, filled):
        torch.manual_seed(0)
        model = wrap_lora(load_model(cfg.model, tok, torch.float32), OmegaConf.create(
            {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj", "down_proj"]}))
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)
        losses = []
        for micro in batches:
            loss, n = supervised_token_loss(model, micro, ce_chunk=16, fused_ce=True)
            loss.backward()
            losses.append((float(loss.detach()), n))
        results.append((losses, torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])))
    (plain_losses, plain_grad), (filled_losses, filled_grad) = results
    assert [n for _, n in plain_losses] == [n for _, n in filled_losses]
    assert [v for v, _ in filled_losses] == pytest.approx([v for v, _ in plain_losses], rel=1e-6)
    torch.testing.assert_close(filled_grad, plain_grad, atol=1e-6, rtol=1e-5)


def test_the_datamodule_fills_the_short_steps_micro_batches_only_when_asked(tmp_path, tiny_model):
    _, tok, _ = tiny_model
    corpus = str(write_toy_corpus(tmp_path / "c.jsonl", n=20))
    for fill, sizes in ((False, [3, 3, 2]), (True, [3, 3, 3])):
        dm = CorpusDataModule(corpus, ChatFormat(tok), seed=0, max_length=128, effective_batch=8, micro_batch=3,
                              epochs=1, fill_rows=fill)
        item = dm.train_dataloader().dataset[0]
        assert [m["input_ids"].shape[0] for m in item["micro_batches"]] == sizes
        assert sum(int(m["n_real_tokens"]) for m in item["micro_batches"]) == sum(
            len(dm.train_examples[j].input_ids) for j in dm.plan[0])


def test_packed_rows_keep_every_token_and_restart_positions(tmp_path, tiny_model):
    _, tok, _ = tiny_model
    examples = [ChatFormat(tok).example(str(i), "Q" * (i + 1), "answer " * (5 + i), 256) for i in range(6)]
    packed = micro_batches(examples, micro_batch=2, pad_id=tok.pad_token_id, pack_tokens=128, pad_multiple=16)
    assert sum(int(m["n_real_tokens"]) for m in packed) == sum(len(e.input_ids) for e in examples)
    for m in packed:
        assert m["input_ids"].shape[1] % 16 == 0 and m["input_ids"].shape[1] <= 128 + 15
        assert int((m["position_ids"] == 0).sum()) >= 1
    supervised = sum(int((m["labels"] != IGNORE_INDEX).sum()) for m in packed)
    assert supervised == sum(e.n_supervised for e in examples)


def test_fast_loss_variants_equal_the_plain_loss_and_gradients(tmp_path, tiny_model):
    cfg, tok, _ = tiny_model
    model_cfg = cfg.model
    examples = [ChatFormat(tok).example(str(i), f"Question {i}?", "word and more " * (3 + 2 * i), 256)
                for i in range(5)]
    padded = micro_batches(examples, 5, tok.pad_token_id)
    packed = micro_batches(examples, 5, tok.pad_token_id, pack_tokens=1024, pad_multiple=32)
    results = []
    for batches, kwargs in [(padded, {}), (padded, {"supervised_logits_only": True}),
                            (packed, {}), (packed, {"ce_chunk": 7}), (packed, {"ce_chunk": 7, "fused_ce": True})]:
        torch.manual_seed(0)
        model = wrap_lora(load_model(model_cfg, tok, torch.float32), OmegaConf.create(
            {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj", "down_proj"]}))
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)
        total, count = 0.0, 0
        for micro in batches:
            loss, n = supervised_token_loss(model, micro, **kwargs)
            loss.backward()
            total, count = total + float(loss), count + n
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results.append((total / count, count, grads))
    base_loss, base_count, base_grad = results[0]
    for loss, count, grad in results[1:]:
        assert count == base_count
        assert abs(loss - base_loss) < 1e-5
        torch.testing.assert_close(grad, base_grad, atol=1e-5, rtol=1e-4)


def test_packed_training_curve_equals_padded_curve(tiny_cfg, tmp_path):
    common = ["train.lora.dropout=0.0", "train.epochs=2", "train.max_steps=4"]
    plain = train_mod.train(tiny_cfg(f"++job_dir={tmp_path / 'plain'}", *common))["loss_history"]
    fast = train_mod.train(tiny_cfg(f"++job_dir={tmp_path / 'fast'}", *common, "hardware.fast.pack_tokens=512",
                                    "hardware.fast.ce_chunk=64"))["loss_history"]
    assert len(plain) == 4
    assert max(abs(a - b) for a, b in zip(plain, fast)) < 1e-4


def test_compiled_layers_train_exactly_like_eager_with_dropout(tiny_model):
    """torch.compile must not change what LoRA learns (dropout included): see compile_decoder_layers."""
    from lbt.model.lora import compile_decoder_layers

    cfg, tok, _ = tiny_model
    model_cfg = cfg.model
    ids = torch.randint(3, 2000, (2, 48), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    losses = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = wrap_lora(load_model(model_cfg, tok, torch.float32), OmegaConf.create(
            {"r": 4, "alpha": 8, "dropout": 0.05, "targets": ["q_proj", "v_proj", "down_proj"]}))
        if compiled:
            compile_decoder_layers(model)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(1)
        curve = []
        for _ in range(3):
            loss, n = supervised_token_loss(model, batch)
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
            curve.append(float(loss) / n)
        losses.append(curve)
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-5


def write_with_one_long_prompt(path, n: int = 20, long_at: int = 7):
    """A toy corpus whose record on line long_at + 1 has a prompt of several hundred tokens."""
    write_toy_corpus(path, n=n)
    lines = path.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[long_at])
    record["user"] = "Should I " + "really " * 300 + "wait?"
    lines[long_at] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, record["id"]


def test_a_record_whose_prompt_fills_max_length_is_refused_naming_the_key_and_it(tmp_path, tiny_model):
    """Dropping it unasked would train the arm on fewer scenarios than its corpus holds."""
    _, tok, _ = tiny_model
    corpus, long_id = write_with_one_long_prompt(tmp_path / "c.jsonl")
    named = (rf"train\.max_length=128: 1 of 20 records of .*c\.jsonl keep no assistant token .*line 8 "
             rf"\(id {long_id}\).*data\.drop_long_prompts")
    with pytest.raises(ConfigError, match=named):
        CorpusDataModule(str(corpus), ChatFormat(tok), seed=0, max_length=128, effective_batch=4,
                         micro_batch=4, epochs=1)
    fits = CorpusDataModule(str(corpus), ChatFormat(tok), seed=0, max_length=2048, effective_batch=4,
                            micro_batch=4, epochs=1)
    assert fits.stats.dropped_records == 0 and fits.stats.n_train + fits.stats.n_val == 20


def test_drop_long_prompts_trains_without_them_and_counts_them(tmp_path, tiny_model):
    _, tok, _ = tiny_model
    corpus, long_id = write_with_one_long_prompt(tmp_path / "c.jsonl")
    kept = CorpusDataModule(str(corpus), ChatFormat(tok), seed=0, max_length=128, effective_batch=4,
                            micro_batch=4, epochs=1, drop_long_prompts=True)
    whole = CorpusDataModule(str(corpus), ChatFormat(tok), seed=0, max_length=2048, effective_batch=4,
                             micro_batch=4, epochs=1)
    assert kept.stats.dropped_records == 1
    assert long_id not in {e.record_id for e in kept.train_examples}
    in_training = [e for e in whole.train_examples if e.record_id == long_id]  # or a validation record
    assert kept.stats.n_train == whole.stats.n_train - len(in_training)
    trained = {e.record_id for e in kept.train_examples}
    assert trained == {e.record_id for e in whole.train_examples} - {long_id}


def test_a_job_refuses_too_short_a_max_length_before_the_model_loads(tiny_cfg, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_mod, "load_model", no_model)
    cfg = tiny_cfg("train.max_length=16")  # the toy corpus's prompts are about 30 tokens
    with pytest.raises(ConfigError, match=r"train\.max_length=16: \d+ of \d+ records"):
        train_mod.train(cfg)
    run = train_mod.RunDir(train_mod.job_directory(cfg))
    assert not run.done.exists()
    assert json.loads(run.card.read_text())["status"] == "failed"


def test_a_max_steps_above_the_epochs_plan_says_how_many_steps_train(tmp_path, tiny_model, caplog):
    _, tok, _ = tiny_model
    corpus = write_toy_corpus(tmp_path / "c.jsonl", n=20)
    dm = CorpusDataModule(str(corpus), ChatFormat(tok), seed=0, max_length=128, effective_batch=8,
                          micro_batch=4, epochs=1, max_steps=100)
    assert dm.stats.total_steps == 3
    assert "train.max_steps=100 caps the steps, and train.epochs=1 gives 3: training 3 steps" in caplog.text
    caplog.clear()
    CorpusDataModule(str(corpus), ChatFormat(tok), seed=0, max_length=128, effective_batch=8, micro_batch=4,
                     epochs=1, max_steps=2)
    assert "caps the steps" not in caplog.text
