"""Read and edit the residual stream of HF decoder-only models (Qwen2, Llama), plain or peft-wrapped.

The residual stream at layer ℓ is the output of decoder layer ℓ (what `output_hidden_states` returns as
`hidden_states[ℓ + 1]`, except after the last layer, where HF applies the final norm first). Every
intervention is a context manager that registers forward hooks on the chosen layers and removes them on
exit, so interventions stack (hooks run in the order they were entered: add, then capture, sees the sum):

    with add(model, {5: v}, Positions.response()), capture(model, [5]) as acts:
        model.generate(...)

Layer outputs are tensors in transformers ≥ 5 and tuples `(hidden, ...)` before; both are handled.

Positions are token *columns* of the padded batch. A hook learns which columns a call covers from the
layer's KV cache: before the layer runs, the cache holds `offset` earlier columns, so the call covers
columns offset … offset+T−1 (cached decoding feeds one column per step). Without a cache (or on the
first, prefill call) offset is 0. Explicit masks and starts are therefore right with left or right
padding; `Positions.response()` assumes a left-padded prompt (HF generation pads left), so that every
row's prompt ends at the prefill's last column.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lbt.model.layers import decoder_layers, unwrap

# (hidden (B, T, D), selected (B, T) bool or None = every position, column offset of the call) -> hidden
Edit = Callable[[torch.Tensor, "torch.Tensor | None", int], torch.Tensor]


# -- finding the modules -------------------------------------------------------------------------------

def final_norm(model: nn.Module) -> nn.Module:
    base = unwrap(model)
    inner = getattr(base, "model", base)
    norm = getattr(inner, "norm", None)
    if norm is None:
        raise ValueError(f"no final norm found in {type(base).__name__}")
    return norm


def output_head(model: nn.Module) -> nn.Module:
    return unwrap(model).get_output_embeddings()


def input_embeddings(model: nn.Module) -> nn.Module:
    return unwrap(model).get_input_embeddings()


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


# -- tensor or tuple outputs -----------------------------------------------------------------------------

def hidden_of(output: object) -> torch.Tensor:
    """The hidden states of a module output: the tensor itself (transformers ≥ 5) or its first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot read hidden states from a {type(output).__name__} output")


def with_hidden(output: object, hidden: torch.Tensor) -> object:
    """The module output with its hidden states replaced, in the same form (tensor or tuple)."""
    if isinstance(output, torch.Tensor):
        return hidden
    return type(output)((hidden, *output[1:])) if isinstance(output, tuple) else [hidden, *output[1:]]


# -- positions -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Positions:
    """Which columns an intervention touches.

    kind: "all"; "from" (columns ≥ start, per row; keeps selecting during cached decoding); "mask" (an
    explicit (B, W) mask, columns ≥ W unselected); "response" (left-padded generation: from the prompt's
    last column, the answer position whose output picks the first generated token, if include_answer,
    else from the first generated column; every cached decode step is selected).
    """

    kind: str = "all"
    start: torch.Tensor | int | None = None
    mask: torch.Tensor | None = None
    include_answer: bool = True

    @classmethod
    def all(cls) -> Positions:
        return cls("all")

    @classmethod
    def starting_at(cls, start: torch.Tensor | int | Sequence[int]) -> Positions:
        if not isinstance(start, (int, torch.Tensor)):
            start = torch.as_tensor(list(start), dtype=torch.long)
        return cls("from", start=start)

    @classmethod
    def at(cls, mask: torch.Tensor) -> Positions:
        return cls("mask", mask=mask.bool())

    @classmethod
    def at_index(cls, index: torch.Tensor, width: int) -> Positions:
        """One column per row (e.g. the last prompt token from `last_positions`)."""
        cols = torch.arange(width, device=index.device)
        return cls.at(cols[None, :] == index[:, None])

    @classmethod
    def response(cls, include_answer: bool = True) -> Positions:
        return cls("response", include_answer=include_answer)


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token, for left or right padding."""
    width = attention_mask.shape[1]
    flipped = attention_mask.flip(-1).long()
    return width - 1 - flipped.argmax(-1)


@dataclass
class _Session:
    """Per-context state: each hooked layer's column offset for the current call, and the prefill width."""

    positions: Positions
    offsets: dict[int, int] = field(default_factory=dict)
    prefill_width: int | None = None

    def select(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        batch, width = hidden.shape[:2]
        offset = self.offsets.get(layer, 0)
        pos = self.positions
        if pos.kind == "all":
            return None
        cols = torch.arange(offset, offset + width, device=hidden.device)
        if pos.kind == "from":
            start = torch.as_tensor(pos.start, device=hidden.device).reshape(-1)
            return (cols[None, :] >= start[:, None]).expand(batch, width)
        if pos.kind == "mask":
            mask = pos.mask.to(hidden.device)
            out = torch.zeros(batch, width, dtype=torch.bool, device=hidden.device)
            stop = min(mask.shape[1], offset + width)
            if stop > offset:
                out[:, : stop - offset] = mask[:, offset:stop]
            return out
        if pos.kind == "response":
            if offset == 0:
                self.prefill_width = width
            if self.prefill_width is None:
                raise RuntimeError("Positions.response: decode step seen before any prefill")
            start = self.prefill_width - (1 if pos.include_answer else 0)
            return (cols >= start)[None, :].expand(batch, width)
        raise ValueError(f"unknown Positions kind {pos.kind!r}")


def _cache_offset(layer_index: int, kwargs: Mapping[str, object]) -> int:
    """Columns already in this layer's KV cache before the call (0 without a cache)."""
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    for key in ("cache", "past_key_values", "past_key_value"):
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            try:
                return int(cache.get_seq_length(layer_index))
            except (IndexError, KeyError, TypeError):
                return int(cache.get_seq_length())
    return 0


def _layer_index(layer: nn.Module, position: int) -> int:
    attn = getattr(layer, "self_attn", None)
    idx = getattr(attn, "layer_idx", None)
    return int(idx) if idx is not None else position


# -- the generic intervention --------------------------------------------------------------------------

@contextmanager
def intervene(model: nn.Module, edits: Mapping[int, Edit], positions: Positions | None = None) -> Iterator[None]:
    """Apply `edits[ℓ](hidden, selected, offset)` to the output of each decoder layer ℓ."""
    layers = decoder_layers(model)
    session = _Session(positions or Positions.all())
    handles = []
    try:
        for layer_no, edit in edits.items():
            if not 0 <= layer_no < len(layers):
                raise IndexError(f"layer {layer_no} out of range (model has {len(layers)} layers)")
            layer = layers[layer_no]
            cache_index = _layer_index(layer, layer_no)

            def pre_hook(module, args, kwargs, _no=layer_no, _ci=cache_index):
                session.offsets[_no] = _cache_offset(_ci, kwargs)

            def post_hook(module, args, kwargs, output, _no=layer_no, _edit=edit):
                hidden = hidden_of(output)
                new = _edit(hidden, session.select(_no, hidden), session.offsets.get(_no, 0))
                return with_hidden(output, new)

            handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(layer.register_forward_hook(post_hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _select(mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, 1) multiplier of the selected positions."""
    if mask is None:
        return torch.ones(1, 1, 1, dtype=hidden.dtype, device=hidden.device)
    return mask[..., None].to(hidden.dtype)


def _vector(v: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """A (D,) or (B, D) vector broadcast against (B, T, D)."""
    v = v.to(device=hidden.device, dtype=hidden.dtype)
    return v[:, None, :] if v.dim() == 2 else v


# -- capture, add, project out, replace ------------------------------------------------------------------

class Captured:
    """Per-layer activations recorded by `capture`; calls of one forward pass (cached decoding) are
    concatenated along the sequence dimension."""

    def __init__(self) -> None:
        self.calls: dict[int, list[torch.Tensor]] = defaultdict(list)

    def __getitem__(self, layer: int) -> torch.Tensor:
        calls = self.calls[layer]
        if not calls:
            raise KeyError(f"nothing captured at layer {layer}")
        return calls[0] if len(calls) == 1 else torch.cat(calls, dim=1)

    def layers(self) -> list[int]:
        return sorted(self.calls)


@contextmanager
def capture(model: nn.Module, layers: Sequence[int] | None = None,
            reduce: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
            detach: bool = True) -> Iterator[Captured]:
    """Record each chosen layer's output (all layers if None). `reduce(hidden, layer, offset)` stores a
    summary instead of the (B, T, D) tensor (e.g. a masked mean), so that big runs keep little memory."""
    chosen = range(num_layers(model)) if layers is None else layers
    store = Captured()

    def make(layer: int) -> Edit:
        def record(hidden: torch.Tensor, mask: torch.Tensor | None, offset: int) -> torch.Tensor:
            value = hidden.detach() if detach else hidden
            store.calls[layer].append(reduce(value, layer, offset) if reduce else value.clone())
            return hidden
        return record

    with intervene(model, {int(layer): make(int(layer)) for layer in chosen}):
        yield store


@contextmanager
def add(model: nn.Module, vectors: Mapping[int, torch.Tensor], positions: Positions | None = None) -> Iterator[None]:
    """hidden += v at the selected positions of each layer (v: (D,) or per row (B, D))."""
    def make(v: torch.Tensor) -> Edit:
        def edit(hidden: torch.Tensor, mask: torch.Tensor | None, offset: int) -> torch.Tensor:
            return hidden + _select(mask, hidden) * _vector(v, hidden)
        return edit

    with intervene(model, {int(k): make(v) for k, v in vectors.items()}, positions):
        yield


def project_out_tensor(hidden: torch.Tensor, direction: torch.Tensor, mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """hidden − (hidden·û) û at the selected positions (û = direction / |direction|; zero direction: no-op)."""
    unit = direction.to(device=hidden.device, dtype=torch.float32)
    norm = unit.norm()
    if norm == 0:
        return hidden
    unit = unit / norm
    coef = hidden.float() @ unit  # in fp32: bf16 would leave a visible residue
    removed = (coef[..., None] * unit).to(hidden.dtype)
    return hidden - _select(mask, hidden) * removed


@contextmanager
def project_out(model: nn.Module, directions: Mapping[int, torch.Tensor],
                positions: Positions | None = None) -> Iterator[None]:
    """Remove the component along each layer's direction at the selected positions."""
    def make(d: torch.Tensor) -> Edit:
        return lambda hidden, mask, offset: project_out_tensor(hidden, d, mask)

    with intervene(model, {int(k): make(v) for k, v in directions.items()}, positions):
        yield


@contextmanager
def replace(model: nn.Module, values: Mapping[int, torch.Tensor], positions: Positions | None = None
            ) -> Iterator[None]:
    """Overwrite the selected positions: values (B, D) fill every selected column of a row; values
    (B, W, D) are aligned by column (e.g. activations captured from another forward of the same batch)."""
    def make(value: torch.Tensor) -> Edit:
        def edit(hidden: torch.Tensor, mask: torch.Tensor | None, offset: int) -> torch.Tensor:
            v = value.to(device=hidden.device, dtype=hidden.dtype)
            if v.dim() == 3:
                width = hidden.shape[1]
                if v.shape[1] < offset + width:
                    raise ValueError(f"replace: values cover {v.shape[1]} columns, call needs {offset + width}")
                v = v[:, offset:offset + width]
            else:
                v = v[:, None, :]
            keep = _select(mask, hidden)
            return hidden * (1 - keep) + v * keep
        return edit

    with intervene(model, {int(k): make(v) for k, v in values.items()}, positions):
        yield


@contextmanager
def ablate_writes(model: nn.Module, direction: torch.Tensor, enabled: Callable[[], bool] | None = None
                  ) -> Iterator[None]:
    """Directional ablation of one direction from everything that writes to the residual stream: the
    token embeddings and every layer's attention and MLP outputs, at every position. The residual stream
    then never holds the direction; this equals orthogonalising those weights (`weights.orthogonalize_writes`).
    `enabled()`, if given, is asked at every call (the training-time intervention switches itself off
    during evaluation phases)."""
    layers = decoder_layers(model)
    modules = [input_embeddings(model)]
    for layer in layers:
        for name in ("self_attn", "mlp"):
            sub = getattr(layer, name, None)
            if sub is None:
                raise ValueError(f"ablate_writes: decoder layer {type(layer).__name__} has no .{name}")
            modules.append(sub)

    def hook(module, args, output):
        if enabled is not None and not enabled():
            return None
        return with_hidden(output, project_out_tensor(hidden_of(output), direction))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
