"""`params.yaml` -> frozen, typed dataclasses.

The file is parsed once per process (`load_params`). Unknown keys and values of the wrong type are
errors that name the offending key and list the valid ones, so a typo never silently falls back to
a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A problem in params.yaml (unknown key, wrong type, bad value)."""


@dataclass(frozen=True)
class SynthConfig:
    """Synthetic dataset in Pommier's format (see `chromoseg.data.synth`).

    Lengths are pixels at the 88 x 88 LowRes scale; grey levels are 0..255.
    """

    n_images: int = 13434
    seed: int = 13434
    size: int = 88
    out: str = "data/raw/LowRes_13434_overlapping_pairs.h5"
    # Label (polygon) width and centreline length ranges of one chromosome, pixels.
    width_range: tuple[float, float] = (10.3, 14.3)
    length_range: tuple[float, float] = (25.0, 65.0)
    # Fraction of pairs that only touch or lie close without overlapping (as in real data).
    touching_fraction: float = 0.2
    # Number of source groups; each group is a pair of source chromosomes (shape, banding) that
    # appears in many images in different poses, so `source_id` is a leakage-free split group.
    n_sources: int = 460
    # Mean grey of a chromosome interior before blur and the Gaussian blur sigma (pixels).
    intensity_range: tuple[float, float] = (60.0, 110.0)
    blur_range: tuple[float, float] = (1.1, 1.7)
    # Camera noise: grey std in the background and relative shot noise in the chromosomes.
    noise_range: tuple[float, float] = (0.0, 1.0)
    # Worker processes for large runs (output is identical for any value).
    workers: int = 2


@dataclass(frozen=True)
class PrepareConfig:
    raw: str = "data/raw/LowRes_13434_overlapping_pairs.h5"
    key: str = "auto"
    out_dir: str = "data/prepared"
    label_policy: Literal["none", "drop", "repair"] = "repair"
    split: Literal["index", "group"] = "index"
    test_fraction: float = 0.2
    val_size: int = 200
    # A and B have no inherent order; "area" makes A the larger chromosome (by pixels, overlap
    # included) and "position" the one whose centroid is higher up (then further left), so that the
    # 4-class task is well-defined. "none" keeps the file's order. The loss is permutation-invariant,
    # so the rule changes only the names; "position" names A and B like the truth more often (pairs
    # often differ by under 2 % in area, rarely in centroid height).
    ab_order: Literal["none", "area", "position"] = "position"
    max_images: int = 0
    metrics: str = "metrics/prepare.json"


@dataclass(frozen=True)
class TrainConfig:
    """The `train` section. The defaults are params.yaml's (tests/test_config.py checks it); what
    older checkpoints implied for keys added since is `LEGACY_TRAIN`."""

    arch: str = "Unet"
    encoder: str = "resnet18"
    encoder_depth: int = 3
    decoder_channels: tuple[int, ...] = (64, 32, 16)
    # Channels of a full-resolution (stride-1) branch fused before the classifier; 0: plain smp model.
    full_res_channels: int = 16
    # Hidden units of the image-level conditioning of the full-resolution head (pooled deepest
    # features scale and shift the head's features, see model.FullResUnet); 0: off.
    global_context: int = 64
    epochs: int = 8
    samples_per_epoch: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Exponential moving average of the weights used for validation and the saved model; 0: off.
    ema: float = 0.998
    scheduler: Literal["none", "cosine"] = "cosine"
    loss: Literal["ce", "dice", "ce+dice"] = "ce+dice"
    # Equal weights: Ghosh 2017's 0.1/1/10 made the network over-predict chromosome and overlap.
    class_weights_combined: tuple[float, ...] = (1.0, 1.0, 1.0)
    class_weights_4: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    # Flips, 90-degree rotations, contrast and noise: the transforms that keep the label exact.
    augment: bool = True
    # Train on a window of this many pixels around each pair instead of the whole image (0: off).
    crop: int = 64
    # Combined labels: the network has a 4-class head (chromosome A and B, scored
    # permutation-invariantly) whose A and B are merged into "chromosome" for its output; telling the
    # two chromosomes apart is an auxiliary task. The output and every metric stay 3-class.
    # 4 classes: the same network and loss (the merged bg / chromosome / overlap term beside the
    # permutation-invariant 4-class term), the output 4-class.
    ab_aux: bool = True
    # "single": each image is scaled so its single-chromosome grey is 0.5 (train and inference, see
    # infer.normalize_intensity), so exposure and stain do not matter; "none": grey / 255 as is.
    normalize: Literal["none", "single"] = "single"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    num_threads: int = 0
    out_dir: str = "models"
    metrics: str = "metrics/train.json"
    history: str = "plots/train_history.csv"


TTA_VIEWS = (1, 2, 4, 8)


@dataclass(frozen=True)
class InferConfig:
    """How a trained model predicts (evaluate, register, predict, the served model); none of it
    changes the trained weights, so changing it reruns evaluation and registration only."""

    # Test-time augmentation: the softmax averaged over this many views of each image. 8: the 8
    # flips and 90-degree rotations; 4: identity, horizontal and vertical flip, 180 degrees;
    # 2: identity and horizontal flip; 1: none. Each view costs one forward pass.
    tta_views: int = 4
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    backend: Literal["auto", "torch", "onnx", "compile"] = "auto"
    num_threads: int = 0

    def _validate(self) -> None:
        if self.tta_views not in TTA_VIEWS:
            raise ConfigError(f"infer.tta_views must be one of {list(TTA_VIEWS)}, got {self.tta_views}")
        if self.num_threads < 0:
            raise ConfigError(f"infer.num_threads must be >= 0 (0: all cores), got {self.num_threads}")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 64
    n_overlays: int = 12
    out: str = "metrics/eval.json"
    plots_dir: str = "plots/eval"


@dataclass(frozen=True)
class RegisterConfig:
    model_name: str = "chromoseg-unet"
    alias: str = "champion"
    # The figure a new version must beat the champion on. "auto": Ghosh's dice with combined labels,
    # the permutation-invariant dice with 4 classes. dice_pi and dice_combined exist with 4 classes only.
    metric: Literal["auto", "dice", "dice_pi", "dice_combined", "iou_overlap", "iou_chromosomes_pi"] = "auto"
    # Real-image gate: a folder of labelme-annotated real images (relative to the project root, or
    # absolute). When set, the candidate is scored there as well as the champion, and it is promoted
    # only if it also scores at least the champion's `metric` minus `real_tolerance` there.
    real_labelme: str = ""
    real_tolerance: float = 0.0
    # The candidate must beat the champion's `metric` on the test split by more than this; 0 promotes
    # on any gain. Retraining the default with another seed moves test dice by about 0.0001 and the
    # 4-class permutation-invariant dice by about 0.001: gains within that are noise.
    min_gain: float = 0.001
    out: str = "metrics/register.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning on an imported real set (`chromoseg import labelme`), see `chromoseg.finetune`.

    With `data` set, the `train` stage starts from `init` (its weights and architecture) instead of
    training from scratch, and trains `steps` optimiser steps on batches of `batch_size` images, a
    `real_fraction` share of them from the real set and the rest from the synthetic train split.
    """

    data: str = ""  # the imported real set (data/real/NAME.h5); "": off, `train` trains from scratch
    # A registered model (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model) or a model.pt file.
    init: str = "models:/chromoseg-unet@champion"
    real_fraction: float = 0.5
    steps: int = 200
    batch_size: int = 12
    lr: float = 3e-4
    ema: float = 0.99  # moving average of the weights (as train.ema); 0: the last weights
    # Augmentation of the real images: flips, 90-degree rotations, contrast and noise always, plus an
    # affine warp with this probability (hand-drawn outlines are loose, so its half-pixel label
    # error does not matter here as it does for the synthetic labels, see train.affine_p).
    augment: bool = True
    affine_p: float = 0.5
    eval_every: int = 100  # steps between validations on the synthetic val split (logged to MLflow)
    # register: a fine-tuned version is promoted only through the real-image gate (beating the
    # champion there by more than register.min_gain) and if its synthetic test score is at most this
    # much below the champion's (a larger drop means it forgot what the synthetic set taught).
    max_synthetic_drop: float = 0.01


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlruns.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "chromoseg"


@dataclass(frozen=True)
class Params:
    seed: int = 2017
    combine_label: bool = True
    synth: SynthConfig = field(default_factory=SynthConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    @property
    def n_classes(self) -> int:
        return 3 if self.combine_label else 4

    @property
    def ab_aux(self) -> bool:
        """Combined labels trained through a 4-class network with A/B as an auxiliary task."""
        return self.combine_label and self.train.ab_aux

    @property
    def select_by(self) -> str:
        """Key of `SegmentationMetrics.compute()` on validation that picks the saved epoch: Ghosh's
        dice with combined labels; with 4 classes the dice with A and B merged, because the
        permutation-invariant dice of 200 validation images jumps with every image whose A/B choice
        flips."""
        return "dice" if self.combine_label else "dice_combined"

    @property
    def register_metric(self) -> str:
        """Key of the metrics (eval.json, evaluate-external) that decides promotion in the registry."""
        if self.register.metric == "auto":
            return "dice" if self.combine_label else "dice_pi"
        return self.register.metric

    def flat(self) -> dict[str, Any]:
        """All parameters as one flat `section.key -> value` map (for MLflow)."""
        return flatten(dataclasses.asdict(self))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Validate `value` against annotation `tp`, converting lists to tuples. Raise ConfigError."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            # YAML 1.1 reads a bare on/off as true/false.
            value = "on" if value else "off"
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _check_type(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'params'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        place = f"section '{where}'" if where else "the top level"
        raise ConfigError(f"unknown key(s) {unknown} in {place} of {PARAMS_FILE}; valid keys: {valid}")
    kwargs = {}
    for name, value in data.items():
        sub = f"{where}.{name}" if where else name
        kwargs[name] = _check_type(value, hints[name], sub)
    obj = cls(**kwargs)
    validate = getattr(obj, "_validate", None)
    if validate:
        validate()
    return obj


def params_from_dict(data: dict[str, Any]) -> Params:
    params = _build(Params, data, "")
    _validate(params)
    return params


def _validate(p: Params) -> None:
    if p.train.epochs < 1 or p.train.batch_size < 1 or p.train.samples_per_epoch < 1:
        raise ConfigError("train.epochs, train.batch_size and train.samples_per_epoch must be >= 1")
    if not 0.0 < p.prepare.test_fraction < 1.0:
        raise ConfigError(f"prepare.test_fraction must be in (0, 1), got {p.prepare.test_fraction}")
    if len(p.train.class_weights_combined) != 3:
        raise ConfigError("train.class_weights_combined needs 3 values (background, chromosome, overlap)")
    if len(p.train.class_weights_4) != 4:
        raise ConfigError("train.class_weights_4 needs 4 values (background, A, B, overlap)")
    if p.train.crop and (p.train.crop < 16 or p.train.crop % input_multiple_of(p.train)):
        raise ConfigError(
            f"train.crop must be 0 (off) or a multiple of {input_multiple_of(p.train)} (2 ** encoder_depth) "
            f"of at least 16, got {p.train.crop}"
        )
    if p.synth.n_images < 1:
        raise ConfigError(f"synth.n_images must be >= 1, got {p.synth.n_images}")
    if p.combine_label and p.register.metric in ("dice_pi", "dice_combined"):
        raise ConfigError(
            f"register.metric {p.register.metric!r} exists with 4 classes only (combine_label: false); "
            "with combined labels use auto, dice, iou_overlap or iou_chromosomes_pi"
        )
    if not 0.0 <= p.register.real_tolerance < 1.0:
        raise ConfigError(f"register.real_tolerance must be in [0, 1), got {p.register.real_tolerance}")
    if not 0.0 <= p.register.min_gain < 1.0:
        raise ConfigError(f"register.min_gain must be in [0, 1), got {p.register.min_gain}")
    ft = p.finetune
    if not 0.0 < ft.real_fraction <= 1.0:
        raise ConfigError(
            f"finetune.real_fraction is the real share of a batch, in (0, 1]; got {ft.real_fraction}"
        )
    if ft.steps < 1 or ft.batch_size < 1 or ft.eval_every < 1:
        raise ConfigError("finetune.steps, finetune.batch_size and finetune.eval_every must be >= 1")
    if not ft.lr > 0 or not 0.0 <= ft.ema < 1.0 or not 0.0 <= ft.affine_p <= 1.0:
        raise ConfigError("finetune.lr must be > 0, finetune.ema in [0, 1) and finetune.affine_p in [0, 1]")
    if ft.data and not ft.init:
        raise ConfigError(
            "finetune.data is set but finetune.init is empty; give the model to start from, e.g. "
            "models:/chromoseg-unet@champion or a models/model.pt file"
        )


def input_multiple_of(cfg: TrainConfig) -> int:
    """Network input sides must be divisible by this (2 ** encoder depth)."""
    return 2**cfg.encoder_depth


def load_params(path: str | os.PathLike[str] = PARAMS_FILE) -> Params:
    """Read and validate params.yaml. Raise ConfigError with a fix-it message on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such parameter file; run from the project root or pass --params")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    try:
        return params_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc


# Checkpoints store the `train` section they were trained with. Keys added since were absent from
# older ones; this is what the code that wrote them did without the key (its defaults then).
LEGACY_TRAIN: dict[str, Any] = {
    "encoder_depth": 5,
    "decoder_channels": (256, 128, 64, 32, 16),
    "full_res_channels": 0,
    "global_context": 0,
    "epochs": 40,
    "batch_size": 10,
    "lr": 1e-4,
    "ema": 0.0,
    "loss": "ce",
    "class_weights_combined": (0.1, 1.0, 10.0),
    "class_weights_4": (0.1, 1.0, 1.0, 10.0),
    "ab_aux": False,
    "crop": 0,
    "normalize": "none",
}
# The rule that named chromosome A before checkpoints recorded `ab_order`: the larger one.
LEGACY_AB_ORDER = "area"


def upgrade_checkpoint_config(ck: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint (`models/model.pt`) as this version reads it, the one place old ones are mended.

    Returns a shallow copy whose `train` is a `TrainConfig` (keys since removed dropped, keys it
    lacks taken from `LEGACY_TRAIN`, else the defaults) and whose `ab_order` is set. Raises
    ConfigError for a setting this version no longer runs (e.g. `normalize: foreground`).
    """
    stored = dict(ck.get("train") or {})
    known = {f.name for f in fields(TrainConfig)}
    train = {**LEGACY_TRAIN, **{k: v for k, v in stored.items() if k in known}}
    out = dict(ck)
    out["train"] = _build(TrainConfig, train, "checkpoint train")
    out["ab_order"] = ck.get("ab_order", LEGACY_AB_ORDER)
    return out


def class_names(combine_label: bool) -> tuple[str, ...]:
    """Class names in label order; stable, other tools read them from metrics/eval.json."""
    if combine_label:
        return ("background", "chromosome", "overlap")
    return ("background", "chromosome_a", "chromosome_b", "overlap")
