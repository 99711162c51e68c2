"""Training throughput of a network variant (BENCHMARKS.md): forward, loss, backward and Adam step at
batch 16 on fixed tensors, after warm-up.

python scripts/frontier_tput.py 'train.decoder_channels=[64,32,16]' ... -- PRECISION CHANNELS_LAST SECONDS SIZE
e.g. python scripts/frontier_tput.py train.crop=64 -- fp32 off 12 64   (run with ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 to emulate an AVX2-only CPU)
"""

import json
import sys
import time

import torch
import yaml

from chromoseg.config import params_from_dict
from chromoseg.model import build_model, exec_plan, prepare_module, set_threads, to_input
from chromoseg.train import make_criterion


def main(argv: list[str]) -> None:
    split = argv.index("--")
    with open("params.yaml") as f:
        raw = yaml.safe_load(f)
    for kv in argv[:split]:
        k, v = kv.split("=", 1)
        sec, key = k.split(".")
        raw[sec][key] = yaml.safe_load(v)
    precision, cl, secs, size = argv[split + 1], argv[split + 2], float(argv[split + 3]), int(argv[split + 4])
    p = params_from_dict(raw)
    set_threads(0)
    plan = exec_plan(precision, cl)
    torch.manual_seed(0)
    net = prepare_module(build_model(p.train, p.n_classes), plan).train()
    crit, opt = make_criterion(p), torch.optim.Adam(net.parameters(), 1e-3)
    x = to_input(torch.rand(16, 1, size, size), plan)
    y = torch.randint(0, 4, (16, size, size))

    def step() -> None:
        with plan.autocast():
            out = net(x)
        loss = crit(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < secs:
        step()
        n += 16
    print(
        json.dumps(
            {
                "precision": plan.precision,
                "channels_last": plan.channels_last,
                "img_s": round(n / (time.perf_counter() - t0), 1),
                "size": size,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
