"""The network runner under `chromoseg.pipeline` (and training's validation, bench): numpy images in,
logits or labels out.

`Predictor` pads any (H, W) with background (0 = black) to a bucketed size, runs fixed-size
batches under `torch.inference_mode` with the `ExecPlan`'s autocast and memory format, and crops
back. Backends:

- ``torch``: eager PyTorch with the plan (bf16 autocast + channels_last on AMX CPUs).
- ``onnx``: ONNX Runtime (fp32, dynamic batch/H/W), exported once at construction.
- ``compile``: ``torch.compile`` (inductor); the first call per new size compiles (~10-30 s here).
- ``auto``: ``torch`` where the plan uses bf16 or a GPU, ``onnx`` for fp32 on CPU (see BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import io
import logging
import math
import threading
from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np
import torch

from chromoseg.config import TrainConfig
from chromoseg.labels import SWAP_AB, canonical_ab, combine_labels
from chromoseg.losses import merge_ab_logits
from chromoseg.model import (
    ExecPlan,
    MergeAB,
    build_model,
    exec_plan,
    input_multiple,
    load_weights,
    prepare_module,
    to_input,
)

log = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "onnx", "compile"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "onnx", "compile")


# Test-time augmentation views as (quarter turns, then horizontal flip), by view count. A horizontal
# flip after two quarter turns is a vertical flip, so 4 views are identity, hflip, rot180, vflip.
TTA_VIEWS: dict[int, tuple[tuple[int, bool], ...]] = {
    1: ((0, False),),
    2: ((0, False), (0, True)),
    4: ((0, False), (0, True), (2, False), (2, True)),
    8: tuple((k, flip) for k in range(4) for flip in (False, True)),
}


def choose_backend(plan: ExecPlan) -> str:
    """The backend `auto` resolves to for `plan`.

    Measured on 2 cores (BENCHMARKS.md): with bf16 on AMX, eager torch beats ONNX Runtime fp32 by
    several times; in fp32, ONNX Runtime beats eager torch at batch 1 and matches it at batch 64.
    torch.compile is never the default: it costs tens of seconds per new input size.
    """
    if plan.device != "cpu" or plan.amp_dtype is not None:
        return "torch"
    if _onnx_available():
        return "onnx"
    return "torch"


def _onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (`_orig_mod.` from torch.compile, `module.` from DDP)."""
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def padded_size(h: int, w: int, multiple: int) -> tuple[int, int]:
    """(H, W) rounded up to `multiple`."""
    return math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple


def pad_center(images: np.ndarray, hp: int, wp: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Zero-pad (N, H, W) to (N, hp, wp), centred as albumentations' PadIfNeeded; return the offsets."""
    _, h, w = images.shape
    top, left = (hp - h) // 2, (wp - w) // 2
    if (hp, wp) == (h, w):
        return images, (0, 0)
    out = np.zeros((images.shape[0], hp, wp), dtype=np.float32)
    out[:, top : top + h, left : left + w] = images
    return out, (top, left)


class Predictor:
    """Batched, padded, thread-safe inference for one trained network.

    Built from a state_dict (or a module), the `TrainConfig` it was trained with and the number of
    classes. Calls from several threads are serialised per batch: the network already uses all
    intra-op threads, so running two forwards at once would only oversubscribe the cores.

    A combined model with the A/B head (`model.MergeAB`, `train.ab_aux`) runs its 4-class network on
    every backend; the logits are merged to 3 classes here, and `predict_segmentation` also returns
    the head's A/B split of the chromosome pixels (`ab_head` is then True).
    """

    def __init__(
        self,
        model: torch.nn.Module | Mapping[str, torch.Tensor],
        cfg: TrainConfig,
        n_classes: int,
        plan: ExecPlan | None = None,
        backend: Backend = "auto",
        batch_size: int = 64,
        bucket: int = 32,
        ab_order: str = "none",
        tta_views: int = 1,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {list(BACKENDS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg
        self.n_classes = n_classes
        self.plan = plan if plan is not None else exec_plan(cfg.precision, cfg.channels_last)
        self.batch_size = batch_size
        if tta_views not in TTA_VIEWS:
            raise ValueError(f"tta_views must be one of {sorted(TTA_VIEWS)}, got {tta_views}")
        # Test-time augmentation (`infer.tta_views`): the softmax averaged over flips and 90-degree
        # rotations, which map the pixel grid onto itself exactly.
        self.tta_views = tta_views
        if isinstance(model, torch.nn.Module):
            net = model
        else:
            net = build_model(cfg, n_classes)
            load_weights(net, clean_state_dict(model))
        net.eval()
        self.ab_head = isinstance(net, MergeAB)
        if self.ab_head:
            net = net.net  # the 4-class network; merged in `_predict`, so every backend sees A and B
        # 4 classes (or the A/B head): predicted A/B are named by the rule the training labels
        # followed (`prepare.ab_order`), so that a network trained with the permutation-invariant
        # loss answers in that order too.
        self.ab_order = ab_order if n_classes == 4 or self.ab_head else "none"
        # Sizes are bucketed to a multiple of 32 (and of 2**depth) so that backends that specialise
        # on shape (compile, oneDNN primitive caches) see few distinct sizes.
        self.multiple = math.lcm(input_multiple(cfg), max(1, bucket))
        self.backend = choose_backend(self.plan) if backend == "auto" else backend
        if self.backend == "onnx" and self.plan.device != "cpu":
            raise ValueError("backend 'onnx' runs on CPU only; use backend 'torch' on a GPU")
        self._lock = threading.Lock()
        self._module = prepare_module(net, self.plan)
        self._ort = None
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        if self.backend == "onnx":
            self._ort = _ort_session(net, n_threads=torch.get_num_threads())
        elif self.backend == "compile":
            # dynamic=None: the first new size recompiles specialised, later ones share a dynamic graph,
            # so a server never exceeds dynamo's recompile limit (which would silently fall back to eager).
            self._compiled = torch.compile(self._module, dynamic=None)
        log.debug(
            "Predictor: backend=%s plan=%s multiple=%d", self.backend, self.plan.describe(), self.multiple
        )

    def describe(self) -> dict[str, str]:
        return {
            **self.plan.describe(),
            "backend": self.backend,
            "batch_size": str(self.batch_size),
            "tta_views": str(self.tta_views),
        }

    @property
    def separation(self) -> str:
        """How a combined model's chromosomes are told apart: its A/B head, or geometry afterwards."""
        return "ab_head" if self.ab_head else "geometry"

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) float32 in [0, 1] -> (N, C, H, W) float32 logits (C = `n_classes`)."""
        return self._predict(images, "logits")[0]

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) float32 in [0, 1] -> (N, H, W) uint8 class labels (argmax of the logits; with 4
        classes `decide_ab`, A and B ordered by `ab_order`)."""
        return self.predict_segmentation(images)[0]

    def predict_segmentation(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, H, W) float32 in [0, 1] -> (labels, labels4), both (N, H, W) uint8.

        `labels` are in the model's label space (as `predict_labels`); `labels4` are 4-class labels
        (A, B ordered by `ab_order`): the labels themselves for a 4-class model, the merged labels
        split by the A/B head for a combined model with one, None for a plain combined model (its
        chromosomes are separated by geometry, `chromoseg.separate`).
        """
        labels, ab = self._predict(images, "labels")
        if self.n_classes == 4:
            labels = canonical_ab(labels, self.ab_order)
            return labels, labels
        if ab is None:
            return labels, None
        return labels, canonical_ab(split_ab(labels, ab), self.ab_order)

    def _predict(
        self, images: np.ndarray, what: Literal["logits", "labels"]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (N, C, H, W) float32, or labels (N, H, W) uint8 plus the A/B head's choice (1 A,
        2 B) per pixel for a model with one (else None)."""
        x = _validate_images(images)
        x = normalize_intensity(x, self.cfg.normalize)
        n, h, w = x.shape
        hp, wp = padded_size(h, w, self.multiple)
        if what == "logits":
            out = np.empty((n, self.n_classes, h, w), dtype=np.float32)
        else:
            out = np.empty((n, h, w), dtype=np.uint8)
        ab = np.empty((n, h, w), dtype=np.uint8) if self.ab_head and what == "labels" else None
        for start in range(0, n, self.batch_size):
            chunk, (top, left) = pad_center(x[start : start + self.batch_size], hp, wp)
            fwd = self._forward_views if self.tta_views > 1 else self._forward
            logits = fwd(chunk)[:, :, top : top + h, left : left + w]
            stop = start + len(chunk)
            if what == "logits":
                out[start:stop] = _merged(logits) if self.ab_head else logits
            elif self.ab_head or self.n_classes == 4:
                labels4, choice = decide_ab(logits)
                out[start:stop] = labels4 if self.n_classes == 4 else combine_labels(labels4)
                if ab is not None:
                    ab[start:stop] = choice
            else:
                out[start:stop] = logits.argmax(axis=1)
        return out, ab

    def _forward_views(self, batch: np.ndarray) -> np.ndarray:
        """Like `_forward`, averaged over `tta_views` dihedral views of each image (`TTA_VIEWS`): log
        of the mean softmax.

        With chromosome channels A and B (4-class networks) the network may name them the other way
        round in a rotated view (the permutation-invariant loss leaves the names free), so each
        view's A and B are first aligned, per image, with the plain view's.
        """
        ref = total = None
        views = TTA_VIEWS[self.tta_views]
        for k, flip in views:
            view = np.rot90(batch, k, axes=(1, 2))
            view = np.ascontiguousarray(view[:, :, ::-1] if flip else view)
            prob = torch.from_numpy(self._forward(view)).softmax(dim=1).numpy()
            prob = np.rot90(prob[..., ::-1] if flip else prob, -k, axes=(2, 3))
            if ref is None:
                ref, total = prob, prob.copy()
                continue
            if prob.shape[1] == 4:
                same = (prob[:, 1] * ref[:, 1] + prob[:, 2] * ref[:, 2]).sum((1, 2))
                swapped = (prob[:, 1] * ref[:, 2] + prob[:, 2] * ref[:, 1]).sum((1, 2))
                prob = np.where((swapped > same)[:, None, None, None], prob[:, SWAP_AB], prob)
            total += prob
        return np.log(np.maximum(total / len(views), 1e-12)).astype(np.float32)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """(B, Hp, Wp) float32 -> (B, C, Hp, Wp) float32 logits on the host."""
        with self._lock:
            if self._ort is not None:
                (logits,) = self._ort.run(None, {"image": batch[:, None]})
                return logits
            fn = self._compiled if self._compiled is not None else self._module
            with torch.inference_mode(), self.plan.autocast():
                t = to_input(torch.from_numpy(batch[:, None]), self.plan)
                logits = fn(t)
            return logits.float().contiguous().cpu().numpy()


def normalize_intensity(x: np.ndarray, mode: str = "single") -> np.ndarray:
    """(N, H, W) float in [0, 1] -> float32, each image scaled so its chromosome grey is 0.5.

    Real images differ in staining and exposure; overlaps are told apart from single chromosomes by
    being about 1.7 times as bright *relative to the same image*, so the network sees relative grey.
    Foreground = pixels above a quarter of the image's maximum. `single`: its 30th percentile is
    scaled to 0.5; it stays on single-chromosome pixels (the overlap is the brightest part) until
    the overlap covers most of the pair, where a median would be an overlap grey and move with the
    overlap's size. `none`: unchanged. Nearly black images (max < 0.02) are left as they are.
    """
    if mode == "none":
        return np.asarray(x, np.float32)
    if mode != "single":
        raise ValueError(f"normalize mode {mode!r} is not one of ['none', 'single']")
    n = x.shape[0]
    flat = x.reshape(n, -1)
    peak = flat.max(axis=1)
    scale = np.ones(n, np.float32)
    for i in np.flatnonzero(peak >= 0.02):
        row = flat[i]
        scale[i] = 0.5 / max(float(np.percentile(row[row > 0.25 * peak[i]], 30)), 1e-3)
    return np.clip(x * scale[:, None, None], 0.0, 4.0).astype(np.float32)


def _merged(logits4: np.ndarray) -> np.ndarray:
    return merge_ab_logits(torch.from_numpy(np.ascontiguousarray(logits4))).numpy()


def decide_ab(logits4: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels from 4-class logits (N, 4, H, W): (4-class labels, A/B choice 1 or 2), both (N, H, W) uint8.

    Background, chromosome and overlap are decided on the merged logits (P(A) + P(B) against
    P(overlap)), then A or B by the larger of the two: one rule for every 4-channel network, so a
    4-class model and a combined model with the A/B head label the same logits alike. On a model
    trained without the merged loss term it scores as the plain 4-class argmax (BENCHMARKS.md).
    """
    choice = np.where(logits4[:, 1] >= logits4[:, 2], 1, 2).astype(np.uint8)
    return split_ab(_merged(logits4).argmax(axis=1), choice), choice


def split_ab(labels3: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """Combined labels (0 bg, 1 chromosome, 2 overlap) split into 4 classes by an A/B choice (1 or 2)."""
    return np.where(labels3 == 1, choice, np.where(labels3 == 2, 3, 0)).astype(np.uint8)


def _validate_images(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 3:
        raise ValueError(f"images must be (N, H, W) grey images, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be float in [0, 1], got dtype {x.dtype}; divide uint8 images by 255")
    if x.shape[0] == 0:
        raise ValueError("images is empty (N == 0)")
    return np.ascontiguousarray(x, dtype=np.float32)


def export_onnx(model: torch.nn.Module, opset: int = 17) -> bytes:
    """The fp32 network as ONNX bytes, input `image` (N, 1, H, W) with dynamic N, H and W."""
    # A copy: `.to(memory_format=...)` works in place and would undo the caller's channels_last.
    model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    buf = io.BytesIO()
    dummy = torch.zeros(1, 1, 96, 96)
    # The TorchScript exporter: the dynamo one needs onnxscript, which is not a dependency.
    torch.onnx.export(
        model,
        (dummy,),
        buf,
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        opset_version=opset,
        dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}},
    )
    return buf.getvalue()


def _ort_session(model: torch.nn.Module, n_threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = n_threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(export_onnx(model), opts, providers=["CPUExecutionProvider"])
