"""The LoRA fine-tuning LightningModule.

One training_step is one optimizer step (the DataModule hands over all micro-batches of the step), with
manual optimization: the loss is the sum of token losses over supervised tokens divided by the step's
supervised-token count (across ranks), so micro-batching, packing and the number of GPUs do not change
the objective.

Under DDP the gradients are summed across ranks once per optimizer step, by this module, after every
micro-batch's backward pass: DDP's own reducer is switched off for the step. Its reducer syncs on the
first backward after a forward only, so with several micro-batches per rank the later ones were never
synced, and a rank with fewer micro-batches than another (a short last step) waited forever.

The module also keeps its validation loss: at each step of `validation_steps` (the checkpoint steps),
right after the optimizer step, the mean token loss over the held-out micro-batches is logged as
`val/loss` and appended to `val_history`, which travels in the resumable checkpoint.

The step of `train/*` and `val/loss` is the number of optimizer steps completed (the first step's loss is
at 1), the step the evaluation phases use for the model they score (`lbt.loggers.log_at_step`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.checkpoint import checkpoint

from lbt import wandb_keys as keys
from lbt.data.chat import IGNORE_INDEX
from lbt.loggers import log_at_step
from lbt.model.fused_ce import fused_linear_ce
from lbt.model.modes import evaluation_mode


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good adapter and checkpoint are kept."""


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"train.schedule={schedule!r}: use cosine, linear or constant")
    return factor


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The HF *ForCausalLM inside a peft wrapper (LoRA layers are injected in place, so it trains them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_ce(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, lm_head: torch.nn.Linear, targets: torch.Tensor,
                    chunk: int, fused: bool = False) -> torch.Tensor:
    """Sum of cross-entropy of lm_head(hidden) against targets, chunk rows at a time, recomputing each
    chunk's logits in backward: the [tokens × vocabulary] fp32 logits never exist all at once.

    fused (`hardware.fast.fused_ce`): each chunk's loss and its gradient with respect to `hidden` in one pass
    (`fused_linear_ce`), for a frozen lm_head (LoRA never adapts it; a trainable one takes the plain path)."""
    if fused and not lm_head.weight.requires_grad:
        return fused_linear_ce(hidden, lm_head.weight, targets, chunk)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_chunk_ce, hidden[start:start + chunk], targets[start:start + chunk],
                                   lm_head.weight, use_reentrant=False)
    return total


def supervised_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                          supervised_logits_only: bool = False, ce_chunk: int = 0,
                          fused_ce: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over supervised tokens, their count) for one micro-batch.

    supervised_logits_only: compute the vocabulary projection only at positions whose next token is
    supervised, instead of at every position (the logits dominate memory and time for big vocabularies).
    ce_chunk > 0: additionally never hold those logits at once (chunked_lm_loss); plain lm_head models only.
    fused_ce (with ce_chunk > 0): each chunk's loss and gradient in one pass (fused_linear_ce).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if ce_chunk > 0:
        lm = causal_lm(model)
        hidden = lm.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
        loss_sum = chunked_lm_loss(hidden[keep], lm.lm_head, targets[keep], ce_chunk, fused=fused_ce)
        return loss_sum, int(keep.sum())
    if supervised_logits_only:
        # Positions (in any row) whose next token is supervised; logits only there.
        positions = keep.any(dim=0).nonzero().squeeze(-1)
        logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
        targets, keep = targets[:, positions], keep[:, positions]
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1]
    loss_sum = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
    return loss_sum, int(keep.sum())


class LoRAModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, train_cfg: DictConfig, total_steps: int,
                 supervised_logits_only: bool = False, ce_chunk: int = 0, fused_ce: bool = False,
                 val_batches: Sequence[dict[str, torch.Tensor]] = (), validation_steps: Sequence[int] = ()):
        super().__init__()
        self.model = model
        self.train_cfg = train_cfg
        self.total_steps = int(total_steps)
        self.supervised_logits_only = supervised_logits_only
        self.ce_chunk = int(ce_chunk)
        self.fused_ce = bool(fused_ce)
        self.automatic_optimization = False
        # The Lightning checkpoint holds only trainable weights; the frozen base is rebuilt from config.
        self.strict_loading = False
        self.loss_history: list[float] = []
        self.val_batches = list(val_batches)
        self.validation_steps = frozenset(int(s) for s in validation_steps)
        self.val_history: list[tuple[int, float]] = []
        self.tokens_seen = 0
        self._train_seconds = 0.0

    # -- checkpoints: trainable weights + optimizer only ------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()
        checkpoint["lbt"] = {"loss_history": list(self.loss_history), "tokens_seen": self.tokens_seen,
                             "train_seconds": self._train_seconds, "val_history": list(self.val_history)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("lbt", {})
        self.loss_history = list(extra.get("loss_history", []))
        self.tokens_seen = int(extra.get("tokens_seen", 0))
        self._train_seconds = float(extra.get("train_seconds", 0.0))
        # A resumed job's run card keeps the validation losses of the steps before the interruption
        # (checkpoints written before the module kept them hold them under lbt_val_history).
        self.val_history = [tuple(v) for v in extra.get("val_history", checkpoint.get("lbt_val_history", []))]

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        cfg = self.train_cfg
        optimizer = torch.optim.AdamW(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
        warmup = math.ceil(float(cfg.warmup_fraction) * self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(str(cfg.schedule), warmup,
                                                                           self.total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if int(batch["step"]) != self.global_step:
            raise RuntimeError(f"data out of step: the loader gave plan step {int(batch['step'])} at optimizer "
                               f"step {self.global_step} (resume bookkeeping); nothing was trained on it")
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        started = time.perf_counter()
        step_tokens = max(1, int(batch["step_tokens"]))
        world = self.trainer.world_size
        total = torch.zeros((), device=self.device)
        for micro in batch["micro_batches"]:
            micro = {k: v.to(self.device) for k, v in micro.items()}
            loss_sum, _ = supervised_token_loss(self.model, micro, self.supervised_logits_only, self.ce_chunk,
                                                self.fused_ce)
            self.manual_backward(loss_sum / step_tokens)
            total += loss_sum.detach()
        if world > 1:
            self.sum_gradients_across_ranks()
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        loss = total / step_tokens
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.global_step + 1}; training stopped, the last "
                "saved adapter and checkpoint are kept (try a lower train.lr or check the corpus)")
        if self.train_cfg.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=float(self.train_cfg.grad_clip),
                                gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self._train_seconds += time.perf_counter() - started
        n_tokens = sum(int(m["n_real_tokens"]) for m in batch["micro_batches"])
        if world > 1:
            n_tokens = int(self.trainer.strategy.reduce(torch.tensor(float(n_tokens), device=self.device),
                                                        reduce_op="sum"))
        self.tokens_seen += n_tokens
        self.loss_history.append(float(loss))
        metrics = {keys.TRAIN_LOSS: float(loss), keys.TRAIN_LR: scheduler.get_last_lr()[0],
                   keys.TRAIN_TOKENS_PER_S: self.tokens_per_second}
        # The progress bar reads Lightning's logged values; the loggers get them below, at the step they
        # describe (Lightning's own logging would file them one step lower than the evaluation phases).
        self.log_dict(metrics, on_step=True, prog_bar=True, logger=False, rank_zero_only=True)
        # The optimizer step is counted: this is step n's model. A corpus too small to hold validation records
        # out has no validation loss (not NaN, which JSON cannot hold).
        if self.val_batches and self.global_step in self.validation_steps:
            val = self.validation_loss(self.val_batches)
            metrics[keys.VAL_LOSS] = val
            self.val_history.append((self.global_step, val))
        if self.trainer.is_global_zero:
            log_at_step(self.trainer.loggers, metrics, self.global_step)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # DDP's reducer off for the whole step (its forward runs before training_step): see the module doc.
        ddp = self.trainer.strategy.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            ddp.require_backward_grad_sync = False

    def sum_gradients_across_ranks(self) -> None:
        """One all-reduce (sum) of every trainable gradient; a rank without examples adds zeros."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for param, grad in zip(params, grads):
            param.grad = flat[offset:offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self._train_seconds if self._train_seconds else 0.0

    def validation_loss(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        """Mean token loss over the held-out split, read as every measurement reads the model
        (`evaluation_mode`: dropout off, no gradients, compiled layers run eagerly). Compiled, the
        validation forward would compile graphs of its own (no gradients, the split's own short last
        micro-batch) in a sweep's first job and load them in every later one."""
        loss_sum, count = 0.0, 0
        with evaluation_mode(self.model):
            for micro in micro_batches:
                micro = {k: v.to(self.device) for k, v in micro.items()}
                s, n = supervised_token_loss(self.model, micro)
                loss_sum, count = loss_sum + float(s), count + n
        return loss_sum / count if count else float("nan")
