"""CPU throughput benchmarks: naive fp32 versus the `auto` plan, model-size sweeps, backend checks.

Every measurement runs in its own subprocess (`python -m chromoseg.bench SPEC`) so that the peak
RSS reported for a phase (training, inference at batch 1, inference at batch 64) is that phase's
own high-water mark, and so that one configuration's allocator state or oneDNN caches never speed
up or slow down the next one. Inputs are random: throughput does not depend on pixel values.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from chromoseg.config import TrainConfig

log = logging.getLogger(__name__)

SIZE = 96  # 88x88 images padded to 96x96
TRAIN_BATCH = 16
INFER_BATCHES = (1, 64)
PHASES = ("train", "infer_b1", "infer_b64")

# Model sizes compared in BENCHMARKS.md (`chromoseg bench --sweep`).
PRESETS: dict[str, dict[str, Any]] = {
    "r18-d5": {"encoder": "resnet18", "encoder_depth": 5, "decoder_channels": (256, 128, 64, 32, 16)},
    "r18-d4": {"encoder": "resnet18", "encoder_depth": 4, "decoder_channels": (128, 64, 32, 16)},
    "r18-d3": {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": (64, 32, 16)},
    "r10t-d4": {"encoder": "tu-resnet10t", "encoder_depth": 4, "decoder_channels": (128, 64, 32, 16)},
    "mnv2-d4": {"encoder": "mobilenet_v2", "encoder_depth": 4, "decoder_channels": (128, 64, 32, 16)},
    "mnv2-d5": {"encoder": "mobilenet_v2", "encoder_depth": 5, "decoder_channels": (256, 128, 64, 32, 16)},
}


@dataclass(frozen=True)
class Variant:
    """One way of running a model: precision, memory format and inference backend."""

    name: str
    precision: str = "auto"
    channels_last: str = "auto"
    backend: str = "auto"


NAIVE = Variant("naive-fp32", "fp32", "off", "torch")
AUTO = Variant("auto", "auto", "auto", "auto")
SWEEP_VARIANTS = (
    NAIVE,
    Variant("fp32-cl", "fp32", "on", "torch"),
    Variant("bf16-cl", "bf16", "on", "torch"),
    Variant("fp32-onnx", "fp32", "off", "onnx"),
)


@dataclass(frozen=True)
class Budget:
    """How long each phase runs (timed iterations after warm-up)."""

    train_steps: int = 12
    infer_b1_images: int = 100
    infer_b64_batches: int = 4
    warmup: int = 2

    @classmethod
    def quick(cls) -> Budget:
        return cls(train_steps=3, infer_b1_images=10, infer_b64_batches=1, warmup=1)


def preset(name: str, base: TrainConfig | None = None) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown bench preset {name!r}; choose one of {list(PRESETS)}")
    return dataclasses.replace(base or TrainConfig(), **PRESETS[name])


def default_config(params_path: str = "params.yaml") -> tuple[TrainConfig, int]:
    """The `train` section of params.yaml and the class count, or `TrainConfig()` and 3 if absent."""
    from chromoseg.config import load_params

    if not os.path.isfile(params_path):
        log.info("%s not found: benchmarking TrainConfig() defaults", params_path)
        return TrainConfig(), 3
    p = load_params(params_path)
    if p.ab_aux:
        # The network has 4 output channels (A and B merged only at its output): bench it as such,
        # so that the toy-training check trains and scores the same channels.
        return dataclasses.replace(p.train, ab_aux=False), 4
    return p.train, p.n_classes


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (MiB); Linux reports KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_params(cfg: TrainConfig, n_classes: int) -> dict[str, int]:
    """Total parameters, and those the forward pass actually uses (a gradient reaches them)."""
    import torch

    from chromoseg.model import build_model, input_multiple

    model = build_model(cfg, n_classes)
    m = input_multiple(cfg)
    model(torch.zeros(2, 1, m, m)).sum().backward()
    used = sum(p.numel() for p in model.parameters() if p.grad is not None)
    return {"params": sum(p.numel() for p in model.parameters()), "params_used": used}


def measure_train(cfg: TrainConfig, n_classes: int, variant: Variant, budget: Budget) -> dict[str, Any]:
    """Training throughput (img/s): forward, cross-entropy, backward and an Adam step at batch 16."""
    import torch

    from chromoseg.model import build_model, exec_plan, prepare_module, to_input

    plan = exec_plan(variant.precision, variant.channels_last, device="cpu")
    torch.manual_seed(0)
    model = prepare_module(build_model(cfg, n_classes), plan).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = to_input(torch.rand(TRAIN_BATCH, 1, SIZE, SIZE), plan)
    y = torch.randint(0, n_classes, (TRAIN_BATCH, SIZE, SIZE))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with plan.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    for _ in range(budget.warmup):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(budget.train_steps):
        step()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = budget.train_steps * TRAIN_BATCH
    return {"img_s": n / dt, "img_per_cpu_s": n / cpu, "seconds": dt, "plan": plan.describe()}


def measure_infer(
    cfg: TrainConfig, n_classes: int, variant: Variant, batch: int, n_calls: int, warmup: int
) -> dict[str, Any]:
    """Inference throughput (img/s) of `Predictor.predict_logits` on (batch, 96, 96) float32 images."""
    import torch

    from chromoseg.infer import Predictor
    from chromoseg.model import build_model, exec_plan

    plan = exec_plan(variant.precision, variant.channels_last, device="cpu")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pred = Predictor(
        build_model(cfg, n_classes), cfg, n_classes, plan, backend=variant.backend, batch_size=64
    )
    images = np.random.default_rng(0).random((batch, SIZE, SIZE), dtype=np.float32)
    for _ in range(warmup):
        pred.predict_logits(images)
    setup = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_calls):
        pred.predict_logits(images)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = n_calls * batch
    return {
        "img_s": n / dt,
        "img_per_cpu_s": n / cpu,
        "seconds": dt,
        "setup_s": setup,
        "backend": pred.backend,
    }


def run_phase(
    cfg: TrainConfig, n_classes: int, variant: Variant, phase: str, budget: Budget
) -> dict[str, Any]:
    """One phase in this process, with its RSS before and its high-water mark after (MiB)."""
    rss0 = peak_rss_mb()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if phase == "train":
        res = measure_train(cfg, n_classes, variant, budget)
    elif phase == "infer_b1":
        res = measure_infer(cfg, n_classes, variant, 1, budget.infer_b1_images, budget.warmup)
    elif phase == "infer_b64":
        res = measure_infer(cfg, n_classes, variant, 64, budget.infer_b64_batches, 1)
    else:
        raise ValueError(f"unknown phase {phase!r}; choose one of {list(PHASES)}")
    return {**res, "rss_start_mb": rss0, "peak_rss_mb": peak_rss_mb(), "cpu_util": _cpu_util(wall0, cpu0)}


def _cpu_util(wall0: float, cpu0: float) -> float:
    """CPU seconds used / (wall seconds x threads) since the marks. Well below 1: other processes
    were competing for the cores and the img/s of this phase are too low."""
    import torch

    wall = time.perf_counter() - wall0
    return (time.process_time() - cpu0) / (wall * torch.get_num_threads())


def contended(res: dict[str, Any], threshold: float = 0.75) -> list[str]:
    """Phases of a `compare` result whose CPU share suggests a busy machine."""
    return [
        f"{side}/{ph} ({res[side][ph]['cpu_util']:.0%})"
        for side in ("naive", "auto")
        for ph in PHASES
        if res[side][ph]["cpu_util"] < threshold
    ]


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return {"arch": cfg.arch, "encoder": cfg.encoder, "encoder_depth": cfg.encoder_depth,
            "decoder_channels": list(cfg.decoder_channels)}  # fmt: skip


def run_isolated(
    cfg: TrainConfig,
    n_classes: int,
    variant: Variant,
    phase: str,
    budget: Budget,
    threads: int = 0,
    emulate_avx2: bool = False,
) -> dict[str, Any]:
    """`run_phase` in a fresh interpreter; returns its JSON result."""
    spec = {
        "cfg": _config_dict(cfg),
        "n_classes": n_classes,
        "variant": dataclasses.asdict(variant),
        "phase": phase,
        "budget": dataclasses.asdict(budget),
        "threads": threads,
    }
    env = dict(os.environ)
    if emulate_avx2:
        # Caps oneDNN and ATen kernels at AVX2, a stand-in for the AVX2-only machines (ONNX Runtime's
        # MLAS has no such switch and still uses AVX-512 here).
        env.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    proc = subprocess.run(
        [sys.executable, "-m", "chromoseg.bench", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker failed for {variant.name}/{phase}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_variant(
    cfg: TrainConfig,
    n_classes: int,
    variant: Variant,
    budget: Budget,
    threads: int = 0,
    emulate_avx2: bool = False,
    phases: tuple[str, ...] = PHASES,
    isolate: bool = True,
) -> dict[str, Any]:
    """Every phase of one variant; `isolate=False` runs them in this process (faster to start, but
    peak RSS is then this process's high-water mark so far, not the phase's own)."""
    if not isolate:
        if emulate_avx2:
            raise ValueError("emulate_avx2 needs isolate=True (the ISA cap is read at process start)")
        return {ph: run_phase(cfg, n_classes, variant, ph, budget) for ph in phases}
    return {ph: run_isolated(cfg, n_classes, variant, ph, budget, threads, emulate_avx2) for ph in phases}


def machine_info(threads: int = 0) -> dict[str, Any]:
    import torch

    from chromoseg.model import cpu_model, fast_cpu_bf16, set_threads

    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": fast_cpu_bf16(),
        "threads": set_threads(threads),
        "torch": torch.__version__,
    }


def compare(
    cfg: TrainConfig,
    n_classes: int,
    quick: bool = False,
    threads: int = 0,
    emulate_avx2: bool = False,
    isolate: bool = True,
) -> dict[str, Any]:
    """Naive fp32 (eager, NCHW) versus the `auto` plan, per phase; speed-ups are auto / naive."""
    t0 = time.perf_counter()
    budget = Budget.quick() if quick else Budget()
    info = machine_info(threads)
    runs = {
        v.name: bench_variant(cfg, n_classes, v, budget, threads, emulate_avx2, isolate=isolate)
        for v in (NAIVE, AUTO)
    }
    naive, auto = runs[NAIVE.name], runs[AUTO.name]
    speed = {ph: auto[ph]["img_s"] / naive[ph]["img_s"] for ph in PHASES}
    return {
        "train_speedup": speed["train"],
        "infer_speedup": speed["infer_b64"],
        "infer_speedup_b1": speed["infer_b1"],
        "cpu": info["cpu"],
        "machine": {**info, "emulate_avx2": emulate_avx2},
        "config": {**_config_dict(cfg), "n_classes": n_classes, "size": SIZE, "train_batch": TRAIN_BATCH},
        "quick": quick,
        "isolated": isolate,
        "auto_plan": auto["train"]["plan"],
        "auto_infer_backend": auto["infer_b64"]["backend"],
        "naive": naive,
        "auto": auto,
        "seconds": time.perf_counter() - t0,
        "load_avg_1m": os.getloadavg()[0],
    }


def format_compare(res: dict[str, Any]) -> str:
    """The `compare` result as a plain-text table."""
    c, m = res["config"], res["machine"]
    lines = [
        f"CPU: {res['cpu']} ({m['cpu_capability']}, native bf16: {m['native_bf16']},"
        f" {m['threads']} threads, torch {m['torch']}, AVX2 emulated: {m['emulate_avx2']})",
        f"Model: {c['arch']} {c['encoder']} depth {c['encoder_depth']} decoder {c['decoder_channels']},"
        f" {c['n_classes']} classes, {c['size']}x{c['size']}",
        f"auto plan: {res['auto_plan']['precision']}, channels_last={res['auto_plan']['channels_last']},"
        f" inference backend {res['auto_infer_backend']}",
        "",
        f"{'phase':<24}{'naive fp32':>12}{'auto':>12}{'speed-up':>10}{'naive MiB':>11}{'auto MiB':>10}",
    ]
    names = {"train": "train img/s (b16)", "infer_b1": "infer img/s (b1)", "infer_b64": "infer img/s (b64)"}
    for ph in PHASES:
        n, a = res["naive"][ph], res["auto"][ph]
        lines.append(
            f"{names[ph]:<24}{n['img_s']:>12.1f}{a['img_s']:>12.1f}{a['img_s'] / n['img_s']:>9.2f}x"
            f"{n['peak_rss_mb']:>11.0f}{a['peak_rss_mb']:>10.0f}"
        )
    lines.append(f"(peak RSS per phase, own process; bench took {res['seconds']:.0f} s)")
    busy = contended(res)
    if busy:
        lines.append(f"WARNING: other processes shared the CPU during {', '.join(busy)}; rerun when idle")
    return "\n".join(lines)


def sweep(
    names: tuple[str, ...],
    n_classes: int = 3,
    variants: tuple[Variant, ...] = SWEEP_VARIANTS,
    quick: bool = False,
    threads: int = 0,
    emulate_avx2: bool = False,
) -> list[dict[str, Any]]:
    """Every preset x variant: train img/s, infer img/s at batch 1 and 64, parameter counts."""
    # Shorter than `compare`'s budget: a sweep runs dozens of phases.
    budget = Budget.quick() if quick else Budget(train_steps=6, infer_b1_images=40, infer_b64_batches=2)
    rows = []
    for name in names:
        cfg = preset(name)
        counts = count_params(cfg, n_classes)
        for v in variants:
            phases = PHASES if v.backend in ("torch", "auto") else ("infer_b1", "infer_b64")
            r = bench_variant(cfg, n_classes, v, budget, threads, emulate_avx2, phases)
            rows.append({"config": name, "variant": v.name, **counts,
                         **{f"{ph}_img_s": r[ph]["img_s"] for ph in phases},
                         **{f"{ph}_img_per_cpu_s": r[ph]["img_per_cpu_s"] for ph in phases},
                         "min_cpu_util": min(r[ph]["cpu_util"] for ph in phases)})  # fmt: skip
            log.info("%s", rows[-1])
    return rows


def format_sweep(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'config':<10}{'variant':<12}{'params M':>9}{'used M':>8}{'train':>9}{'inf b1':>9}{'inf b64':>9}"
        f"{'cpu %':>7}{'train/cpu-s':>12}{'b64/cpu-s':>10}"
    )
    out = [head]
    for r in rows:
        tr = f"{r['train_img_s']:.1f}" if "train_img_s" in r else "-"
        out.append(
            f"{r['config']:<10}{r['variant']:<12}{r['params'] / 1e6:>9.2f}{r['params_used'] / 1e6:>8.2f}"
            f"{tr:>9}{r['infer_b1_img_s']:>9.1f}{r['infer_b64_img_s']:>9.1f}{r['min_cpu_util']:>7.0%}"
            f"{r.get('train_img_per_cpu_s', float('nan')):>12.1f}{r['infer_b64_img_per_cpu_s']:>10.1f}"
        )
    return "\n".join(out)


def toy_batch(
    rng: np.random.Generator, n: int, n_classes: int, size: int = SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping bright ellipses per image: (N, size, size) float32 images, (N, size, size) labels.

    Labels: 0 background, then one class per ellipse (or one shared class when `n_classes` is 3),
    and the last class where they overlap. Enough to give a network confident, realistic logits.
    """
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images = np.zeros((n, size, size), np.float32)
    labels = np.zeros((n, size, size), np.int64)
    for i in range(n):
        masks = []
        for _ in range(2):
            cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
            a, b = rng.uniform(4, 8), rng.uniform(15, 30)
            t = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
            v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
            masks.append((u / b) ** 2 + (v / a) ** 2 <= 1)
        a_mask, b_mask = masks
        images[i] = np.clip(0.5 * a_mask + 0.5 * b_mask + rng.normal(0, 0.03, (size, size)), 0, 1)
        labels[i][a_mask] = 1
        labels[i][b_mask] = 1 if n_classes == 3 else 2
        labels[i][a_mask & b_mask] = n_classes - 1
    return images, labels


def check_backends(
    cfg: TrainConfig, n_classes: int = 3, batch: int = 64, repeats: int = 3, train_steps: int = 40
) -> dict[str, Any]:
    """Each inference backend against eager fp32: setup time, img/s, argmax agreement, max logit diff.

    Runs in this process. The network is first trained for `train_steps` on `toy_batch` data so that
    its logits are as confident as a real model's; random weights give near-tied logits whose argmax
    flips under any rounding, which says nothing about a trained model.
    """
    import torch

    from chromoseg.infer import Predictor
    from chromoseg.model import build_model, exec_plan, prepare_module, to_input

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train_plan = exec_plan("auto", "auto", device="cpu")
    model = prepare_module(build_model(cfg, n_classes), train_plan).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(train_steps):
        x, y = toy_batch(rng, TRAIN_BATCH, n_classes)
        opt.zero_grad(set_to_none=True)
        with train_plan.autocast():
            logits = model(to_input(torch.from_numpy(x[:, None]), train_plan))
        torch.nn.functional.cross_entropy(logits.float(), torch.from_numpy(y)).backward()
        opt.step()
    model = model.to(memory_format=torch.contiguous_format).eval()
    log.info("toy training: %d steps in %.1f s", train_steps, time.perf_counter() - t0)
    images, labels = toy_batch(rng, batch, n_classes)
    odd = toy_batch(rng, 4, n_classes, size=131)[0][:, :100]
    ref_plan = exec_plan("fp32", "off", device="cpu")
    ref = Predictor(model, cfg, n_classes, ref_plan, backend="torch").predict_logits(images)
    ref_odd = Predictor(model, cfg, n_classes, ref_plan, backend="torch").predict_logits(odd)
    out: dict[str, Any] = {"toy_pixel_accuracy_fp32": float((ref.argmax(1) == labels).mean())}
    for name, prec, cl, backend in (
        ("torch fp32 cl", "fp32", "on", "torch"),
        ("torch bf16 cl", "bf16", "on", "torch"),
        ("onnx fp32", "fp32", "off", "onnx"),
        ("compile fp32 cl", "fp32", "on", "compile"),
        ("compile bf16 cl", "bf16", "on", "compile"),
    ):
        plan = exec_plan(prec, cl, device="cpu")
        t0 = time.perf_counter()
        pred = Predictor(model, cfg, n_classes, plan, backend=backend)
        got = pred.predict_logits(images)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            pred.predict_logits(images)
        speed = repeats * batch / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        pred.predict_logits(images[:1])
        b1_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        got_odd = pred.predict_logits(odd)
        new_shape_s = time.perf_counter() - t0
        out[name] = {
            "setup_and_first_call_s": setup,
            "b1_first_call_s": b1_first,
            "new_shape_first_call_s": new_shape_s,
            "img_s_b64": speed,
            "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
            "argmax_agreement_100x131": float((got_odd.argmax(1) == ref_odd.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(got - ref).max()),
            "max_abs_logit": float(np.abs(ref).max()),
        }
        log.info("%s: %s", name, out[name])
    return out


def _worker(spec_json: str) -> None:
    """Subprocess entry: run one phase, write its JSON result as the last line of stdout."""
    spec = json.loads(spec_json)
    from chromoseg.model import set_threads

    set_threads(spec["threads"])
    c = spec["cfg"]
    cfg = dataclasses.replace(TrainConfig(), **{**c, "decoder_channels": tuple(c["decoder_channels"])})
    res = run_phase(
        cfg, spec["n_classes"], Variant(**spec["variant"]), spec["phase"], Budget(**spec["budget"])
    )
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    for _var, _val in (("NO_ALBUMENTATIONS_UPDATE", "1"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(_var, _val)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _worker(sys.argv[1])
