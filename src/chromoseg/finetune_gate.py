"""The real-image gate for fine-tuned models (`register`): never scored on images the model was
fine-tuned on, and the rule that promotes a fine-tuned version."""

from __future__ import annotations

import os

from chromoseg.config import Params
from chromoseg.data.errors import DataError
from chromoseg.finetune import RealSet, _project_path, load_real_set


def shared_images(real: RealSet, gate_dir: str | os.PathLike[str]) -> list[str]:
    """Names of the gate folder's labelme files that are also in the fine-tune set: the same file,
    the same decoded image, or the same image at the training scale."""
    from chromoseg.data.labelme import _load_records

    recs = _load_records(gate_dir, 11.5, real.images.shape[1], "labels")
    flat = {img.tobytes() for img in real.images}
    return [
        r["name"]
        for r in recs
        if r["sha256"] in real.file_sha256
        or r["image_sha256"] in real.image_sha256
        or r["grey"].tobytes() in flat
    ]


def check_gate_disjoint(params: Params, real: RealSet | None = None) -> None:
    """DataError when the real-image gate (`register.real_labelme`) holds images of `finetune.data`:
    the gate would score the fine-tuned model on images it was trained on."""
    if not params.finetune.data or not params.register.real_labelme:
        return
    gate = _project_path(params.register.real_labelme)
    if not gate.is_dir():
        return  # the registry reports a missing gate folder itself
    real = real or load_real_set(_project_path(params.finetune.data))
    shared = shared_images(real, gate)
    if shared:
        listed = ", ".join(shared[:5]) + (", ..." if len(shared) > 5 else "")
        raise DataError(
            f"register.real_labelme ({gate}) and finetune.data ({params.finetune.data}) share "
            f"{len(shared)} image(s) ({listed}): the gate would score the model on images it was "
            "fine-tuned on; point register.real_labelme at annotated images kept out of the fine-tune set"
        )


def finetune_promotion(new, champ, min_gain: float, max_synthetic_drop: float) -> tuple[bool, str]:
    """(promote?, why) for a fine-tuned version (`registry._Side` scores: `score` on the synthetic
    test split, `real` on the gate's real images or None without a gate).

    The real images decide: the version must beat the champion there by more than `min_gain`, and
    may fall at most `max_synthetic_drop` below it on the synthetic test split.
    """
    if new.real is None:
        return False, (
            "a fine-tuned model is promoted only through the real-image gate; set register.real_labelme "
            "to annotated real images it was not fine-tuned on"
        )
    if champ is None:
        return True, "there was no champion"
    if not new.real > champ.real + min_gain:
        return False, f"it does not beat the champion on the real images by more than min_gain {min_gain:g}"
    if new.score < champ.score - max_synthetic_drop:
        return False, (
            f"it beats the champion on the real images but falls {champ.score - new.score:.4f} below it on "
            f"the synthetic test split (finetune.max_synthetic_drop {max_synthetic_drop:g})"
        )
    return True, "it beats the champion on the real images and holds up on the synthetic test split"
