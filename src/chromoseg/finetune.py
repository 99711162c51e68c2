"""Fine-tuning a trained model on a lab's own annotated real images, mixed with synthetic ones.

With `finetune.data` set (a set written by `chromoseg import labelme`), the `train` stage runs
`run_finetune` instead of training from scratch: it loads `finetune.init` (a registered model or a
`model.pt` checkpoint, weights and architecture), trains `finetune.steps` optimiser steps on batches
of which a `finetune.real_fraction` share comes from the real set and the rest from the synthetic
train split (so that what the synthetic set taught is not forgotten), validates on the synthetic val
split and writes the same outputs as a training run: `models/model.pt` (the init's architecture),
`models/run.json`, `metrics/train.json` and the history CSV, and an MLflow run with every
parameter, the init model and the real set's hash. `register` then promotes the version only
through the real-image gate, on images the model was not trained on (`chromoseg.finetune_gate`).

The saved weights are those after the last step (their moving average, `finetune.ema`), not the
step with the best synthetic validation dice: the synthetic split measures forgetting, not what the
fine-tuning is for, and picking on it would favour the least adapted weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from chromoseg.config import ConfigError, Params
from chromoseg.data.io import DataError, read_dataset
from chromoseg.fsutil import write_json

log = logging.getLogger(__name__)

MODEL_URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/", "file:/")
MIN_CONTRAST = 4.0  # grey levels the chromosomes must be above the background (as the importer)


@dataclasses.dataclass(frozen=True)
class RealSet:
    """An imported real set: (N, H, W) uint8 images and 4-class labels, its identity and sources."""

    path: Path
    images: np.ndarray
    labels4: np.ndarray
    sha256: str
    names: list[str]
    file_sha256: frozenset[str]  # the labelme files it was imported from (provenance)
    image_sha256: frozenset[str]  # their decoded images (provenance)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _project_path(p: str) -> Path:
    """A params path: absolute, or relative to the project root (also under `dvc exp run --temp`)."""
    from chromoseg.tracking import project_root

    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return project_root() / path


def load_real_set(path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> RealSet:
    """Read and check an imported real set (Pommier's format, labels 0..3 with A and B in each image).

    `size`: the (H, W) every image must have (the synthetic training images'), or None.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"finetune.data: {p}: file not found; import the annotations first with "
            "`chromoseg import labelme DIR` (it writes data/real/NAME.h5), or `dvc pull` it"
        )
    ds = read_dataset(p)
    images, labels4 = ds.images, ds.labels
    if size is not None and images.shape[1:] != tuple(size):
        raise DataError(
            f"{p}: images are {images.shape[1]} x {images.shape[2]} px, the training images "
            f"{size[0]} x {size[1]}; import the annotations with `chromoseg import labelme DIR`, "
            "which brings them to the training size and scale"
        )
    if labels4.max() > 3:
        raise DataError(f"{p}: labels go up to {labels4.max()}, expected 0..3 (background, A, B, overlap)")
    for i, (img, lab) in enumerate(zip(images, labels4, strict=True)):
        a, b = (lab == 1) | (lab == 3), (lab == 2) | (lab == 3)
        if not a.any() or not b.any():
            raise DataError(f"{p}: image {i} lacks chromosome {'A' if not a.any() else 'B'} in its labels")
        fg, bg = float(img[lab > 0].mean()), float(np.median(img[lab == 0])) if (lab == 0).any() else 0.0
        if not fg > bg + MIN_CONTRAST:
            raise DataError(
                f"{p}: image {i}: the chromosomes are not brighter than the background (mean grey "
                f"{fg:.0f} against {bg:.0f}); chromoseg expects bright chromosomes on a dark background, "
                "invert the images (255 - grey) and import them again"
            )
    names = [f"image {i}" for i in range(len(images))]
    files: set[str] = set()
    pixels: set[str] = set()
    prov = p.with_name(p.stem + ".provenance.json")  # as `data.labelme.provenance_path` names it
    if prov.is_file():
        doc = json.loads(prov.read_text())
        names = [r["file"] for r in doc.get("images", [])] or names
        files = {r["sha256"] for r in doc.get("images", [])}
        pixels = {r["image_sha256"] for r in doc.get("images", [])}
    return RealSet(p, images, labels4, _sha256(p), names, frozenset(files), frozenset(pixels))


def with_finetune_data(params_text: str, value: str) -> tuple[str, str]:
    """params.yaml text with `finetune.data` set to `value`, only that line changed (comments and
    layout kept, unlike a YAML round trip), and the previous value. ConfigError if there is none."""
    import re

    import yaml

    from chromoseg.config import params_from_dict

    lines = params_text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if re.match(r"finetune:\s*(#.*)?$", ln)), None)
    hit = None
    for i in range(start + 1 if start is not None else len(lines), len(lines)):
        if re.match(r"\S", lines[i]):  # the next top-level key: the section has ended
            break
        m = re.match(r"(\s+data:\s*)(\S.*?|)(\s+#.*)?(\r?\n)?$", lines[i])
        if m:
            hit = i, m
            break
    if hit is None:
        raise ConfigError(
            "params.yaml has no finetune.data key to set; add the finetune section (see docs/finetune.md) "
            "or import with --no-set-params"
        )
    i, m = hit
    scalar = value if re.fullmatch(r"[A-Za-z0-9_./-]+", value) else json.dumps(value)
    comment = m.group(3) or ""
    pad = (
        " " * max(1, len(m.group(2)) + len(comment) - len(comment.lstrip()) - len(scalar)) if comment else ""
    )
    lines[i] = f"{m.group(1)}{scalar}{pad}{comment.lstrip()}{m.group(4) or ''}"
    text = "".join(lines)
    new = yaml.safe_load(text)
    params_from_dict(new)  # the edited file must still be valid
    old = (yaml.safe_load(params_text).get("finetune") or {}).get("data", "")
    if new["finetune"]["data"] != value:
        raise ConfigError(f"params.yaml: could not set finetune.data to {value!r}; set it by hand")
    return text, old


def load_init(init: str, params: Params) -> tuple[dict, dict[str, str]]:
    """The checkpoint to start from (`train` a TrainConfig, as `config.upgrade_checkpoint_config`
    gives it) and what it is, for the MLflow run.

    `init`: a `model.pt` file, or a registered / logged model URI (models:/NAME@ALIAS,
    models:/NAME/VERSION, runs:/ID/...) whose checkpoint is downloaded.
    """
    if init.startswith(MODEL_URI_PREFIXES):
        return _load_registered(init, params)
    p = _project_path(init)
    if not p.is_file():
        raise DataError(
            f"finetune.init: {init}: file not found; give a models/model.pt checkpoint or a "
            "registered model such as models:/chromoseg-unet@champion"
        )
    return _checkpoint(p, init, params), {"init": init, "init_sha256": _sha256(p)}


def _checkpoint(path: Path, init: str, params: Params) -> dict:
    from chromoseg.config import upgrade_checkpoint_config

    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise DataError(f"finetune.init: {init} is not a readable checkpoint ({type(exc).__name__})") from exc
    if not isinstance(ck, dict) or not {"state_dict", "train", "n_classes", "combine_label"} <= set(ck):
        raise DataError(f"finetune.init: {init} is not a chromoseg checkpoint; give a model.pt")
    ck = upgrade_checkpoint_config(ck)
    if bool(ck["combine_label"]) != params.combine_label:
        raise ConfigError(
            f"finetune.init: {init} was trained with combine_label={bool(ck['combine_label'])} but "
            f"params.yaml says {params.combine_label}; set combine_label to match"
        )
    return ck


def _load_registered(uri: str, params: Params) -> tuple[dict, dict[str, str]]:
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from chromoseg.tracking import setup_mlflow, tracking_uri

    store = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(params.mlflow)
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        # Checked before MLflow opens the store, which would create an empty one.
        raise DataError(
            f"finetune.init: {uri}: no model yet; run `make run` first to train and register one, or "
            "set finetune.init to a model.pt checkpoint"
        )
    setup_mlflow(params.mlflow)
    info = {"init": uri}
    try:
        if uri.startswith("models:/"):
            ref = uri.removeprefix("models:/")
            name, sep, alias = ref.partition("@")
            client = mlflow.MlflowClient()
            if sep:
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, _, number = ref.partition("/")
                version = client.get_model_version(name, number)
            info.update({"init_model_version": str(version.version), "init_run_id": str(version.run_id)})
        with tempfile.TemporaryDirectory(prefix="chromoseg-init-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
            found = [local] if local.is_file() else sorted(local.rglob("*.pt"))
            if len(found) != 1:
                raise DataError(
                    f"finetune.init: {uri} holds {len(found)} checkpoint (*.pt) files, expected 1"
                )
            info["init_sha256"] = _sha256(found[0])
            return _checkpoint(found[0], uri, params), info
    except MlflowException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(
            f"finetune.init: cannot load {uri} ({first}); give models:/NAME@ALIAS, models:/NAME/VERSION "
            "or a model.pt file"
        ) from exc


def real_transform(seed: int, enabled: bool, affine_p: float):
    """`transforms.train_transform` (flips, 90-degree rotations, contrast, noise) plus, with
    probability `affine_p`, a mild affine warp: its half-pixel label error is within how loosely a
    hand-drawn polygon follows the edge, and it varies pose and scale beyond a handful of images."""
    import albumentations as A
    import cv2

    from chromoseg.transforms import train_transform

    base = train_transform(seed, enabled=enabled)
    if not enabled or affine_p <= 0:
        return base
    affine = A.Affine(
        scale=(0.9, 1.1), rotate=(-30, 30), translate_percent=(-0.05, 0.05),
        interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
        border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=affine_p,
    )  # fmt: skip
    return A.Compose([*base.transforms, affine], seed=seed)


class MixSampler:
    """Seeded batches mixing the real set with the synthetic train split, augmented and padded.

    Each step draws `round(real_fraction * batch_size)` real images (at least one) and the rest
    synthetic, with an RNG seeded by (seed, step), so a run is reproducible image for image.
    """

    def __init__(self, real: RealSet, synth_images, synth_labels4, params: Params, cfg0) -> None:
        from chromoseg.model import input_multiple

        ft = params.finetune
        self.real, self.params, self.cfg0 = real, params, cfg0
        self.synth_images, self.synth_labels4 = synth_images, synth_labels4
        self.n_real = min(ft.batch_size, max(1, round(ft.real_fraction * ft.batch_size)))
        self.n_synth = ft.batch_size - self.n_real
        self.multiple = input_multiple(cfg0)
        self.real_tf = real_transform(params.seed, ft.augment, ft.affine_p)
        self.synth_tf = real_transform(params.seed + 1, ft.augment, 0.0)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float32 (B, 1, H, W), y int64 (B, H, W)) for optimiser step `step`."""
        from chromoseg.train import to_batch

        seed = self.params.seed * 100_003 + step
        rng = np.random.default_rng(seed)
        self.real_tf.set_random_seed(seed)
        self.synth_tf.set_random_seed(seed + 1)
        xs, ys = [], []
        picks = [(self.real_tf, self.real.images, self.real.labels4, self.n_real)]
        if self.n_synth:
            picks.append((self.synth_tf, self.synth_images, self.synth_labels4, self.n_synth))
        for tf, images, labels, n in picks:
            for i in rng.choice(len(images), size=n, replace=n > len(images)):
                out = tf(image=images[i], mask=labels[i])
                xs.append(out["image"])
                ys.append(out["mask"])
        # The init model's own training config: its window, A/B naming and grey normalisation.
        p = self.params
        return to_batch(xs, ys, self.cfg0, p.combine_label, p.prepare.ab_order, self.multiple, rng)


def _lr_lambda(steps: int):
    """Linear warm-up over the first 5 % of steps (fresh Adam moments on trained weights), then
    cosine down to 1 % of the rate."""
    warm = max(1, steps // 20)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def run_finetune(params: Params) -> dict:
    """The `train` stage when `finetune.data` is set; see the module doc."""
    from chromoseg import distributed as ddp

    if ddp.from_env().enabled:
        raise ConfigError("fine-tuning runs in one process; start `chromoseg train` without torchrun")
    try:
        return _finetune(params)
    except BaseException:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run(status="FAILED")
        raise


def finetune_module(
    params: Params, ck: dict, real: RealSet, synth_images: np.ndarray, synth_labels4: np.ndarray, plan,
    on_eval=None,
) -> tuple[torch.nn.Module, list[dict]]:  # fmt: skip
    """The core: `finetune.steps` steps from checkpoint `ck` on the real/synthetic mix, in memory.

    `on_eval(module, step, losses)` is called every `finetune.eval_every` steps and after the last
    with the moving-average module in eval mode and the losses since the previous call; what it
    returns (a dict or None) is collected in the returned history. Returns the moving-average module.
    """
    from chromoseg.infer import clean_state_dict
    from chromoseg.model import build_model, load_weights, prepare_module, to_input
    from chromoseg.train import WeightAverage, make_criterion, seed_everything

    ft = params.finetune
    seed_everything(params.seed)
    cfg0 = ck["train"]
    # The training labels name A and B by the model's own rule, whatever params.yaml says now.
    params = dataclasses.replace(params, prepare=dataclasses.replace(params.prepare, ab_order=ck["ab_order"]))
    net = build_model(cfg0, int(ck["n_classes"]))
    load_weights(net, clean_state_dict(ck["state_dict"]))
    net = prepare_module(net, plan)
    criterion = make_criterion(dataclasses.replace(params, train=cfg0)).to(plan.device)
    opt = torch.optim.Adam(net.parameters(), lr=ft.lr, weight_decay=cfg0.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(ft.steps))
    ema = WeightAverage(net, ft.ema)
    sampler = MixSampler(real, synth_images, synth_labels4, params, cfg0)
    history, losses = [], []
    net.train()
    for step in range(ft.steps):
        x, y = sampler.batch(step)
        with plan.autocast():
            logits = net(to_input(x, plan))
        loss = criterion(logits, y.to(plan.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update(net)
        losses.append(loss.item())
        if on_eval is not None and ((step + 1) % ft.eval_every == 0 or step + 1 == ft.steps):
            target = ema.target(net).eval()
            row = on_eval(target, step + 1, losses, sched.get_last_lr()[0])
            if row is not None:
                history.append(row)
            net.train()
            losses = []
    return ema.target(net).eval(), history


def _finetune(params: Params) -> dict:
    import mlflow

    from chromoseg.infer import Predictor
    from chromoseg.metrics import SegmentationMetrics
    from chromoseg.model import exec_plan, set_threads
    from chromoseg.prepare import load_split
    from chromoseg.tracking import setup_mlflow
    from chromoseg.train import (
        CHECKPOINT_ARTIFACT_DIR,
        MODEL_FILE,
        RUN_FILE,
        _atomic_torch_save,
        write_history,
    )

    ft = params.finetune
    t_start = time.perf_counter()
    prep_dir = Path(params.prepare.out_dir)
    tr = load_split(prep_dir, "train")
    va = load_split(prep_dir, "val")
    real = load_real_set(_project_path(ft.data), tr["images"].shape[1:])
    ck, init_info = load_init(ft.init, params)
    cfg0 = ck["train"]
    n_classes = int(ck["n_classes"])
    ab_order = ck["ab_order"]
    threads = set_threads(params.train.num_threads)
    plan = exec_plan(params.train.precision, params.train.channels_last)
    log.info(
        "fine-tuning %s on %d real images of %s (%.0f%% of each batch) for %d steps; %s, %d threads",
        ft.init, len(real.images), real.path, 100 * ft.real_fraction, ft.steps, plan.precision, threads,
    )  # fmt: skip

    setup_mlflow(params.mlflow)
    run = mlflow.start_run(run_name=f"finetune-{real.path.stem}")
    run_id = run.info.run_id
    mlflow.log_params(params.flat())
    mlflow.log_params(
        {
            "finetune.data_sha256": real.sha256,
            "finetune.n_real": len(real.images),
            **{f"finetune.{k}": v for k, v in init_info.items() if k != "init"},
        }
    )
    mlflow.set_tags(
        {
            **{f"exec.{k}": v for k, v in plan.describe().items()},
            "exec.threads": str(threads),
            "chromoseg.stage": "train",
            "chromoseg.finetune": "true",
            "chromoseg.finetune.init": ft.init,
            "chromoseg.finetune.data": ft.data,
            "chromoseg.n_classes": str(n_classes),
        }
    )
    mlflow.log_dict(
        {"train": dataclasses.asdict(cfg0), **init_info, "real_images": real.names}, "finetune/init.json"
    )

    val_x, val_labels = va["images"].astype(np.float32) / 255.0, va["labels"]
    clock = {"t": time.perf_counter(), "row": 0}

    def on_eval(module, step: int, losses: list[float], lr: float) -> dict:
        seconds = time.perf_counter() - clock["t"]
        pred = Predictor(module, cfg0, n_classes, plan, "torch", ab_order=ab_order).predict_labels(val_x)
        m = SegmentationMetrics(n_classes)
        m.update(val_labels, pred)
        val = m.compute()
        row = {
            "epoch": clock["row"],  # one row per validation, `eval_every` steps apart
            "train_loss": float(np.mean(losses)),
            "val_dice": val["dice"],
            "val_iou_overlap": val["iou_overlap"],
            "val_selection": val[params.select_by],
            "lr": lr,
            "train_img_per_s": len(losses) * ft.batch_size / seconds,
        }
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=step)
        log.info(
            "step %d/%d loss %.4f synthetic val dice %.4f overlap IoU %.4f (%.1f img/s)",
            step, ft.steps, row["train_loss"], row["val_dice"], row["val_iou_overlap"], row["train_img_per_s"],
        )  # fmt: skip
        clock["t"], clock["row"] = time.perf_counter(), clock["row"] + 1
        return row

    module, history = finetune_module(params, ck, real, tr["images"], tr["labels4"], plan, on_eval)

    cfg = params.train
    out_dir = Path(cfg.out_dir)
    model_path = out_dir / MODEL_FILE
    final = history[-1]
    _atomic_torch_save(
        {
            "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
            "train": dataclasses.asdict(cfg0),  # the init's architecture
            "n_classes": n_classes,
            "combine_label": params.combine_label,
            "ab_order": ab_order,
            "best_epoch": final["epoch"],
            "val_dice": final["val_selection"],
            "finetune": {
                **dataclasses.asdict(ft),
                **init_info,
                "data_sha256": real.sha256,
                "real_images": real.names,
            },
        },
        model_path,
    )
    write_history(cfg.history, history)
    train_seconds = round(time.perf_counter() - t_start, 1)
    summary = {
        "best_epoch": final["epoch"],
        "best_val_dice": final["val_selection"],
        "selected_by": "last step (fine-tuning)",
        "final_train_loss": final["train_loss"],
        "epochs": len(history),
        "train_seconds": train_seconds,
        "precision": plan.precision,
        "finetune": {
            "data": ft.data,
            "data_sha256": real.sha256,
            "n_real": len(real.images),
            "steps": ft.steps,
            **init_info,
            "val_iou_overlap": final["val_iou_overlap"],
        },
    }
    mlflow.log_metrics({"best_val_dice": final["val_selection"], "train_seconds": train_seconds})
    # The checkpoint as a plain artifact, as `train` logs it; `register` wraps it as the served model.
    mlflow.log_artifact(str(model_path), CHECKPOINT_ARTIFACT_DIR)
    checkpoint_uri = f"runs:/{run_id}/{CHECKPOINT_ARTIFACT_DIR}/{MODEL_FILE}"
    mlflow.end_run()
    write_json(out_dir / RUN_FILE, {"run_id": run_id, "checkpoint_uri": checkpoint_uri})
    write_json(cfg.metrics, summary)
    log.info(
        "fine-tuned in %.0f s: synthetic val dice %.4f, overlap IoU %.4f; model %s",
        train_seconds, final["val_dice"], final["val_iou_overlap"], checkpoint_uri,
    )  # fmt: skip
    return summary
