"""The exponential moving average of weights kept during training (`train.ema`)."""

from __future__ import annotations

import torch

from chromoseg.train import WeightAverage


def _net(value: float) -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.fill_(value)
    return net


def test_average_follows_the_ramped_decay_and_copies_integer_buffers():
    net = _net(0.0)
    avg = WeightAverage(net, decay=0.9)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        with torch.no_grad():
            net[0].weight.fill_(value)
        net[1].num_batches_tracked += 1
        avg.update(net)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * value
    assert torch.allclose(avg.module[0].weight, torch.tensor([[expected]]))
    assert avg.module[1].num_batches_tracked.item() == 4  # integer buffers are copied, not averaged
    assert avg.target(net) is avg.module
    assert not any(p.requires_grad for p in avg.module.parameters())


def test_state_round_trip_resumes_the_same_average():
    net = _net(1.0)
    a = WeightAverage(net, decay=0.99)
    for _ in range(3):
        a.update(net)
    b = WeightAverage(_net(5.0), decay=0.99)
    b.load(a.state())
    assert b.updates == 3
    assert torch.equal(b.module[0].weight, a.module[0].weight)


def test_disabled_average_is_the_network_itself():
    net = _net(1.0)
    off = WeightAverage(net, decay=0.0)
    off.update(net)
    assert off.target(net) is net and off.state() is None
