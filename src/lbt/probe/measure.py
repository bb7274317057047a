"""What the probe callback and the causal suite measure on prompts, with an optional intervention.

- `forced_choice_prompts`: the chat-templated forced-choice prompts of target items, both option orders,
  with the letter tokens of the pro and anti option in the configured form (`bare` "A", as a model emits it
  right after the generation header, or the original study's `leading_space` " A").
- `score_forced_choice`: per prompt, `letter_logprob` = log P(pro letter) − log P(anti letter) at the answer
  position (the last prompt token, whose output picks the first generated token) and `forced_choice` = the
  greedy decision (+1 pro, −1 anti, NaN unparsed, as in the stance battery; parsed by the stance battery's `parse_choice`) from up to
  `max_new_tokens` KV-cached greedy tokens. Both come from the same prefill. Positive = pro-change.
- `answer_activations`: residual stream at the answer position (and mean over the prompt) at every layer.
- `fluency`: perplexity of held-out neutral passages, read as the assistant's reply to a fixed neutral
  request, and the KL divergence KL(reference ‖ intervened) of the next-token distributions at those
  reply positions — the fluency cost of an intervention, measured where the intervention acts.

Interventions come in through `intervention(batch)`: a function returning a context manager for one batch
(`Batch` says which rows of the prompt list it holds and where its response and answer positions are), so
that per-row values (activation patching) line up with the batch and steering acts at the right columns.
Prompts are left-padded with position ids that count real tokens only: a row's numbers do not depend on
the rows it is batched with (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lbt.data.chat import render_conversation, render_prompt
from lbt.eval.battery import parse_choice
from lbt.probe import hooks
from lbt.probe.hooks import Positions

ORDERS = ("original", "swapped")
NEUTRAL_REQUEST = "Tell me about something you find interesting."


@dataclass(frozen=True)
class StancePrompts:
    ids: list[list[int]]
    pro_token: list[int]
    anti_token: list[int]
    pro_letter: list[str]
    anti_letter: list[str]
    item_ids: list[str]
    base_items: list[str]
    orders: list[str]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Batch:
    """One batch of an intervention-aware measurement."""

    indices: list[int]          # rows of the prompt list, in batch order
    width: int                  # padded width of the prefill
    response: Positions         # answer position and every later (generated or teacher-forced) column
    answer: Positions | None    # the answer position only (None where there is none)


Intervention = Callable[[Batch], AbstractContextManager[Any]]


def no_intervention(batch: Batch) -> AbstractContextManager[Any]:
    return nullcontext()


def letter_token(tokenizer: PreTrainedTokenizerBase, letter: str, form: str) -> int:
    if form not in ("bare", "leading_space"):
        raise ValueError(f"option_form={form!r}: use bare or leading_space")
    text = letter if form == "bare" else " " + letter
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"option {text!r} is {len(ids)} tokens in this tokenizer; letter scoring needs one")
    return int(ids[0])


def forced_choice_prompts(items: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase,
                          template_kwargs: Mapping[str, Any] | None = None, option_form: str = "bare",
                          orders: Sequence[str] = ORDERS) -> StancePrompts:
    """Both orders of every item: in `question` the pro option has pro_label; in `question_swapped` the
    letters are exchanged."""
    fields: dict[str, list] = {k: [] for k in StancePrompts.__dataclass_fields__}
    for item in items:
        fc = item["forced_choice"]
        for order in orders:
            question = fc["question"] if order == "original" else fc["question_swapped"]
            pro, anti = (fc["pro_label"], fc["anti_label"]) if order == "original" else \
                (fc["anti_label"], fc["pro_label"])
            text = render_prompt(tokenizer, question, template_kwargs)
            fields["ids"].append(tokenizer.encode(text, add_special_tokens=False))
            fields["pro_token"].append(letter_token(tokenizer, pro, option_form))
            fields["anti_token"].append(letter_token(tokenizer, anti, option_form))
            fields["pro_letter"].append(pro)
            fields["anti_letter"].append(anti)
            fields["item_ids"].append(str(item["id"]))
            fields["base_items"].append(str(item.get("base_item", item["id"])))
            fields["orders"].append(order)
    return StancePrompts(**fields)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.as_tensor(list(row))
        mask[i, width - len(row):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": position_ids.to(device)}


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (longest first), so left padding stays short."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), max(1, batch_size))]


def prompt_batch(indices: list[int], width: int) -> Batch:
    answer = torch.full((len(indices),), width - 1, dtype=torch.long)
    return Batch(indices, width, Positions.response(include_answer=True), Positions.at_index(answer, width))


@torch.no_grad()
def score_forced_choice(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: StancePrompts,
                        batch_size: int = 16, max_new_tokens: int = 1,
                        intervention: Intervention = no_intervention) -> dict[str, np.ndarray]:
    """{"letter_logprob": (n,), "forced_choice": (n,)} oriented to pro-change."""
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    letter = np.zeros(len(prompts))
    choice = np.zeros(len(prompts))
    for idx in batches([len(p) for p in prompts.ids], batch_size):
        inputs = left_pad([prompts.ids[i] for i in idx], pad, device)
        batch = prompt_batch(idx, inputs["input_ids"].shape[1])
        with intervention(batch):
            texts = _greedy(model, tokenizer, inputs, max_new_tokens, eos, letter, idx, prompts)
        for row, i in enumerate(idx):
            parsed = parse_choice(texts[row], (prompts.pro_letter[i], prompts.anti_letter[i]), final=True)
            choice[i] = 1.0 if parsed == prompts.pro_letter[i] else -1.0 if parsed == prompts.anti_letter[i] \
                else np.nan
    return {"letter_logprob": letter, "forced_choice": choice}


def mean_parsed(values: np.ndarray) -> float:
    """Mean over the parsed (non-NaN) stances; NaN when none parsed (an unparsed answer is no stance)."""
    values = np.asarray(values, dtype=float)
    parsed = values[~np.isnan(values)]
    return float(parsed.mean()) if parsed.size else float("nan")


def _greedy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, inputs: dict[str, torch.Tensor],
            max_new_tokens: int, eos: set[int], letter: np.ndarray, idx: list[int], prompts: StancePrompts
            ) -> list[str]:
    """Greedy tokens until every row has a letter (or ended); fills letter[idx] from the first step."""
    n = len(idx)
    tokens: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    step_ids, mask, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    cache = None
    for step in range(max(1, max_new_tokens)):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=max_new_tokens > 1, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        if step == 0:
            logprobs = logits.log_softmax(-1)
            for row, i in enumerate(idx):
                letter[i] = float(logprobs[row, prompts.pro_token[i]] - logprobs[row, prompts.anti_token[i]])
        chosen = logits.argmax(-1)
        for row, token in enumerate(chosen.tolist()):
            if done[row]:
                continue
            if token in eos:
                done[row] = True
                continue
            tokens[row].append(token)
            text = tokenizer.decode(tokens[row], skip_special_tokens=True)
            labels = (prompts.pro_letter[idx[row]], prompts.anti_letter[idx[row]])
            if parse_choice(text, labels, final=False) is not None:  # the battery's rule: stop once complete
                done[row] = True
        if all(done) or step + 1 >= max_new_tokens:
            break
        cache = out.past_key_values
        step_ids = chosen[:, None]
        mask = torch.cat([mask, mask.new_ones((n, 1))], dim=-1)
        positions = positions[:, -1:] + 1
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


def _answer_summariser(real: torch.Tensor, units: torch.Tensor | None):
    """reduce(hidden, layer, offset) -> (B, 2, D or 1): answer position (last column of a left-padded
    batch) and mean over the real prompt tokens, projected on units[layer] if given."""
    def summarise(h: torch.Tensor, layer: int, offset: int) -> torch.Tensor:
        h = h.float()
        if units is not None:
            h = (h @ units[layer])[..., None]
        mean = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        return torch.stack([h[:, -1], mean], dim=1).cpu()
    return summarise


@torch.no_grad()
def answer_activations(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[Sequence[int]],
                       batch_size: int = 16, units: torch.Tensor | None = None,
                       intervention: Intervention = no_intervention) -> dict[str, torch.Tensor]:
    """Per prompt and layer, at the answer position and averaged over the prompt tokens:
    with `units` (L, D), the projections {"answer": (N, L), "prompt_mean": (N, L)}; without, the
    activations themselves {"answer": (N, L, D), "prompt_mean": (N, L, D)}, float32 on CPU."""
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    n_layers = hooks.num_layers(model)
    out: dict[str, list[torch.Tensor | None]] = {"answer": [None] * len(prompt_ids),
                                                  "prompt_mean": [None] * len(prompt_ids)}
    unit_dev = units.to(device=device, dtype=torch.float32) if units is not None else None
    for idx in batches([len(p) for p in prompt_ids], batch_size):
        inputs = left_pad([prompt_ids[i] for i in idx], pad, device)
        summarise = _answer_summariser(inputs["attention_mask"].bool(), unit_dev)
        with intervention(prompt_batch(idx, inputs["input_ids"].shape[1])), \
                hooks.capture(model, reduce=summarise) as acts:
            model(**inputs, use_cache=False, logits_to_keep=1)
        stacked = torch.stack([acts[layer] for layer in range(n_layers)], dim=1)  # (B, L, 2, D|1)
        for row, i in enumerate(idx):
            out["answer"][i] = stacked[row, :, 0]
            out["prompt_mean"][i] = stacked[row, :, 1]
    result = {k: torch.stack(v) for k, v in out.items()}  # type: ignore[arg-type]
    return {k: v.squeeze(-1) for k, v in result.items()} if units is not None else result


# -- fluency ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NeutralSet:
    ids: list[list[int]]
    prompt_len: int      # the same for every row: one fixed request


def neutral_set(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                template_kwargs: Mapping[str, Any] | None = None, max_tokens: int = 128) -> NeutralSet:
    """Each passage as the assistant's reply to one fixed request, truncated to max_tokens reply tokens."""
    prompt = render_prompt(tokenizer, NEUTRAL_REQUEST, template_kwargs)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    rows = []
    for text in texts:
        _, reply = render_conversation(tokenizer, NEUTRAL_REQUEST, text, template_kwargs)
        reply_ids = tokenizer.encode(reply.rstrip("\n"), add_special_tokens=False)[:max_tokens]
        rows.append(prompt_ids + reply_ids)
    return NeutralSet(rows, len(prompt_ids))


@torch.no_grad()
def fluency(model: nn.Module, tokenizer: PreTrainedTokenizerBase, neutral: NeutralSet, batch_size: int = 8,
            reference: list[torch.Tensor] | None = None, intervention: Intervention = no_intervention,
            keep_logprobs: bool = False) -> dict[str, Any]:
    """{"perplexity", "kl" (vs reference, nats per reply token; None without one), "logprobs" (per batch,
    kept only when asked: the reference for later calls)}."""
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    p0 = neutral.prompt_len
    nll, count, kl_sum = 0.0, 0, 0.0
    kept: list[torch.Tensor] = []
    for b, start in enumerate(range(0, len(neutral.ids), batch_size)):
        rows = neutral.ids[start:start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.as_tensor(r), 1
        ids, mask = ids.to(device), mask.to(device)
        # Right padding, one fixed prompt: the reply starts at column p0 in every row; the answer position
        # p0 − 1 predicts its first token.
        batch = Batch(list(range(start, start + len(rows))), width, Positions.starting_at(p0 - 1), None)
        with intervention(batch):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logprobs = logits[:, p0 - 1:-1].float().log_softmax(-1)  # predicting columns p0 .. width-1
        targets = ids[:, p0:]
        valid = mask[:, p0:].bool()
        picked = logprobs.gather(-1, targets[..., None]).squeeze(-1)
        nll -= float(picked[valid].sum())
        count += int(valid.sum())
        flat = logprobs[valid]
        if reference is not None:
            ref = reference[b].to(flat.device, torch.float32)
            kl_sum += float((ref.exp() * (ref - flat)).sum())
        if keep_logprobs:
            kept.append(flat)
    return {"perplexity": float(np.exp(nll / max(1, count))),
            "kl": kl_sum / max(1, count) if reference is not None else None,
            "logprobs": kept if keep_logprobs else None, "tokens": count}
