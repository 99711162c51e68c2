"""Losses selectable by name in params (`train.loss`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from chromoseg.labels import SWAP_AB, combine_labels


class SegLoss(torch.nn.Module):
    """Class-weighted cross-entropy, soft multiclass dice, or their sum (`ce`, `dice`, `ce+dice`)."""

    def __init__(
        self, kind: str, class_weights: tuple[float, ...], permutation_invariant: bool = False
    ) -> None:
        super().__init__()
        if kind not in ("ce", "dice", "ce+dice"):
            raise ValueError(f"train.loss {kind!r} is not one of ['ce', 'dice', 'ce+dice']")
        self.kind = kind
        # 4 classes only: A and B have no inherent order, so each image is scored against the
        # better of the two assignments (`align_ab`).
        self.permutation_invariant = permutation_invariant and len(class_weights) == 4
        self.register_buffer("weight", torch.tensor(class_weights, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (N, C, H, W), target (N, H, W) int64."""
        logits = logits.float()
        if self.permutation_invariant:
            target = align_ab(logits, target)
        loss = logits.new_zeros(())
        if "ce" in self.kind:
            loss = loss + F.cross_entropy(logits, target, weight=self.weight)
        if "dice" in self.kind:
            loss = loss + soft_dice_loss(logits, target)
        return loss


def merge_ab_logits(logits4: torch.Tensor) -> torch.Tensor:
    """(N, 4, H, W) logits (bg, A, B, overlap) -> (N, 3, H, W) (bg, chromosome, overlap).

    log(exp(a) + exp(b)) for the chromosome class, so the softmax of the result is exactly the
    4-class softmax with P(A) + P(B) pooled.
    """
    merged = torch.logsumexp(logits4[:, 1:3], dim=1, keepdim=True)
    return torch.cat([logits4[:, :1], merged, logits4[:, 3:]], dim=1)


class AuxABLoss(torch.nn.Module):
    """The merged-label loss plus the permutation-invariant 4-class loss (`train.ab_aux`).

    Combined labels: the A/B split is the auxiliary task. 4 classes: the merged term is, and it
    places the overlap outline better than the 4-class term alone (BENCHMARKS.md).

    Takes 4-class logits and 4-class targets: the main term scores the merged (3-class) logits against
    the combined labels, the auxiliary term the 4 classes permutation-invariantly.
    """

    def __init__(self, kind: str, weights3: tuple[float, ...], weights4: tuple[float, ...]) -> None:
        super().__init__()
        self.main = SegLoss(kind, weights3)
        self.aux = SegLoss(kind, weights4, permutation_invariant=True)
        self.register_buffer("combine", torch.as_tensor(combine_labels(np.arange(4)), dtype=torch.long))

    def forward(self, logits4: torch.Tensor, target4: torch.Tensor) -> torch.Tensor:
        logits4 = logits4.float()
        return self.main(merge_ab_logits(logits4), self.combine[target4]) + self.aux(logits4, target4)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft dice over the foreground classes present in the batch or predicted."""
    n_classes = logits.shape[1]
    prob = logits.softmax(dim=1)
    onehot = F.one_hot(target, n_classes).permute(0, 3, 1, 2).to(prob.dtype)
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1 - dice[1:].mean()


def align_ab(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image, the 4-class target (0 bg, 1 A, 2 B, 3 overlap) as given or with A and B swapped,
    whichever the logits fit better (lower mean cross-entropy); no gradient flows through the choice."""
    with torch.no_grad():
        swapped = torch.as_tensor(SWAP_AB, dtype=torch.long, device=target.device)[target]
        ce = F.cross_entropy(logits, target, reduction="none").mean((1, 2))
        ce_sw = F.cross_entropy(logits, swapped, reduction="none").mean((1, 2))
        use = (ce_sw < ce)[:, None, None]
    return torch.where(use, swapped, target)
