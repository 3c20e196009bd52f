"""The student's losses, one per way of using the teacher.

Binary distillation with a temperature T: the teacher's probability p is turned back
into a logit z, both sides are softened (sigmoid(z / T), student logit / T) and the
BCE between them is scaled by T^2 (Hinton et al.), so its gradient keeps its size.

    hard     BCE(serving, y)
    kd       (1 - w) BCE(serving, y) + w T^2 BCE(serving / T, soft(p))
    aux      BCE(serving, y) + w T^2 BCE(aux / T, soft(p))       (ExFM auxiliary head:
             the teacher reaches the shared layers through the auxiliary head only,
             never the serving head's weights)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import binary_cross_entropy_with_logits as bce

from students.model import AUX, SERVING
from students.variants import Variant

EPS = 1e-6


def soft_targets(teacher_probs: Tensor, temperature: float) -> Tensor:
    p = teacher_probs.clamp(EPS, 1 - EPS)
    return torch.sigmoid(torch.logit(p) / temperature)


def distillation(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    t = temperature
    return t * t * bce(student_logits / t, soft_targets(teacher_probs, t))


@dataclass
class LossParts:
    total: Tensor
    hard: Tensor
    distill: Tensor | None = None


def student_loss(outputs: dict[str, Tensor], labels: Tensor, teacher: Tensor | None, variant: Variant) -> LossParts:
    hard = bce(outputs[SERVING], labels)
    if not variant.distills:
        return LossParts(hard, hard)
    if teacher is None:
        raise ValueError(f"variant {variant.name!r} distills but no teacher labels were given")
    w, t = variant.weight, variant.temperature
    if variant.aux:
        kd = distillation(outputs[AUX], teacher, t)
        return LossParts(hard + w * kd, hard, kd)
    kd = distillation(outputs[SERVING], teacher, t)
    return LossParts((1 - w) * hard + w * kd, hard, kd)
