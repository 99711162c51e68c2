"""Training pieces: the loss chosen by the params, and what it makes of a 4-class model."""

from __future__ import annotations

import numpy as np
import torch

from chromoseg.config import params_from_dict
from chromoseg.losses import AuxABLoss, SegLoss
from chromoseg.model import MergeAB, build_model
from chromoseg.train import make_criterion

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
