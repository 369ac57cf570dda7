"""Distillation from the dense model as it was before the first prune step (``prune.distill``).

At the first prune step the pipeline snapshots the model (LoRA merged into a plain copy, frozen, in
eval mode: the teacher) and hooks the student: every *training* forward's loss becomes

    loss = CE + w · (KL + SH) / num_items_in_batch

summed over the tokens the CE counts (labels ≠ −100, next-token shifted), so both terms carry the same
global-token-mean normalisation as the CE (any micro-batch split gives the same gradient):

- ``logits``: KL = Σ_tokens KL(p_teacher ‖ p_student);
- ``squarehead``: SH = Σ_tokens (1/L) Σ_l ‖h_s^l − h_t^l‖² / ‖h_t^l‖², the output h^l of every decoder
  block l of L (SquareHead, Kurtic et al. 2023: per-layer MSE normalised by the teacher's energy, here
  per token so that it splits over micro-batches; reported to recover high sparsity where CE and logit
  distillation do not). The teacher then runs without its LM head;
- ``logits+squarehead``: both.
Evaluation forwards (``model.eval()``) are untouched.

Cost (plain torch): one more forward of the teacher per micro-batch (no backward: ~+50% of a
frozen-base LoRA step's matmul work) and one more copy of the weights (SmolLM2-135M fp32: 0.54 GB);
``logits`` also holds the teacher's logits of a micro-batch (``rows·seq·vocab·4`` B), ``squarehead``
the teacher's block outputs (``L·rows·seq·hidden·4`` B; SmolLM2: 30 × 1024 × 576 × 4 B ≈ 71 MB). Not
implemented under DeepSpeed or with a quantised base (refused at configuration time); at 70B the
teacher would be a second ZeRO-3-partitioned frozen copy (``deepspeed.init_inference`` or the same
engine's params with the pruned complement ``W⊙(1−M)`` kept offloaded), or its top-k logits (or block
outputs) precomputed once, before the first prune step, over the tokens still to be trained on
(150 steps × 1024 tokens × top-64 × 6 B ≈ 60 MB per rank for logits).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.structure import blocks


def snapshot_teacher(model: nn.Module) -> nn.Module:
    """A frozen plain copy of ``model`` with its LoRA merged (effective weights ``W + s·B·A``)."""
    teacher = copy.deepcopy(model)
    if hasattr(teacher, "merge_and_unload"):
        teacher = teacher.merge_and_unload()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over next-token positions with ``labels != -100`` of KL(teacher ‖ student)."""
    s = student_logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    valid = labels[:, 1:] != -100
    logp_s = F.log_softmax(s, dim=-1)
    logp_t = F.log_softmax(t, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    return (kl * valid).sum()


def squarehead_sum(student: list[torch.Tensor], teacher: list[torch.Tensor], labels: torch.Tensor,
                   eps: float = 1e-12) -> torch.Tensor:
    """Σ over the positions the CE counts of the layer mean of ‖h_s − h_t‖² / ‖h_t‖² (SquareHead, per token).

    ``student`` and ``teacher``: one ``(rows, seq, hidden)`` block output per layer, in layer order."""
    valid = (labels[:, 1:] != -100).float()
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        s, t = s[:, :-1].float(), t[:, :-1].float()
        total = total + ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(eps) * valid).sum()
    return total / len(student)


class _BlockOutputs:
    """Forward hooks that collect each decoder block's output while ``on`` (not during checkpoint re-runs)."""

    def __init__(self, model: nn.Module):
        self.outputs: list[torch.Tensor] = []
        self.on = False
        self.handles = [b.register_forward_hook(self._hook) for b in blocks(model)]

    def _hook(self, module, args, output):
        if self.on:
            self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs, self.on = self.outputs, [], False
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.outputs = []


class Distiller:
    """Adds ``weight · (KL + SH) / tokens`` (the terms ``mode`` names) to the student's training loss."""

    def __init__(self, model: nn.Module, mode: str, weight: float):
        self.logits = "logits" in mode
        self.squarehead = "squarehead" in mode
        self.teacher = snapshot_teacher(model)
        self.weight = float(weight)
        self.handles = [model.register_forward_pre_hook(self._start), model.register_forward_hook(self._hook,
                                                                                                 with_kwargs=True)]
        self.student_blocks = _BlockOutputs(model) if self.squarehead else None
        self.teacher_blocks = _BlockOutputs(self.teacher) if self.squarehead else None

    def _start(self, module, args):
        if self.student_blocks is not None:
            self.student_blocks.outputs, self.student_blocks.on = [], module.training

    def _hook(self, module, args, kwargs, output):
        student = self.student_blocks.take() if self.student_blocks is not None else None
        if not module.training or getattr(output, "loss", None) is None:
            return output
        ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs.get("labels")
        if labels is None:
            labels = ids
        n = kwargs.get("num_items_in_batch")
        mask = kwargs.get("attention_mask")
        extra = 0.0
        with torch.no_grad():
            if self.squarehead:
                self.teacher_blocks.on = True
            # squarehead alone: the teacher's decoder stack only (no LM head, no logits)
            t_out = (self.teacher if self.logits else self.teacher.base_model)(input_ids=ids, attention_mask=mask)
            teacher = self.teacher_blocks.take() if self.squarehead else None
        if self.logits:
            extra = extra + kl_sum(output.logits, t_out.logits, labels)
        if self.squarehead:
            extra = extra + squarehead_sum(student, teacher, labels)
        denom = n if n is not None else (labels[:, 1:] != -100).sum()
        output.loss = output.loss + self.weight * extra / denom
        return output

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for b in (self.student_blocks, self.teacher_blocks):
            if b is not None:
                b.remove()
        self.teacher = None


def attach(model: nn.Module, cfg) -> Distiller | None:
    """The distiller ``cfg.distill`` (a PruneConfig) asks for, snapshotting ``model`` now (None: off)."""
    if cfg.distill == "off":
        return None
    return Distiller(model, cfg.distill, cfg.distill_weight)


def check_resume(cfg, first_prune_step: int | None, step: int) -> None:
    """The teacher is not checkpointed: a run resumed after its first prune step cannot rebuild it."""
    if cfg.distill != "off" and first_prune_step is not None and step > first_prune_step:
        raise ConfigError(f"prune.distill={cfg.distill}: cannot resume at step {step}, after the first prune step "
                          f"({first_prune_step}); the teacher (the model before it) is not checkpointed")
