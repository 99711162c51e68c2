"""Stage `train`: fit the U-Net on the prepared train split, select on validation dice, log to MLflow.

Every epoch draws `samples_per_epoch` training images (Ghosh 2017: 1000) with an RNG seeded by
(seed, epoch), and augmentation and torch RNGs are re-seeded the same way, so an interrupted run that
resumes from its last epoch checkpoint ends with exactly the weights of an uninterrupted one.

SIGTERM stops training at the next batch boundary: nothing is written beyond the last complete epoch
checkpoint, the MLflow run is marked KILLED (the next start reopens it) and `chromoseg train` exits
143; running the stage again resumes. Under `torchrun` the stage trains data-parallel, see
`chromoseg.distributed`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from chromoseg import distributed as ddp
from chromoseg.config import Params, TrainConfig
from chromoseg.fsutil import atomic_path, write_json
from chromoseg.infer import Predictor, normalize_intensity
from chromoseg.labels import canonical_ab, combine_labels
from chromoseg.losses import AuxABLoss, SegLoss
from chromoseg.metrics import SegmentationMetrics
from chromoseg.model import build_model, exec_plan, input_multiple, prepare_module, set_threads, to_input
from chromoseg.prepare import load_split
from chromoseg.tracking import project_root
from chromoseg.transforms import train_transform

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
RUN_FILE = "run.json"
CHECKPOINT_ARTIFACT_DIR = "checkpoint"  # the run artifact folder of the trained model.pt


class TrainingInterruptedError(RuntimeError):
    """Training stopped by a signal; the last epoch checkpoint is kept for resumption."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(
            f"training stopped by {signal.Signals(signum).name}; the last complete epoch is "
            "checkpointed in .chromoseg/resume/: run the stage again to resume"
        )


class StopRequest:
    """Set by SIGTERM; training checks it between batches. A second SIGTERM stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise TrainingInterruptedError(signum)
        self.signum = signum
        log.warning("%s received: stopping at the next batch boundary", signal.Signals(signum).name)


@contextmanager
def stop_on_sigterm():
    """Route SIGTERM to a StopRequest while training (main thread only; elsewhere a no-op)."""
    stop = StopRequest()
    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: keep the default handler
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pad_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad (..., H, W) at the bottom/right with zeros (background) to a multiple; return original H, W."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        pad = [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]
        x = np.pad(x, pad)
    return x, (h, w)


class WeightAverage:
    """Exponential moving average of a module's float state (weights and batch-norm statistics).

    `decay` 0 disables it. The effective decay ramps up as min(decay, (1 + n) / (10 + n)) over the
    first updates so that the average is not dominated by the random initialisation. Validation,
    the best checkpoint and the served model use the average; the optimiser steps the raw weights.
    """

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(net).eval() if decay > 0 else None
        if self.module is not None:
            for p in self.module.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        if self.module is None:
            return
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, cur in zip(self.module.state_dict().values(), net.state_dict().values(), strict=True):
            if avg.dtype.is_floating_point:
                avg.lerp_(cur.detach(), 1.0 - d)
            else:
                avg.copy_(cur)

    def target(self, net: torch.nn.Module) -> torch.nn.Module:
        """The module to validate and save: the average when enabled, else `net` itself."""
        return self.module if self.module is not None else net

    def state(self) -> dict | None:
        if self.module is None:
            return None
        return {"updates": self.updates, "state": self.module.state_dict()}

    def load(self, state: dict | None) -> None:
        if self.module is not None and state is not None:
            self.updates = state["updates"]
            self.module.load_state_dict(state["state"])


class BatchSampler:
    """Seeded per-epoch sampling and augmentation from in-memory arrays (no per-epoch state carried)."""

    def __init__(self, images: np.ndarray, labels4: np.ndarray, params: Params) -> None:
        self.images = images
        self.labels4 = labels4
        self.params = params
        self.cfg = params.train
        self.multiple = input_multiple(self.cfg)
        self.transform = train_transform(params.seed, enabled=self.cfg.augment)

    def epoch(self, epoch: int):
        """Yield (x float32 (B,1,H,W), y int64 (B,H,W)) batches for `epoch`, padded to the multiple."""
        seed = self.params.seed * 100_003 + epoch
        rng = np.random.default_rng(seed)
        self.transform.set_random_seed(seed)
        n = self.cfg.samples_per_epoch
        idx = rng.choice(len(self.images), size=n, replace=n > len(self.images))
        bs = self.cfg.batch_size
        for start in range(0, n, bs):
            xs, ys = [], []
            for i in idx[start : start + bs]:
                out = self.transform(image=self.images[i], mask=self.labels4[i])
                xs.append(out["image"])
                ys.append(out["mask"])
            p = self.params
            yield to_batch(xs, ys, self.cfg, p.combine_label, p.prepare.ab_order, self.multiple, rng)


def to_batch(
    images: list[np.ndarray],
    labels4: list[np.ndarray],
    cfg: TrainConfig,
    combine_label: bool,
    ab_order: str,
    multiple: int,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented (H, W) uint8 images and 4-class labels -> x (B, 1, H, W) float32, y (B, H, W) int64.

    Cut to the window around the pair (`cfg.crop`), A and B named by `ab_order`, merged where the
    loss wants combined labels (not with the A/B head, whose loss merges them), padded to `multiple`
    and grey-normalised as at inference.
    """
    if cfg.crop:
        images, labels4 = zip(*(crop_around_pair(a, b, cfg.crop, rng) for a, b in zip(images, labels4)))
    y = canonical_ab(np.stack(labels4), ab_order)
    if combine_label and not cfg.ab_aux:
        y = combine_labels(y)
    x, _ = pad_to_multiple(np.stack(images), multiple)
    y, _ = pad_to_multiple(y, multiple)
    xf = normalize_intensity(x.astype(np.float32) / 255.0, cfg.normalize)
    return torch.from_numpy(xf)[:, None], torch.from_numpy(y.astype(np.int64))


def crop_around_pair(
    image: np.ndarray, label: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A `size` x `size` window of (H, W) image and label, around the chromosomes' centroid.

    Most of an 88 x 88 image is background; training on the window around the pair spends the
    network's compute where the labels are hard. The window's centre is the foreground centroid
    shifted by up to a quarter of `size` each way, kept inside the image.
    """
    h, w = label.shape
    if size >= min(h, w):
        return image, label
    ys, xs = np.nonzero(label)
    cy, cx = (ys.mean(), xs.mean()) if len(ys) else (h / 2, w / 2)
    jy, jx = rng.uniform(-size / 4, size / 4, 2)
    top = int(np.clip(round(cy + jy - size / 2), 0, h - size))
    left = int(np.clip(round(cx + jx - size / 2), 0, w - size))
    return image[top : top + size, left : left + size], label[top : top + size, left : left + size]


def make_criterion(params: Params) -> torch.nn.Module:
    """The training loss for these params (labels: 4-class with `train.ab_aux`, else the model's)."""
    cfg = params.train
    if cfg.ab_aux:
        # 4 classes too: the same network and loss as a combined model with the A/B head, which
        # places the overlap outline better than the 4-class term alone (BENCHMARKS.md).
        return AuxABLoss(cfg.loss, cfg.class_weights_combined, cfg.class_weights_4)
    weights = cfg.class_weights_combined if params.combine_label else cfg.class_weights_4
    # 4 classes: each image scored against the better of the two A/B assignments (A, B unordered).
    return SegLoss(cfg.loss, weights, permutation_invariant=not params.combine_label)


def steps_per_epoch(params: Params) -> int:
    return math.ceil(params.train.samples_per_epoch / params.train.batch_size)


def make_scheduler(opt: torch.optim.Optimizer, params: Params):
    total = params.train.epochs * steps_per_epoch(params)
    kind = params.train.scheduler
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=params.train.lr * 0.01)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _fingerprint(params: Params, train_file: Path, world_size: int = 1) -> str:
    """Identity of a training run: everything that changes its result (for safe resumption)."""
    h = hashlib.sha256()
    relevant = {
        "seed": params.seed,
        "combine_label": params.combine_label,
        "train": asdict(params.train),
        "prepare": asdict(params.prepare),
    }
    for key in ("num_threads",):  # how many cores: same weights
        relevant["train"].pop(key, None)
    if world_size > 1:  # per-rank batch-norm statistics: not interchangeable with a 1-process run
        relevant["world_size"] = world_size
    h.update(json.dumps(relevant, sort_keys=True, default=str).encode())
    st = train_file.stat()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def resume_path(params: Params, fingerprint: str) -> Path:
    return project_root() / ".chromoseg" / "resume" / f"train-{fingerprint}.pt"


def _train_epoch(
    model, sampler, criterion, opt, sched, plan, seed, epoch, dist, stop, ema=None
) -> list[float]:
    """One epoch of optimiser steps on this rank's shards; raise TrainingInterruptedError between batches."""
    torch.manual_seed(seed * 100_003 + epoch)
    model.train()
    losses = []
    for x, y in sampler.epoch(epoch):
        x = to_input(ddp.shard(x, dist), plan)
        y = ddp.shard(y, dist).to(plan.device)
        with plan.autocast():
            logits = model(x)
        loss = criterion(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(ddp.unwrap(model))
        losses.append(loss.item())
        # Every rank must leave at the same step, or the others would wait in DDP's all-reduce.
        if ddp.any_rank(stop.signum is not None, dist, plan.device):
            raise TrainingInterruptedError(stop.signum or signal.SIGTERM)
    return losses


def run_train(params: Params) -> dict:
    """Train, resuming from a matching checkpoint; data-parallel when started by torchrun."""
    dist = ddp.from_env()
    if dist.enabled:
        ddp.per_rank_batch(params.train.batch_size, params.train.samples_per_epoch, dist)
    try:
        with stop_on_sigterm() as stop:
            return _train(params, dist, stop)
    except BaseException as exc:
        _end_active_run(exc)
        raise
    finally:
        ddp.cleanup(dist)


def _end_active_run(exc: BaseException) -> None:
    """Close an open MLflow run: KILLED when stopped (the next start reopens it), else FAILED."""
    import mlflow

    if mlflow.active_run() is not None:
        stopped = isinstance(exc, TrainingInterruptedError | KeyboardInterrupt)
        mlflow.end_run(status="KILLED" if stopped else "FAILED")


def _train(params: Params, dist: ddp.DistInfo, stop: StopRequest) -> dict:
    import mlflow

    from chromoseg.tracking import launcher_run_id, setup_mlflow

    cfg = params.train
    seed_everything(params.seed)
    threads = set_threads(ddp.threads_per_rank(cfg.num_threads, dist))
    plan = exec_plan(cfg.precision, cfg.channels_last)
    ddp.init(dist, plan.device)
    log.info("execution plan: %s, %d threads", plan.describe(), threads)

    prep_dir = Path(params.prepare.out_dir)
    tr = load_split(prep_dir, "train")
    va = load_split(prep_dir, "val")
    sampler = BatchSampler(tr["images"], tr["labels4"], params)

    model = prepare_module(build_model(cfg, params.n_classes), plan)
    criterion = make_criterion(params).to(plan.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, params)

    fp = _fingerprint(params, prep_dir / "train.npz", dist.world_size)
    ckpt_path = resume_path(params, fp)
    start_epoch, history, best = 0, [], {"dice": -1.0, "epoch": -1, "state": None}
    run_id = None
    # Only the main rank validates and saves, so only it keeps the average.
    ema = WeightAverage(model, cfg.ema if dist.is_main else 0.0)
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=plan.device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["torch_rng"])
        ema.load(ck.get("ema"))
        start_epoch, history, best, run_id = ck["epoch"] + 1, ck["history"], ck["best"], ck["run_id"]
        log.info("resuming from %s at epoch %d (MLflow run %s)", ckpt_path, start_epoch, run_id)
    # `net` is the plain module (validation, checkpoints); `model` the one that steps (DDP or not).
    net, model = model, ddp.wrap(model, dist, plan.device)

    if dist.is_main:
        setup_mlflow(params.mlflow)
        parent = launcher_run_id()
        tags = {"mlflow.parentRunId": parent} if parent and not run_id else None
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else f"unet-{cfg.encoder}", tags=tags)
        run_id = run.info.run_id
    if dist.is_main and start_epoch == 0:
        mlflow.log_params(params.flat())
        mlflow.set_tags(
            {
                **{f"exec.{k}": v for k, v in plan.describe().items()},
                "exec.threads": str(threads),
                "exec.world_size": str(dist.world_size),
                "chromoseg.stage": "train",
                "chromoseg.n_classes": str(params.n_classes),
            }
        )

    val_x, val_labels = va["images"].astype(np.float32) / 255.0, va["labels"]
    select_by = params.select_by
    t_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        losses = _train_epoch(
            model, sampler, criterion, opt, sched, plan, params.seed, epoch, dist, stop, ema
        )
        train_time = time.perf_counter() - t0
        if not dist.is_main:  # other ranks: the same steps on their shards, nothing else
            continue
        pred = Predictor(
            ema.target(net), cfg, params.n_classes, plan, "torch", ab_order=params.prepare.ab_order
        ).predict_labels(val_x)
        m = SegmentationMetrics(params.n_classes)
        m.update(val_labels, pred)
        val = m.compute()
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_dice": val["dice"],
            "val_iou_overlap": val["iou_overlap"],
            "val_selection": val[select_by],
            "lr": sched.get_last_lr()[0],
            "train_img_per_s": cfg.samples_per_epoch / train_time,
        }
        history.append(row)
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        if val[select_by] > best["dice"]:
            best = {
                "dice": val[select_by],
                "epoch": epoch,
                "state": {k: v.detach().cpu().clone() for k, v in ema.target(net).state_dict().items()},
            }
        elapsed = time.perf_counter() - t_start
        done = epoch + 1 - start_epoch
        log.info(
            "epoch %d/%d loss %.4f val dice %.4f overlap IoU %.4f (%.1f img/s), elapsed %s, ETA %s",
            epoch + 1, cfg.epochs, row["train_loss"], row["val_dice"], row["val_iou_overlap"],
            row["train_img_per_s"], clock(elapsed), clock(elapsed / done * (cfg.epochs - epoch - 1)),
        )  # fmt: skip
        _atomic_torch_save(
            {
                "epoch": epoch,
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "ema": ema.state(),
                "history": history,
                "best": best,
                "run_id": run_id,
                "fingerprint": fp,
            },
            ckpt_path,
        )
        if stop.signum is not None and not dist.enabled:  # DDP ranks stop together in _train_epoch
            raise TrainingInterruptedError(stop.signum)

    ddp.barrier(dist)
    if not dist.is_main:
        return {"rank": dist.rank}
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    _atomic_torch_save(
        {
            "state_dict": best["state"],
            "train": asdict(params.train),
            "n_classes": params.n_classes,
            "combine_label": params.combine_label,
            "ab_order": params.prepare.ab_order,
            "best_epoch": best["epoch"],
            "val_dice": best["dice"],
        },
        model_path,
    )
    write_history(cfg.history, history)
    summary = {
        "best_epoch": best["epoch"],
        "best_val_dice": best["dice"],
        "selected_by": select_by,
        "final_train_loss": history[-1]["train_loss"],
        "epochs": cfg.epochs,
        "train_seconds": round(time.perf_counter() - t_start, 1),
        "precision": plan.precision,
    }
    mlflow.log_metrics({"best_val_dice": best["dice"], "best_epoch": best["epoch"]})
    # The checkpoint as a plain artifact; `chromoseg register` wraps it as the served model, so the
    # serving code is no input of training.
    mlflow.log_artifact(str(model_path), CHECKPOINT_ARTIFACT_DIR)
    checkpoint_uri = f"runs:/{run_id}/{CHECKPOINT_ARTIFACT_DIR}/{MODEL_FILE}"
    mlflow.end_run()
    write_json(out_dir / RUN_FILE, {"run_id": run_id, "checkpoint_uri": checkpoint_uri})
    write_json(cfg.metrics, summary)
    if stop.signum is not None:
        log.warning("%s arrived while writing outputs; they were completed", stop.signum)
    ckpt_path.unlink(missing_ok=True)
    log.info(
        "best val %s %.4f at epoch %d; model %s",
        select_by, best["dice"], best["epoch"] + 1, checkpoint_uri,
    )  # fmt: skip
    return summary


def clock(seconds: float) -> str:
    """Seconds as `m:ss` (or `h:mm:ss`), for progress lines."""
    s = round(seconds)
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def write_history(path: str | Path, history: list[dict]) -> None:
    keys = list(history[0])
    lines = [",".join(keys)] + [",".join(f"{r[k]:.6g}" for k in keys) for r in history]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
