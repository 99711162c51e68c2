"""Losses: the permutation-invariant A/B alignment and the combined CE + dice loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from chromoseg.infer import Predictor
from chromoseg.labels import canonical_ab
from chromoseg.losses import AuxABLoss, SegLoss, align_ab, merge_ab_logits


def _labels4() -> torch.Tensor:
    """Two 8x8 images: A a 3-row bar, B a 2-column bar, crossing in an overlap."""
    y = np.zeros((2, 8, 8), np.int64)
    for img in y:
        img[2:5, :] = 1
        img[:, 5:7] = np.where(img[:, 5:7] == 1, 3, 2)
    return torch.from_numpy(y)


def _confident_logits(target: torch.Tensor, n_classes: int = 4) -> torch.Tensor:
    return F.one_hot(target, n_classes).permute(0, 3, 1, 2).float() * 8.0


def test_align_ab_picks_the_assignment_the_logits_fit():
    y = _labels4()
    swapped = torch.tensor([0, 2, 1, 3])[y]
    # Image 0 predicted as labelled, image 1 predicted with A and B swapped.
    logits = _confident_logits(torch.stack([y[0], swapped[1]]))
    aligned = align_ab(logits, y)
    assert torch.equal(aligned[0], y[0])
    assert torch.equal(aligned[1], swapped[1])


def test_pi_loss_ignores_a_swap_and_plain_loss_does_not():
    y = _labels4()
    swapped = torch.tensor([0, 2, 1, 3])[y]
    right, wrong = _confident_logits(y), _confident_logits(swapped)
    weights = (1.0, 1.0, 1.0, 1.0)
    pi = SegLoss("ce+dice", weights, permutation_invariant=True)
    plain = SegLoss("ce+dice", weights)
    assert torch.isclose(pi(wrong, y), pi(right, y))
    assert plain(wrong, y) > plain(right, y) + 1.0
    # 3 classes: nothing to permute, the flag is ignored.
    assert not SegLoss("ce", (1.0, 1.0, 1.0), permutation_invariant=True).permutation_invariant


def test_merge_ab_logits_pools_a_and_b_probabilities():
    logits4 = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(3))
    p4 = logits4.softmax(1)
    p3 = merge_ab_logits(logits4).softmax(1)
    torch.testing.assert_close(p3[:, 0], p4[:, 0])
    torch.testing.assert_close(p3[:, 1], p4[:, 1] + p4[:, 2])
    torch.testing.assert_close(p3[:, 2], p4[:, 3])


def test_aux_ab_loss_is_the_combined_loss_plus_a_permutation_invariant_term():
    y = _labels4()
    swapped = torch.tensor([0, 2, 1, 3])[y]
    combined = torch.tensor([0, 1, 1, 2])[y]
    logits = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    w3, w4 = (1.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0)
    aux = AuxABLoss("ce+dice", w3, w4)
    expected = SegLoss("ce+dice", w3)(merge_ab_logits(logits), combined) + SegLoss(
        "ce+dice", w4, permutation_invariant=True
    )(logits, y)
    torch.testing.assert_close(aux(logits, y), expected)
    # A and B carry no order: swapping them in the target changes nothing.
    torch.testing.assert_close(aux(logits, swapped), aux(logits, y))
    # A network that calls both chromosomes "A" is right in combined terms, but the auxiliary term
    # still charges it for not telling them apart.
    no_split = torch.tensor([0, 1, 1, 3])[y]
    assert aux(_confident_logits(no_split), y) > aux(_confident_logits(y), y) + 1.0


class _Fixed(torch.nn.Module):
    """A 'network' whose logits are a fixed label map (channels = one-hot)."""

    def __init__(self, labels: np.ndarray) -> None:
        super().__init__()
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        lab = torch.zeros((n, h, w), dtype=torch.int64)
        lh, lw = self.labels.shape[1:]
        top, left = (h - lh) // 2, (w - lw) // 2
        lab[:, top : top + lh, left : left + lw] = self.labels[:n]
        return _confident_logits(lab) + self.dummy


def test_predictor_orders_4_class_output_like_the_training_labels():
    from chromoseg.config import TrainConfig
    from chromoseg.model import exec_plan

    y = _labels4().numpy().astype(np.uint8)
    # The network answers with the smaller chromosome as "A" in image 1.
    raw = y.copy()
    raw[1] = np.array([0, 2, 1, 3], np.uint8)[y[1]]
    cfg = TrainConfig(
        encoder_depth=3, decoder_channels=(16, 8, 4), full_res_channels=0, global_context=0, ab_aux=False
    )
    images = np.zeros((2, 8, 8), np.float32)
    plan = exec_plan("fp32", "off")
    as_is = Predictor(_Fixed(raw), cfg, 4, plan, backend="torch").predict_labels(images)
    ordered = Predictor(_Fixed(raw), cfg, 4, plan, backend="torch", ab_order="area").predict_labels(images)
    assert np.array_equal(as_is, raw)
    assert np.array_equal(ordered, canonical_ab(raw, "area"))
    assert not np.array_equal(ordered, raw)
