"""The inference core: checkpoint -> predictor -> segment -> post-process -> rescale.

Every route that runs a trained model goes through here: `evaluate`, `register` (scoring the
champion and the real-image gate), `evaluate-external`, `predict`, `bench` and the served model
(`chromoseg.serving`, which only adds decoding and validation of HTTP input).

`load_model` is the one model handle: a registry URI (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``), a run (``runs:/RUN_ID/...``), an MLflow model folder or a training
checkpoint (``models/model.pt``) all give a `Model`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chromoseg.config import InferConfig, upgrade_checkpoint_config

log = logging.getLogger(__name__)

OUTPUT_KEYS = ("labels", "mask_a", "mask_b", "overlap")
MIN_SIDE = 8
DEFAULT_MAX_SIDE = 2048
NO_MODEL = "no model yet: run `make run` (or give --model PATH)"


class InputError(ValueError):
    """Images the model cannot take (size, scale); the message is short and names the image."""


class ModelLoadError(FileNotFoundError):
    """A model reference that does not lead to a model; the message says what to give instead."""


# ---------------------------------------------------------------------------------------- checkpoint


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint (`models/model.pt`), upgraded (`config.upgrade_checkpoint_config`):
    `train` is a `TrainConfig`, `ab_order` is set."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"file not found: {p}")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(
            f"{p}: not a chromoseg checkpoint ({type(exc).__name__}); give a model.pt"
        ) from exc
    if not isinstance(ck, dict) or "state_dict" not in ck or "train" not in ck:
        raise ModelLoadError(f"{p}: not a chromoseg checkpoint (no state_dict/train); give a model.pt")
    return upgrade_checkpoint_config(ck)


def predictor_from_checkpoint(ck: dict, infer: InferConfig | None = None, batch_size: int = 64):
    """An `infer.Predictor` for an upgraded checkpoint (`load_checkpoint`), run as `infer` says."""
    from chromoseg.infer import Predictor
    from chromoseg.model import exec_plan

    infer = infer or InferConfig()
    cfg = ck["train"]
    plan = exec_plan(infer.precision, cfg.channels_last)
    return Predictor(
        ck["state_dict"], cfg, ck["n_classes"], plan, backend=infer.backend, batch_size=batch_size,
        ab_order=ck["ab_order"], tta_views=infer.tta_views,
    )  # fmt: skip


# -------------------------------------------------------------------------------------- post-process


def check_size(h: int, w: int, max_side: int) -> None:
    if min(h, w) < MIN_SIDE or max(h, w) > max_side:
        raise InputError(f"is {h}x{w} px; each side must be {MIN_SIDE}..{max_side} px")


def postprocess(
    labels: np.ndarray,
    combine_label: bool,
    images: np.ndarray | None = None,
    labels4: np.ndarray | None = None,
) -> dict:
    """(N, H, W) label maps -> dict of label map and instance masks (A, B include the overlap), uint8.

    Combined labels are split into chromosomes A and B by `labels4` when the model gives them (its
    A/B head, `Predictor.predict_segmentation`), else by geometry (`separate.separate_instances`).
    Overlap specks too small to be a crossing are relabelled first (`separate.drop_small_overlaps`),
    then overlap that borders only one of the two chromosomes (`separate.drop_one_sided_overlaps`),
    so the returned label map is the cleaned one.
    """
    from chromoseg.labels import combine_labels, labels_to_instances
    from chromoseg.separate import drop_one_sided_overlaps, drop_small_overlaps, separate_instances

    if combine_label and labels4 is not None:
        # Specks go to the nearer of A and B, then A and B are merged back: the same label map as
        # cleaning the combined labels (the specks and widths are measured on the same masks).
        labels4 = drop_small_overlaps(labels4, combine_label=False)
        labels = combine_labels(labels4)
    else:
        labels = drop_small_overlaps(labels, combine_label)
        labels4 = separate_instances(labels, images) if combine_label else labels
    cleaned4 = drop_one_sided_overlaps(labels4)
    # Combined: only the overlap pixels given to a chromosome change in the label map.
    labels = np.where((labels4 == 3) & (cleaned4 != 3), 1, labels) if combine_label else cleaned4
    labels4 = cleaned4
    a, b, ov = labels_to_instances(labels4)
    return {
        "labels": labels.astype(np.uint8),
        "mask_a": a.astype(np.uint8),
        "mask_b": b.astype(np.uint8),
        "overlap": ov.astype(np.uint8),
    }


def segment(predictor, images: np.ndarray, combine_label: bool) -> dict:
    """(N, H, W) float32 images of one size -> `postprocess` output, through the model's own A/B split
    where it has one."""
    labels, labels4 = predictor.predict_segmentation(images)
    return postprocess(labels, combine_label, images, labels4)


def predict_images(predictor, images: list[np.ndarray], combine_label: bool) -> dict:
    """Run images of any sizes: grouped by size, one batched call per group, results in input order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape, []).append(i)
    if len(groups) == 1:
        return segment(predictor, np.stack(images), combine_label)
    out: dict[str, list] = {k: [None] * len(images) for k in OUTPUT_KEYS}
    for idx in groups.values():
        res = segment(predictor, np.stack([images[i] for i in idx]), combine_label)
        for k in OUTPUT_KEYS:
            for j, i in enumerate(idx):
                out[k][i] = res[k][j]
    return out


def resolve_scales(images: list[np.ndarray], scale: float | str | list[float]) -> list[float]:
    """One resize factor per image: a number, one per image, or ``auto`` (measured on each image).
    Raises InputError naming the image that cannot be measured."""
    from chromoseg.data.scale import ScaleError, image_scales

    if isinstance(scale, list | tuple):
        return [float(s) for s in scale]
    try:
        return image_scales(images, scale)
    except ScaleError as exc:
        raise InputError(f"{exc}; send it with a numeric scale") from None


def predict_scaled(
    predictor,
    images: list[np.ndarray],
    combine_label: bool,
    scale: float | str | list[float] = 1.0,
    max_side: int = DEFAULT_MAX_SIDE,
) -> dict:
    """`predict_images` on float32 [0, 1] images resized by `scale` (a factor, one per image, or
    ``auto``), with every output resized back (nearest) to its input's size."""
    from chromoseg.data.scale import resize, scaled_shape

    scales = resolve_scales(images, scale)
    if all(s == 1.0 for s in scales):
        return predict_images(predictor, images, combine_label)
    resized = []
    for i, (im, s) in enumerate(zip(images, scales, strict=True)):
        shape = scaled_shape(im.shape, s)
        try:
            check_size(*shape, max_side)
        except InputError as exc:
            raise InputError(f"image {i} at scale {s:.3g} {exc}") from None
        resized.append(resize(im, shape))
    res = predict_images(predictor, resized, combine_label)
    out = {k: [resize(np.asarray(res[k][i]), im.shape, nearest=True) for i, im in enumerate(images)]
           for k in OUTPUT_KEYS}  # fmt: skip
    if len({im.shape for im in images}) == 1:
        return {k: np.stack(v) for k, v in out.items()}
    return out


def as_float_images(images: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    """uint8 0..255 (or float 0..1) images -> list of (H, W) float32 in [0, 1]."""
    return [
        np.asarray(im, np.float32) / 255.0 if np.asarray(im).dtype == np.uint8 else np.asarray(im, np.float32)
        for im in images
    ]


# ------------------------------------------------------------------------------------------- handle


@dataclass
class Model:
    """A trained chromoseg model ready to predict: its predictor and what its labels mean."""

    predictor: Any  # infer.Predictor
    combine_label: bool
    ab_order: str
    uri: str

    @property
    def separation(self) -> str:
        return self.predictor.separation

    @property
    def tta_views(self) -> int:
        return self.predictor.tta_views

    def predict(self, images: np.ndarray | list[np.ndarray], scale: float | str | list[float] = 1.0) -> dict:
        """(N, H, W) or a list of (H, W) images (uint8 0..255 or float 0..1) -> `postprocess` output
        at each input's size (an (N, H, W) array per key when all have one size, else lists)."""
        return predict_scaled(self.predictor, as_float_images(images), self.combine_label, scale)


def model_from_checkpoint(
    path: str | Path, infer: InferConfig | None = None, batch_size: int = 64, uri: str | None = None
) -> Model:
    ck = load_checkpoint(path)
    predictor = predictor_from_checkpoint(ck, infer, batch_size)
    return Model(predictor, bool(ck["combine_label"]), ck["ab_order"], uri or str(path))


def load_model(ref: str | Path, infer: InferConfig | None = None, batch_size: int = 64) -> Model:
    """A `Model` from a registry URI, a run URI, an MLflow model folder or a checkpoint file.

    Raises ModelLoadError with one line saying what is missing: no registry yet, no such alias or
    version (listing those that exist), no such file.
    """
    ref = str(ref)
    if ref.startswith(("models:/", "runs:/")):
        with tempfile.TemporaryDirectory(prefix="chromoseg-model-") as tmp:
            local = _download(ref, Path(tmp))
            return model_from_checkpoint(_checkpoint_in(local, ref), infer, batch_size, uri=ref)
    p = Path(ref).expanduser()
    if not p.exists():
        raise ModelLoadError(f"file not found: {p}")
    return model_from_checkpoint(_checkpoint_in(p, ref), infer, batch_size, uri=ref)


def _checkpoint_in(path: Path, ref: str) -> Path:
    """The checkpoint file itself, or the one inside an MLflow model folder (its `artifacts/`)."""
    if path.is_file():
        return path
    found = sorted(path.rglob("*.pt"))
    if len(found) != 1:
        raise ModelLoadError(
            f"{ref}: {'no' if not found else len(found)} checkpoint (*.pt) files in {path}; give a "
            "model.pt, a chromoseg model folder or a models:/ URI"
        )
    return found[0]


def tracking_store_missing(uri: str) -> bool:
    """True for a sqlite tracking URI whose file does not exist (opening it would create it)."""
    prefix = "sqlite:///"
    return uri.startswith(prefix) and not Path(uri[len(prefix) :]).is_file()


def _download(ref: str, dst: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    # Checked before MLflow opens the store: opening a sqlite URI creates an empty database.
    if tracking_store_missing(uri) or tracking_store_missing(mlflow.get_registry_uri() or uri):
        raise ModelLoadError(NO_MODEL)
    if ref.startswith("models:/"):
        client = mlflow.MlflowClient()
        if not client.search_registered_models(max_results=1):
            raise ModelLoadError(NO_MODEL)
        try:
            resolve_model_uri(ref, client)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dst)))
    except (MlflowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot load model {ref!r} from {uri}: {first}; give models:/NAME@ALIAS, "
            "models:/NAME/VERSION, runs:/RUN_ID/PATH or a model.pt file"
        ) from exc


def resolve_model_uri(model_uri: str, client=None):
    """The ModelVersion behind `models:/NAME@ALIAS` or `models:/NAME/VERSION` (None for other URIs).

    Raises a ValueError naming what is missing and the aliases and versions that do exist, instead
    of MLflow's bare RESOURCE_DOES_NOT_EXIST.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    prefix = "models:/"
    if not model_uri.startswith(prefix):
        return None
    ref = model_uri[len(prefix) :]
    name, sep, alias = ref.partition("@")
    version = None
    if not sep:
        name, _, version = ref.partition("/")
    client = client or mlflow.MlflowClient()
    try:
        rm = client.get_registered_model(name)
    except MlflowException as exc:
        names = sorted(m.name for m in client.search_registered_models())
        raise ValueError(
            f"{model_uri}: no registered model {name!r} in {mlflow.get_tracking_uri()} "
            f"(registered: {names}); run `chromoseg register` or check MLFLOW_TRACKING_URI"
        ) from exc
    aliases = sorted(getattr(rm, "aliases", {}) or {})
    try:
        if sep:
            return client.get_model_version_by_alias(name, alias)
        if version and version.isdigit():
            return client.get_model_version(name, version)
    except MlflowException as exc:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        what = f"alias {alias!r}" if sep else f"version {version}"
        raise ValueError(
            f"{model_uri}: model {name!r} has no {what} (aliases: {aliases}, versions: {versions}); "
            f"use one of them, e.g. models:/{name}@{aliases[0] if aliases else 'champion'}"
        ) from exc
    return None  # models:/NAME/STAGE (e.g. latest): left to MLflow
