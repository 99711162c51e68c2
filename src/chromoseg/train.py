"""Stage `train`: fit the U-Net on the prepared train split, select on validation dice, log to MLflow.

Every epoch draws `samples_per_epoch` training images (Ghosh 2017: 1000) with an RNG seeded by
(seed, epoch), and augmentation and torch RNGs are re-seeded the same way, so an interrupted run that
resumes from its last epoch checkpoint ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from chromoseg.config import Params
from chromoseg.fsutil import atomic_path, write_json
from chromoseg.labels import canonical_ab, combine_labels
from chromoseg.losses import SegLoss
from chromoseg.metrics import SegmentationMetrics
from chromoseg.model import build_model, exec_plan, input_multiple, prepare_module, set_threads, to_input
from chromoseg.prepare import load_split
from chromoseg.tracking import project_root
from chromoseg.transforms import train_transform

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
RUN_FILE = "run.json"


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
            x = np.stack(xs)
            y = canonical_ab(np.stack(ys), self.params.prepare.ab_order)
            if self.params.combine_label:
                y = combine_labels(y)
            x, _ = pad_to_multiple(x, self.multiple)
            y, _ = pad_to_multiple(y, self.multiple)
            yield (
                torch.from_numpy(x.astype(np.float32) / 255.0)[:, None],
                torch.from_numpy(y.astype(np.int64)),
            )


def steps_per_epoch(params: Params) -> int:
    return math.ceil(params.train.samples_per_epoch / params.train.batch_size)


def make_scheduler(opt: torch.optim.Optimizer, params: Params):
    total = params.train.epochs * steps_per_epoch(params)
    kind = params.train.scheduler
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=params.train.lr * 0.01)
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=params.train.lr, total_steps=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@torch.inference_mode()
def predict_labels(model, images: np.ndarray, plan, multiple: int, batch_size: int = 64) -> np.ndarray:
    """(N, H, W) uint8 -> (N, H, W) uint8 argmax labels (used for per-epoch validation)."""
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        x, (h, w) = pad_to_multiple(images[s : s + batch_size], multiple)
        xt = to_input(torch.from_numpy(x.astype(np.float32) / 255.0)[:, None], plan)
        with plan.autocast():
            logits = model(xt)
        out.append(logits[..., :h, :w].argmax(1).to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def _fingerprint(params: Params, train_file: Path) -> str:
    """Identity of a training run: everything that changes its result (for safe resumption)."""
    h = hashlib.sha256()
    relevant = {
        "seed": params.seed,
        "combine_label": params.combine_label,
        "train": asdict(params.train),
        "prepare": asdict(params.prepare),
    }
    relevant["train"].pop("num_threads", None)
    h.update(json.dumps(relevant, sort_keys=True, default=str).encode())
    st = train_file.stat()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def resume_path(params: Params, fingerprint: str) -> Path:
    return project_root() / ".chromoseg" / "resume" / f"train-{fingerprint}.pt"


def run_train(params: Params) -> dict:
    import mlflow

    from chromoseg.serving import log_pyfunc_model
    from chromoseg.tracking import launcher_run_id, setup_mlflow

    cfg = params.train
    seed_everything(params.seed)
    threads = set_threads(cfg.num_threads)
    plan = exec_plan(cfg.precision, cfg.channels_last)
    log.info("execution plan: %s, %d threads", plan.describe(), threads)

    prep_dir = Path(params.prepare.out_dir)
    tr = load_split(prep_dir, "train")
    va = load_split(prep_dir, "val")
    sampler = BatchSampler(tr["images"], tr["labels4"], params)
    multiple = sampler.multiple

    model = prepare_module(build_model(cfg, params.n_classes), plan)
    weights = cfg.class_weights_combined if params.combine_label else cfg.class_weights_4
    criterion = SegLoss(cfg.loss, weights).to(plan.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, params)

    fp = _fingerprint(params, prep_dir / "train.npz")
    ckpt_path = resume_path(params, fp)
    start_epoch, history, best = 0, [], {"dice": -1.0, "epoch": -1, "state": None}
    run_id = None
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=plan.device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["torch_rng"])
        start_epoch, history, best, run_id = ck["epoch"] + 1, ck["history"], ck["best"], ck["run_id"]
        log.info("resuming from %s at epoch %d (MLflow run %s)", ckpt_path, start_epoch, run_id)

    setup_mlflow(params.mlflow)
    parent = launcher_run_id()
    tags = {"mlflow.parentRunId": parent} if parent and not run_id else None
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else f"unet-{cfg.encoder}", tags=tags)
    run_id = run.info.run_id
    if start_epoch == 0:
        mlflow.log_params(params.flat())
        mlflow.set_tags(
            {
                **{f"exec.{k}": v for k, v in plan.describe().items()},
                "exec.threads": str(threads),
                "chromoseg.stage": "train",
                "chromoseg.n_classes": str(params.n_classes),
            }
        )

    val_images, val_labels = va["images"], va["labels"]
    t_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(params.seed * 100_003 + epoch)
        model.train()
        t0 = time.perf_counter()
        losses = []
        for x, y in sampler.epoch(epoch):
            x = to_input(x, plan)
            y = y.to(plan.device)
            with plan.autocast():
                logits = model(x)
            loss = criterion(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        train_time = time.perf_counter() - t0
        pred = predict_labels(model, val_images, plan, multiple)
        m = SegmentationMetrics(params.n_classes)
        m.update(val_labels, pred)
        val = m.compute()
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_dice": val["dice"],
            "val_iou_overlap": val["iou_overlap"],
            "lr": sched.get_last_lr()[0],
            "train_img_per_s": cfg.samples_per_epoch / train_time,
        }
        history.append(row)
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        if val["dice"] > best["dice"]:
            best = {
                "dice": val["dice"],
                "epoch": epoch,
                "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            }
        log.info(
            "epoch %d/%d loss %.4f val dice %.4f overlap IoU %.4f (%.1f img/s)",
            epoch + 1, cfg.epochs, row["train_loss"], row["val_dice"], row["val_iou_overlap"],
            row["train_img_per_s"],
        )  # fmt: skip
        _atomic_torch_save(
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
                "best": best,
                "run_id": run_id,
                "fingerprint": fp,
            },
            ckpt_path,
        )

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
        "final_train_loss": history[-1]["train_loss"],
        "epochs": cfg.epochs,
        "train_seconds": round(time.perf_counter() - t_start, 1),
        "precision": plan.precision,
    }
    mlflow.log_metrics({"best_val_dice": best["dice"], "best_epoch": best["epoch"]})
    model_info = log_pyfunc_model(model_path, params, plan)
    mlflow.end_run()
    (out_dir / RUN_FILE).write_text(
        json.dumps({"run_id": run_id, "model_uri": model_info.model_uri}, indent=2) + "\n"
    )
    write_json(cfg.metrics, summary)
    ckpt_path.unlink(missing_ok=True)
    log.info(
        "best val dice %.4f at epoch %d; model %s", best["dice"], best["epoch"] + 1, model_info.model_uri
    )
    return summary


def write_history(path: str | Path, history: list[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    keys = list(history[0])
    lines = [",".join(keys)] + [",".join(f"{r[k]:.6g}" for k in keys) for r in history]
    p.write_text("\n".join(lines) + "\n")
