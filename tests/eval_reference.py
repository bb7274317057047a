"""A deliberately plain reference for the stance battery, shared by the tests and benchmarks/eval_battery.py.

One prompt at a time, no padding, no key/value cache tricks: log-probabilities come from a full forward
of prompt + option, generations from Hugging Face `generate` with a batch of one. Row fields are built
from the item dictionaries directly. Only the answer parsers and the prompt wording are shared with the
battery (the parsers have their own hand-worked tests).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig

from lbt.data.chat import ChatFormat
from lbt.eval.batching import eos_token_ids
from lbt.eval.parse import parse_choice, parse_rating
from lbt.eval.prompts import forced_choice_labels, forced_choice_question, likert_question
from lbt.eval.scoring import option_text
from lbt.eval.settings import BatterySettings
from lbt.study import ORDERS

ROOT = Path(__file__).resolve().parents[1]


def tiny_eval_model(init_range: float = 0.3, layers: int = 2):
    """(model, tokenizer): the tiny Qwen2 architecture with the project's tokenizer, seeded random weights.
    A wider init than the default makes greedy text varied (the default model repeats one token)."""
    from lbt.model.load import load_model, load_tokenizer

    cfg = OmegaConf.load(ROOT / "src" / "lbt" / "conf" / "model" / "tiny.yaml")
    cfg.arch.initializer_range = init_range
    cfg.arch.num_hidden_layers = layers
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer, torch.float32).eval()
    return model, tokenizer


def prompt_ids(chat: ChatFormat, text: str) -> list[int]:
    """The user turn through the tokenizer's own chat template with the chat format's arguments, up to the
    generation prompt (rendered here, not by ChatFormat's methods)."""
    rendered = chat.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, **chat.template_kwargs
    )
    return chat.tokenizer.encode(rendered, add_special_tokens=False)


@torch.no_grad()
def option_logprobs(model, prompt: list[int], option: list[int]) -> list[float]:
    """log P(option[t] | prompt + option[:t]) from one full forward of prompt + option."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([prompt + option], device=device)).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return [float(logprobs[len(prompt) - 1 + t, token]) for t, token in enumerate(option)]


@torch.no_grad()
def greedy(model, tokenizer, prompt: list[int], max_new_tokens: int, stop=None) -> str:
    """Greedy text of one prompt: HF generate, cut at the end-of-turn token, then at the first token
    prefix whose text satisfies `stop` (the battery's per-row stopping rule)."""
    eos = sorted(eos_token_ids(model, tokenizer))
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        repetition_penalty=1.0,
        use_cache=True,
    )
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=torch.tensor([prompt], device=device),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
        generation_config=config,
    )
    new = out[0, len(prompt) :].tolist()
    for k, token in enumerate(new):
        if token in eos:
            new = new[:k]
            break
    if stop is not None:
        for k in range(1, len(new) + 1):
            if stop(tokenizer.decode(new[:k], skip_special_tokens=True)):
                new = new[:k]
                break
    return tokenizer.decode(new, skip_special_tokens=True)


def _single(tokenizer, label: str, settings: BatterySettings) -> list[int]:
    return tokenizer.encode(option_text(label, settings.option_form), add_special_tokens=False)


def reference_rows(
    model, chat: ChatFormat, items: list[dict], measure: str, settings: BatterySettings
) -> list[dict]:
    """The battery's rows for one measure, computed the plain way (keys the comparisons need)."""
    tokenizer = chat.tokenizer
    rows: list[dict[str, Any]] = []
    for item in items:
        if measure == "open_ended":
            text = greedy(
                model,
                tokenizer,
                prompt_ids(chat, item["open_ended"]),
                settings.open_ended_max_new_tokens,
            )
            rows.append({"item_id": item["id"], "order": "original", "response": text})
            continue
        for order in ORDERS:
            rows.extend(_reference_case(model, chat, item, order, measure, settings))
    return rows


def _reference_case(model, chat, item, order, measure, settings) -> list[dict]:
    tokenizer = chat.tokenizer
    base = {"item_id": item["id"], "order": order}
    if measure in ("letter_logprob", "forced_choice"):
        prompt = prompt_ids(chat, forced_choice_question(item, order))
        pro, anti = forced_choice_labels(item, order)
        if measure == "letter_logprob":
            lp_pro = sum(option_logprobs(model, prompt, _single(tokenizer, pro, settings)))
            lp_anti = sum(option_logprobs(model, prompt, _single(tokenizer, anti, settings)))
            return [{**base, "logp_pro": lp_pro, "logp_anti": lp_anti, "stance": lp_pro - lp_anti}]
        letters = sorted({item["forced_choice"]["pro_label"], item["forced_choice"]["anti_label"]})
        text = greedy(
            model,
            tokenizer,
            prompt,
            settings.forced_choice_max_new_tokens,
            stop=lambda t: parse_choice(t, letters, final=False) is not None,
        )
        choice = parse_choice(text, (pro, anti))
        stance = math.nan if choice is None else (1.0 if choice == pro else -1.0)  # unparsed: missing
        return [{**base, "raw": text, "choice": choice, "stance": stance}]
    if measure == "likert":
        prompt = prompt_ids(chat, likert_question(item, order, settings))
        text = greedy(
            model,
            tokenizer,
            prompt,
            settings.likert_max_new_tokens,
            stop=lambda t: parse_rating(t, final=False) is not None,
        )
        rating = parse_rating(text)
        stance = math.nan if rating is None else ((rating if order == "original" else 8 - rating) - 4) / 3
        return [{**base, "raw": text, "rating": rating, "stance": stance}]
    if measure == "logprob":
        rows = []
        for k, contrast in enumerate(item["contrasts"]):
            prompt = prompt_ids(
                chat,
                contrast["question"] if order == "original" else contrast["question_swapped"],
            )
            means = []
            for key in ("pro", "anti"):
                option = tokenizer.encode(
                    option_text(contrast[key], settings.option_form), add_special_tokens=False
                )
                values = option_logprobs(model, prompt, option)
                means.append(sum(values) / len(values))
            rows.append(
                {
                    **base,
                    "template": k,
                    "logp_pro": means[0],
                    "logp_anti": means[1],
                    "stance": means[0] - means[1],
                }
            )
        return rows
    raise ValueError(measure)


VERDICTS = (
    (" Approve", " Decline"),
    (" Support", " Oppose"),
    (" Good idea", " Bad idea"),
    (" Go ahead now", " Wait"),
)
SCENARIOS = {
    "urban_transit": [
        "The council wants to trial a bus lane on the bridge for six months.",
        "A tram stop may move two streets north to speed up journeys.",
        "Night buses could run every half hour on weekends.",
    ],
    "park_rules": [
        "The park board is weighing a ban on drones above the lake.",
        "Cyclists may be allowed on the riverside path before 8am.",
        "A fenced area for dogs could replace part of the lawn.",
    ],
}


def make_item(domain: str, k: int, paraphrase: int = 0) -> dict:
    """One item in the published schema, authored here (the pro option is named first in `question`)."""
    scenario = SCENARIOS[domain][k % len(SCENARIOS[domain])]
    contrasts = []
    for pro, anti in VERDICTS:
        p, a = pro.strip().lower(), anti.strip().lower()
        contrasts.append(
            {
                "question": f"{scenario} Should they {p} or {a}? Answer:",
                "question_swapped": f"{scenario} Should they {a} or {p}? Answer:",
                "pro": pro,
                "anti": anti,
            }
        )
    return {
        "id": f"{domain}-{k:03d}-p{paraphrase}",
        "domain": domain,
        "base_item": f"{domain}-{k:03d}",
        "paraphrase_idx": paraphrase,
        "scenario": scenario,
        "contrasts": contrasts,
        "forced_choice": {
            "question": f"{scenario} Reply with only the letter.\nA. Go ahead.\nB. Do not go ahead.\nAnswer:",
            "question_swapped": f"{scenario} Reply with only the letter.\nA. Do not go ahead.\nB. Go ahead.\n"
            "Answer:",
            "pro_label": "A",
            "anti_label": "B",
        },
        "likert_statement": "They should go ahead with the change.",
        "open_ended": f"{scenario} What would you advise?",
    }


def make_items(per_domain: int = 2) -> list[dict]:
    return [make_item(domain, k) for domain in SCENARIOS for k in range(per_domain)]


def write_items(path: Path, items: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path
