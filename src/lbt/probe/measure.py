"""What the probe callback and the causal suite measure on prompts, with an optional intervention.

- `forced_choice_prompts`: the stance battery's forced-choice questions (`lbt.eval.prompts.choice_cases`:
  chat-templated, both option orders, the pro and anti letter tokens in the configured form, `bare` "A"
  as a model emits it right after the generation header, or the original study's `leading_space` " A").
- `score_forced_choice`: per prompt, `letter_logprob` = log P(pro letter) − log P(anti letter) at the answer
  position (the last prompt token, whose output picks the first generated token) and `forced_choice` = the
  greedy decision (+1 pro, −1 anti, NaN unparsed) from up to `max_new_tokens` greedy tokens. Both come
  from the battery's own requests through the scoring engine (`lbt.eval.measures.choice_requests`: the
  same prompts, end tokens, stop rule and parser), so a steered stance (H3) and the battery's stance (H1)
  are the same measurement. Positive = pro-change.
- `answer_activations`: residual stream at the answer position (and mean over the prompt) at every layer.
- `fluency`: perplexity of held-out neutral passages, read as the assistant's reply to a fixed neutral
  request, and the KL divergence KL(reference ‖ intervened) of the next-token distributions at those
  reply positions — the fluency cost of an intervention, measured where the intervention acts.

Interventions come in through `intervention(batch)`: a function returning a context manager for one batch
(`Batch` says which rows of the prompt list it holds and where its response and answer positions are), so
that per-row values (activation patching) line up with the batch and steering acts at the right columns.
The engine batches, left-pads (position ids count real tokens only) and restores the order: a row's
numbers do not depend on the rows it is batched with (up to float rounding).
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

from lbt.data.chat import ChatFormat
from lbt.eval.items import as_item_set
from lbt.eval.measures import choice_requests
from lbt.eval.prompts import ChoiceCase, choice_cases, choice_stance
from lbt.eval.scoring import Engine, PaddedBatch
from lbt.probe import hooks
from lbt.probe.hooks import Positions
from lbt.study import ORDERS

NEUTRAL_REQUEST = "Tell me about something you find interesting."


@dataclass(frozen=True)
class StancePrompts:
    """Forced-choice questions, one per (item, order), with per-question views the callers index."""

    cases: list[ChoiceCase]

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def ids(self) -> list[list[int]]:
        return [case.prompt for case in self.cases]

    @property
    def pro_token(self) -> list[int]:
        return [case.tokens[0] for case in self.cases]

    @property
    def anti_token(self) -> list[int]:
        return [case.tokens[1] for case in self.cases]

    @property
    def pro_letter(self) -> list[str]:
        return [case.labels[0] for case in self.cases]

    @property
    def anti_letter(self) -> list[str]:
        return [case.labels[1] for case in self.cases]

    @property
    def item_ids(self) -> list[str]:
        return [str(case.item["id"]) for case in self.cases]

    @property
    def base_items(self) -> list[str]:
        return [str(case.item.get("base_item", case.item["id"])) for case in self.cases]

    @property
    def orders(self) -> list[str]:
        return [case.order for case in self.cases]


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


def forced_choice_prompts(items: Sequence[Mapping[str, Any]], chat: ChatFormat, option_form: str = "bare",
                          orders: Sequence[str] = ORDERS) -> StancePrompts:
    """Every item in each order: in `question` the pro option has pro_label; in `question_swapped` the
    letters are exchanged."""
    return StancePrompts(choice_cases(chat, as_item_set(items), option_form, letters=True, orders=orders))


def prompt_batch(batch: PaddedBatch) -> Batch:
    """The probe's view of one engine batch of left-padded prompts: the answer position is the last column."""
    answer = torch.full((len(batch.indices),), batch.width - 1, dtype=torch.long)
    return Batch(batch.indices, batch.width, Positions.response(include_answer=True),
                 Positions.at_index(answer, batch.width))


def _on_prompts(intervention: Intervention) -> Callable[[PaddedBatch], AbstractContextManager[Any]]:
    return lambda batch: intervention(prompt_batch(batch))


def score_forced_choice(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: StancePrompts,
                        batch_size: int = 16, max_new_tokens: int = 1,
                        intervention: Intervention = no_intervention) -> dict[str, np.ndarray]:
    """{"letter_logprob": (n,), "forced_choice": (n,)} oriented to pro-change."""
    engine = Engine(model, tokenizer, batch_size)
    generations = engine.generate(choice_requests(prompts.cases, max_new_tokens), _on_prompts(intervention))
    letter = np.array([g.first_logprobs[0] - g.first_logprobs[1] for g in generations], dtype=float)
    choice = np.array([choice_stance(g.text, case)[1] for g, case in zip(generations, prompts.cases)], dtype=float)
    return {"letter_logprob": letter, "forced_choice": choice}


def mean_parsed(values: np.ndarray) -> float:
    """Mean over the parsed (non-NaN) stances; NaN when none parsed (an unparsed answer is no stance)."""
    values = np.asarray(values, dtype=float)
    parsed = values[~np.isnan(values)]
    return float(parsed.mean()) if parsed.size else float("nan")


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


def answer_activations(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[Sequence[int]],
                       batch_size: int = 16, units: torch.Tensor | None = None,
                       intervention: Intervention = no_intervention) -> dict[str, torch.Tensor]:
    """Per prompt and layer, at the answer position and averaged over the prompt tokens:
    with `units` (L, D), the projections {"answer": (N, L), "prompt_mean": (N, L)}; without, the
    activations themselves {"answer": (N, L, D), "prompt_mean": (N, L, D)}, float32 on CPU."""
    n_layers = hooks.num_layers(model)
    unit_dev = units.to(device=next(model.parameters()).device, dtype=torch.float32) if units is not None else None

    def read(batch: PaddedBatch, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        summarise = _answer_summariser(inputs["attention_mask"].bool(), unit_dev)
        with hooks.capture(model, reduce=summarise) as acts:
            model(**inputs, use_cache=False, logits_to_keep=1)
        return torch.stack([acts[layer] for layer in range(n_layers)], dim=1)  # (B, L, 2, D|1)

    rows = Engine(model, tokenizer, batch_size).map_batches(prompt_ids, read, _on_prompts(intervention))
    result = {"answer": torch.stack([row[:, 0] for row in rows]),
              "prompt_mean": torch.stack([row[:, 1] for row in rows])}
    return {k: v.squeeze(-1) for k, v in result.items()} if units is not None else result


# -- fluency ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NeutralSet:
    ids: list[list[int]]
    prompt_len: int      # the same for every row: one fixed request


def neutral_set(chat: ChatFormat, texts: Sequence[str], max_tokens: int = 128) -> NeutralSet:
    """Each passage as the assistant's reply to one fixed request, truncated to max_tokens reply tokens."""
    prompt_ids = chat.prompt_ids(NEUTRAL_REQUEST)
    rows = []
    for text in texts:
        _, reply = chat.conversation(NEUTRAL_REQUEST, text)
        reply_ids = chat.tokenizer.encode(reply.rstrip("\n"), add_special_tokens=False)[:max_tokens]
        rows.append(prompt_ids + reply_ids)
    return NeutralSet(rows, len(prompt_ids))


def fluency(model: nn.Module, tokenizer: PreTrainedTokenizerBase, neutral: NeutralSet, batch_size: int = 8,
            reference: list[torch.Tensor] | None = None, intervention: Intervention = no_intervention,
            keep_logprobs: bool = False) -> dict[str, Any]:
    """{"perplexity", "kl" (vs reference, nats per reply token; None without one), "logprobs" (per passage,
    kept only when asked: the reference for later calls)}."""
    p0 = neutral.prompt_len

    def score(batch: PaddedBatch, inputs: dict[str, torch.Tensor]) -> list[tuple[float, int, float, Any]]:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logprobs = logits[:, p0 - 1:-1].float().log_softmax(-1)  # predicting columns p0 .. width-1
        valid = mask[:, p0:].bool()
        picked = logprobs.gather(-1, ids[:, p0:, None]).squeeze(-1)
        replies = [logprobs[row][valid[row]] for row in range(len(batch.indices))]
        kl = [(ref.exp() * (ref - flat)).sum() for flat, ref in
              zip(replies, (reference[i].to(logprobs.device, torch.float32) for i in batch.indices))] \
            if reference is not None else [logprobs.new_zeros(())] * len(replies)
        # One transfer per batch: each passage's NLL, reply length and KL.
        stats = torch.stack([-(picked * valid).sum(-1), valid.sum(-1).float(), torch.stack(kl)], dim=1).tolist()
        return [(nll, int(n), kl, flat if keep_logprobs else None) for (nll, n, kl), flat in zip(stats, replies)]

    # Right padding, one fixed prompt: the reply starts at column p0 in every row; the answer position
    # p0 − 1 predicts its first token.
    def on_replies(batch: PaddedBatch) -> AbstractContextManager[Any]:
        return intervention(Batch(batch.indices, batch.width, Positions.starting_at(p0 - 1), None))

    passages = Engine(model, tokenizer, batch_size).map_batches(neutral.ids, score, on_replies, padding="right")
    count = sum(n for _, n, _, _ in passages)
    return {"perplexity": float(np.exp(sum(nll for nll, _, _, _ in passages) / max(1, count))),
            "kl": sum(kl for _, _, kl, _ in passages) / max(1, count) if reference is not None else None,
            "logprobs": [flat for *_, flat in passages] if keep_logprobs else None, "tokens": count}
