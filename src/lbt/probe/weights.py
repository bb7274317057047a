"""Weight-level views of the direction: orthogonalised weights (the weight form of directional ablation)
and the LoRA updates ΔW = scaling · B A of each adapted module.

- `orthogonalize_writes(model, d)`: W ← (I − d̂d̂ᵀ) W for every matrix that writes to the residual stream
  (token embeddings, attention o_proj, MLP down_proj, their biases); a tied output head is untied first so
  that reading the vocabulary is unchanged. Equivalent to `hooks.ablate_writes` (tested).
- `lora_updates(peft_model, adapter)`: each adapted module's (B, A, scaling), without forming ΔW.
- `merged_copy(peft_model, adapter)`: a plain model with one adapter merged into its weights.
- `effective_rank`: exp(entropy of the normalised singular values) (Roy & Vetterli 2007): 1 for a rank-1
  update, r for r equal singular values.
- `amplification`: how strongly ΔW acts on the direction compared with a random direction. Modules that
  read the residual stream (q/k/v/gate/up): |ΔW d̂| / (|ΔW|_F / √in); modules that write to it
  (o_proj, down_proj): |ΔWᵀ d̂| / (|ΔW|_F / √out). A uniformly random unit vector has mean square ratio 1.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from lbt.probe import hooks

WRITERS = ("o_proj", "down_proj")
LAYER = re.compile(r"layers\.(\d+)\.")


def _unit(direction: torch.Tensor) -> torch.Tensor:
    d = direction.detach().float()
    return d / d.norm()


@torch.no_grad()
def orthogonalize_writes(model: nn.Module, direction: torch.Tensor) -> None:
    """In place, on a plain (merged) model: no residual write can contain the direction any more."""
    embed = hooks.input_embeddings(model)
    head = hooks.output_head(model)
    if head is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        if hasattr(hooks.unwrap(model).config, "tie_word_embeddings"):
            hooks.unwrap(model).config.tie_word_embeddings = False
    u = _unit(direction).to(embed.weight.device)
    w = embed.weight.float()  # (V, D): rows are written to the stream
    embed.weight.copy_((w - (w @ u)[:, None] * u[None, :]).to(embed.weight.dtype))
    for layer in hooks.decoder_layers(model):
        for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
            w = module.weight.float()  # (D, in): columns are written to the stream
            module.weight.copy_((w - u[:, None] * (u @ w)[None, :]).to(module.weight.dtype))
            if module.bias is not None:
                b = module.bias.float()
                module.bias.copy_((b - (b @ u) * u).to(module.bias.dtype))


@dataclass(frozen=True)
class LoraUpdate:
    name: str          # module path inside the model
    kind: str          # q_proj, ..., down_proj
    layer: int
    A: torch.Tensor    # (r, in)
    B: torch.Tensor    # (out, r)
    scaling: float

    @property
    def writes(self) -> bool:
        return self.kind in WRITERS

    def core_singular_values(self) -> torch.Tensor:
        """Singular values of ΔW = s·B A from an r × r core (QR of B and Aᵀ): ΔW is never formed."""
        _qb, rb = torch.linalg.qr(self.B.float())
        _qa, ra = torch.linalg.qr(self.A.float().T)
        return torch.linalg.svdvals(self.scaling * rb @ ra.T)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x for x (in,) or (n, in) → (…, out)."""
        return self.scaling * (x.float() @ self.A.float().T) @ self.B.float().T

    def apply_t(self, y: torch.Tensor) -> torch.Tensor:
        """ΔWᵀ y for y (out,) or (n, out) → (…, in)."""
        return self.scaling * (y.float() @ self.B.float()) @ self.A.float()


def merged_copy(model: nn.Module, adapter: str | None) -> nn.Module:
    """A plain model with the adapter merged into the weights (the base model for None), in eval mode."""
    clone = copy.deepcopy(model)
    if hasattr(clone, "merge_and_unload"):
        if adapter is None:
            clone = clone.unload()
        else:
            clone.set_adapter(adapter)
            clone = clone.merge_and_unload(adapter_names=[adapter])
    return clone.eval()


def lora_updates(model: nn.Module, adapter: str) -> list[LoraUpdate]:
    updates = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter not in lora_a:
            continue
        match = LAYER.search(name)
        updates.append(LoraUpdate(
            name=name, kind=name.rsplit(".", 1)[-1], layer=int(match.group(1)) if match else -1,
            A=lora_a[adapter].weight.detach(), B=module.lora_B[adapter].weight.detach(),
            scaling=float(module.scaling[adapter])))
    return updates


def effective_rank(singular_values: torch.Tensor) -> float:
    s = singular_values.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def amplification(update: LoraUpdate, directions: torch.Tensor) -> torch.Tensor:
    """Ratio for each row of directions (n, D) (unit vectors): response to the direction over the
    response to an average random direction."""
    frob = float(update.core_singular_values().norm())
    if frob == 0:
        return torch.zeros(directions.shape[0])
    u = directions.to(update.A.device).float()
    if update.writes:
        response = update.apply_t(u).norm(dim=-1)
        dim = update.B.shape[0]
    else:
        response = update.apply(u).norm(dim=-1)
        dim = update.A.shape[1]
    return (response / (frob / dim ** 0.5)).cpu()
