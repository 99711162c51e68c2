"""Training pieces: the loss chosen by the params, and what it makes of a 4-class model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chromoseg.config import ConfigError, params_from_dict
from chromoseg.losses import AuxABLoss, SegLoss
from chromoseg.model import MergeAB, build_model
from chromoseg.train import crop_around_pair, make_criterion

TINY = {"encoder_depth": 3, "decoder_channels": [8, 8, 8], "full_res_channels": 8, "global_context": 8}


def _params(combine: bool, aux: bool):
    return params_from_dict({"combine_label": combine, "train": {**TINY, "ab_aux": aux}})


def test_criterion_follows_mode_and_ab_aux() -> None:
    assert isinstance(make_criterion(_params(True, True)), AuxABLoss)
    assert isinstance(make_criterion(_params(False, True)), AuxABLoss)
    plain3, plain4 = make_criterion(_params(True, False)), make_criterion(_params(False, False))
    assert isinstance(plain3, SegLoss) and len(plain3.weight) == 3
    assert isinstance(plain4, SegLoss) and len(plain4.weight) == 4 and plain4.permutation_invariant


def _trained(params, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """The 4-channel network's weights after `steps` Adam steps from seed 0."""
    torch.manual_seed(0)
    net = build_model(params.train, params.n_classes).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    crit = make_criterion(params)
    for _ in range(steps):
        opt.zero_grad()
        crit(net(x), y).backward()
        opt.step()
    return (net.net if isinstance(net, MergeAB) else net).state_dict()


def test_four_class_with_ab_aux_trains_exactly_like_the_combined_model_with_the_head() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((2, 1, 32, 32), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 4, (2, 32, 32)))  # 4-class targets in both modes
    combined = _trained(_params(True, True), x, y, 2)
    four = _trained(_params(False, True), x, y, 2)
    assert combined.keys() == four.keys()
    for key in combined:
        torch.testing.assert_close(four[key], combined[key], rtol=0, atol=0, msg=key)
    # Without the merged term the 4-class model trains differently.
    plain = _trained(_params(False, False), x, y, 1)
    head = [k for k in four if k.startswith("head.")][-1]
    assert not torch.equal(plain[head], four[head])


def test_crop_around_pair_keeps_the_pair_and_the_label_with_the_image() -> None:
    rng = np.random.default_rng(0)
    image = np.arange(88 * 88, dtype=np.int64).reshape(88, 88)
    label = np.zeros((88, 88), np.uint8)
    label[60:80, 62:86] = 1  # a pair near the bottom-right corner
    label[70:75, 70:75] = 3
    for _ in range(20):
        im, lab = crop_around_pair(image, label, 64, rng)
        assert im.shape == lab.shape == (64, 64)
        top, left = divmod(int(im[0, 0]), 88)  # where the window starts in the full image
        np.testing.assert_array_equal(lab, label[top : top + 64, left : left + 64])
        assert (lab == 3).sum() == 25  # the overlap, a quarter window from the centroid, stays inside
    # A window as large as the image, or an empty label, gives a valid window.
    assert crop_around_pair(image, label, 88, rng)[0].shape == (88, 88)
    assert crop_around_pair(image, np.zeros_like(label), 64, rng)[1].shape == (64, 64)


def test_crop_must_fit_the_network() -> None:
    with pytest.raises(ConfigError, match=r"train\.crop must be 0"):
        params_from_dict({"train": {**TINY, "crop": 60}})
    assert params_from_dict({"train": {**TINY, "crop": 64}}).train.crop == 64
