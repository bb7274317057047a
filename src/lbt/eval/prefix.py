"""Shared prompt prefixes: the prompts of one item run their common opening once (`hardware.fast.share_prefix`).

The battery asks every item in many prompts that open alike: the chat template and the item's scenario, then
one of eight contrast questions (logprob), or one of two option orders (forced choice, Likert). The scenario
is most of each prompt, so most of a phase's prefill recomputes the same keys and values.

With sharing on, the engine (`lbt.eval.scoring.Engine`) groups a call's prompts by their common token prefix
(`plan_prefixes`), runs each group's prefix once in a small left-padded batch, gives every prompt a copy of
its group's key/value cache, and runs only the prompt's own remaining tokens (`shared_inputs`). The model
then sees the columns [prefix pads | prefix | pads | own tokens]: the mask hides both pad runs and the
positions continue from the prefix's length, so every row attends to exactly its own tokens at their own
positions, as in the plain left-padded batch. The numbers are the plain path's up to float rounding (the
prefix runs in another batch shape): tests/test_prefix.py checks every request kind in fp32.

Sharing stays off where it could change what a caller sees: with an intervention (steering, patching and
capture hooks see the prompt's positions), with forward hooks on the model, for right-padded
(teacher-forced) batches, and for attention that is not sdpa or eager over full-attention layers. A batch
whose padded token count would not drop to `SHARE_BELOW` of the plain batch's runs plainly.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lbt.eval.batching import (
    attention_kinds,
    base_model_of,
    cache_kwargs,
    has_forward_hooks,
    left_pad,
    output_cache,
)
from lbt.fast_settings import FastSetting

log = logging.getLogger(__name__)

# A batch shares its prefixes only when its padded tokens (prefix rows + own tokens) are at most this share
# of the plain batch's: below that the extra prefix forward (one more pass of host work) may not repay itself.
SHARE_BELOW = 0.8

# Whether engines that name no setting share prompt prefixes (`hardware.fast.share_prefix`; None: off).
SHARE_PREFIX = FastSetting("share_prefix", False)
set_share_prefix = SHARE_PREFIX.set
share_prefix_default = SHARE_PREFIX.get


def sharing_unsupported(model: torch.nn.Module) -> str | None:
    """Why prompts of this model cannot share prefixes, or None."""
    if has_forward_hooks(model):
        return "the model has forward hooks (they would see the prompts split in two)"
    config = getattr(base_model_of(model), "config", None)
    if config is None:
        return "the model has no config"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        return f"attention {attention!r} (prefix sharing passes padded masks: sdpa or eager only)"
    kinds = attention_kinds(config)
    if kinds != {"full_attention"}:
        return f"layer types {sorted(kinds)} (a sliding window counts columns, which pads shift)"
    return None


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


def usable(model: torch.nn.Module) -> bool:
    reason = sharing_unsupported(model)
    if reason is not None:
        _log_once(f"share_prefix: {reason}; prompts run whole")
    return reason is None


@dataclass(frozen=True)
class PrefixPlan:
    """group[i]: the group of prompt i; prefix[g]: how many leading tokens group g's prompts share (≥ 1,
    and shorter than every member, so each keeps at least its last token to run)."""

    group: list[int]
    prefix: list[int]

    def own(self, prompts: Sequence[Sequence[int]], i: int) -> Sequence[int]:
        return prompts[i][self.prefix[self.group[i]]:]


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def plan_prefixes(prompts: Sequence[Sequence[int]]) -> PrefixPlan:
    """Group prompts so that the tokens run in all (each group's prefix once, then each prompt's own rest)
    are fewest: exactly so when no prompt is a prefix of another (chat prompts all end in the generation
    prompt; tests/test_prefix.py checks every partition of small sets), else within a few tokens (such a
    prompt may not join a group as deep as its own length).

    Sorted, the prompts form a trie: a run of neighbours shares the least common prefix of its adjacent
    pairs, and splits where pairs share exactly that little into runs that share more. A group is opened at
    a node (its prefix: the node's shared length, or one less when a member would keep no token of its own)
    and takes every prompt below it that no deeper open group takes. Each group's prefix runs from the first
    token (it is not built on an enclosing group's cache), so opening a node costs its whole prefix. A
    bottom-up pass finds, for each node and each depth an enclosing open group might have, the cheapest
    choice; a top-down pass assigns the groups. A prompt that no group takes runs alone: a group of one
    whose prefix is all but its last token (the same tokens as running it whole)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("cannot score an empty prompt")
    n = len(prompts)
    order = sorted(range(n), key=lambda i: tuple(prompts[i]))
    length = [len(prompts[i]) for i in order]
    adjacent = [_common(prompts[a], prompts[b]) for a, b in itertools.pairwise(order)]
    # The trie's nodes (runs of sorted positions), parents before children: the depths a group opened
    # there may take, and the child runs.
    nodes: dict[tuple[int, int], tuple[tuple[int, ...], list[tuple[int, int]]]] = {}
    above: dict[tuple[int, int], tuple[int, ...]] = {(0, n): (0,)}  # depths of enclosing groups (0: none)
    preorder, stack = [], [(0, n)]
    while stack:
        lo, hi = node = stack.pop()
        preorder.append(node)
        if hi - lo == 1:
            nodes[node] = ((), [])
            continue
        least = min(adjacent[lo:hi - 1])
        cuts = [lo] + [j + 1 for j in range(lo, hi - 1) if adjacent[j] == least] + [hi]
        runs = list(itertools.pairwise(cuts))  # at least two: `least` is some adjacent pair's
        depths = tuple(sorted({d for d in (least, min(least, min(length[lo:hi]) - 1)) if d >= 1}))
        nodes[node] = (depths, runs)
        for run in runs:
            above[run] = above[node] + depths
        stack.extend(runs)
    # cost[node, depth] = (fewest tokens below node when the deepest enclosing open group has `depth`,
    # the depth of the group to open at node or None)
    cost: dict[tuple[tuple[int, int], int], tuple[int, int | None]] = {}
    for node in reversed(preorder):
        (lo, hi), (depths, runs) = node, nodes[node]
        for depth in set(above[node]):
            if hi - lo == 1:  # a prompt joins the enclosing group if it keeps a token of its own
                cost[node, depth] = (length[lo] - depth if depth < length[lo] else length[lo], None)
                continue
            best: tuple[int, int | None] = (sum(cost[run, depth][0] for run in runs), None)
            for opened in depths:
                if opened > depth:
                    total = opened + sum(cost[run, opened][0] for run in runs)
                    if total < best[0]:
                        best = (total, opened)
            cost[node, depth] = best
    group, prefix = [0] * n, []
    assign: list[tuple[tuple[int, int], int, int | None]] = [((0, n), 0, None)]
    while assign:
        node, depth, open_group = assign.pop()
        lo, hi = node
        if hi - lo == 1:
            if open_group is not None and depth < length[lo]:
                group[order[lo]] = open_group
            else:
                group[order[lo]] = len(prefix)
                prefix.append(length[lo] - 1)
            continue
        opened = cost[node, depth][1]
        if opened is not None:
            open_group, depth = len(prefix), opened
            prefix.append(opened)
        assign.extend((run, depth, open_group) for run in nodes[node][1])
    return PrefixPlan(group, prefix)


def shared_batches(plan: PrefixPlan, prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Batches that keep a group's prompts together: groups ordered by their longest own part (longest
    first, so an out-of-memory error shows at once, and a batch's own parts have similar widths), members
    by their own part's length."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(plan.group):
        members.setdefault(g, []).append(i)
    own = [len(prompts[i]) - plan.prefix[plan.group[i]] for i in range(len(prompts))]
    groups = sorted(members, key=lambda g: (-max(own[i] for i in members[g]), -plan.prefix[g], g))
    order = [i for g in groups for i in sorted(members[g], key=lambda i: (-own[i], i))]
    return [order[k: k + batch_size] for k in range(0, len(order), batch_size)]


def worth_sharing(plan: PrefixPlan, prompts: Sequence[Sequence[int]], indices: Sequence[int]) -> bool:
    """Whether sharing cuts this batch's padded tokens to SHARE_BELOW of the plain batch's or fewer (never
    with a one-token prompt, which has no prefix to run)."""
    groups = {plan.group[i] for i in indices}
    if min(plan.prefix[g] for g in groups) < 1:
        return False
    own = max(len(plan.own(prompts, i)) for i in indices)
    shared = len(indices) * own + len(groups) * max(plan.prefix[g] for g in groups)
    plain = len(indices) * max(len(prompts[i]) for i in indices)
    return shared <= SHARE_BELOW * plain


def shared_inputs(
    model: torch.nn.Module, plan: PrefixPlan, prompts: Sequence[Sequence[int]], indices: Sequence[int],
    pad_id: int, device: torch.device,
) -> dict[str, Any]:
    """The model inputs of batch `indices` with their groups' prefixes already run: input_ids and
    position_ids of each prompt's own tokens (left-padded, positions continuing from its prefix), the
    attention mask over prefix and own columns, and the prefixes' key/value cache, one copy per row."""
    groups = list(dict.fromkeys(plan.group[i] for i in indices))
    slot = {g: k for k, g in enumerate(groups)}
    first = {}
    for i in indices:
        first.setdefault(plan.group[i], i)
    heads = left_pad([prompts[first[g]][: plan.prefix[g]] for g in groups], pad_id, device)
    cache = output_cache(model(**heads, use_cache=True, logits_to_keep=1))
    rows = torch.tensor([slot[plan.group[i]] for i in indices], device=device)
    cache.batch_select_indices(rows)
    own = left_pad([plan.own(prompts, i) for i in indices], pad_id, device)
    start = torch.tensor([plan.prefix[plan.group[i]] for i in indices], device=device)[:, None]
    return {
        "input_ids": own["input_ids"],
        "attention_mask": torch.cat([heads["attention_mask"][rows], own["attention_mask"]], dim=-1),
        "position_ids": own["position_ids"] + start,
        **cache_kwargs(model, cache),
    }
