#!/usr/bin/env python
"""Cross-validated fine-tuning on real-dev: the table and the overlay sheets of docs/finetune.md.

Real-dev's ten images are split into five folds of 2 test images (every image tested once). In each
fold the model is fine-tuned (`chromoseg.finetune`, the `finetune` section of params.yaml) from the
base checkpoint on 8, 5 or 2 of the fold's 8 training images (the 5 and the 2 are the first of the
8 in a seeded order), and scored on the fold's 2 test images only. The predictions of the five fold
models are pooled, so each figure is computed from the pixel counts of all ten test images at once,
exactly as `chromoseg evaluate-external` scores one model on the folder (the same loading, scaling,
test-time augmentation, separation and metrics code). The synthetic-only base model is scored on
the same ten images. The 8-image fold models are also scored on the first `--n-synth` images of the
synthetic test split, against the base on the same images, to show what fine-tuning costs there.

    nice -n 19 .venv/bin/python scripts/finetune_cv.py --base /path/to/model.pt

Writes `docs/finetune_cv.json` (every figure, per image too) and the overlay sheets
`docs/finetune_errors_{synthetic,finetuned}.png`; prints the Markdown table. Needs the prepared
splits (`dvc repro prepare`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("finetune_cv")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="Synthetic-only model.pt to fine-tune from.")
    ap.add_argument("--labelme", default=str(ROOT.parent / "shared" / "data" / "real-dev" / "labelme"))
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--sizes", default="8,5,2", help="Training images per fold (subsets of the 8).")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="Order of the images into folds and subsets.")
    ap.add_argument("--steps", type=int, default=0, help="finetune.steps instead of params.yaml's.")
    ap.add_argument(
        "--n-synth", type=int, default=500, help="Synthetic test images for the forgetting check."
    )
    ap.add_argument("--out", default=str(ROOT / "docs" / "finetune_cv.json"))
    ap.add_argument("--sheets", default=str(ROOT / "docs"), help="Folder for the overlay sheets.")
    return ap.parse_args()


def folds_of(n: int, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k folds of (train, test) indices; every index is in exactly one test part. The training
    indices keep a seeded order, so a subset of size m is the first m of them."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    parts = np.array_split(perm, k)
    out = []
    for i, test in enumerate(parts):
        train = np.concatenate([p for j, p in enumerate(parts) if j != i])
        out.append((rng.permutation(train), np.sort(test)))
    return out


def per_image(res: dict, labels4: np.ndarray, ab_order: str, combine: bool, separation: str) -> list[dict]:
    """Each image's dice, overlap IoU and chromosome PI IoU, scored as `evaluate-external` scores."""
    from chromoseg.evaluate import score_output

    rows = []
    for i in range(len(labels4)):
        one = {k: np.asarray(res[k])[i : i + 1] for k in ("labels", "mask_a", "mask_b")}
        m = score_output(one, labels4[i : i + 1], ab_order, combine, combine, separation)
        rows.append({k: m.get(k) for k in ("dice", "iou_overlap", "iou_chromosomes_pi")})
    return rows


def headline(m: dict) -> dict:
    keep = ("dice", "iou_overlap", "iou_chromosomes_pi", "confusion_matrix", "n_images")
    return {k: m[k] for k in keep if k in m}


def sheet(path: Path, images, labels4, res, order, names, scores, title: str, ab_order: str) -> None:
    """Rows of [grey | truth | prediction | errors], worst first; A red, B blue, overlap yellow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from chromoseg.labels import canonical_ab, combine_labels, instances_to_labels4
    from chromoseg.plots import COLOURS_4

    truth4 = canonical_ab(labels4, ab_order)
    pred4 = instances_to_labels4(np.asarray(res["mask_a"]), np.asarray(res["mask_b"]))
    n = len(order)
    fig, axes = plt.subplots(n, 4, figsize=(8.4, 2.2 * n), squeeze=False)
    for r, i in enumerate(order):
        t, p = truth4[i], pred4[i]
        swapped = np.where(p == 1, 2, np.where(p == 2, 1, p))  # A and B unordered: show the better
        if (swapped == t).sum() > (p == t).sum():
            p = swapped
        tc, pc = combine_labels(t), combine_labels(p)
        err_img = np.repeat(images[i][..., None], 3, -1) // 3
        err_img[(tc > 0) != (pc > 0)] = 255  # chromosome missed or added
        err_img[(tc > 0) & (pc > 0) & (tc != pc)] = (255, 0, 255)  # overlap taken for single or back
        tiles = [
            np.repeat(images[i][..., None], 3, -1),
            _overlay4(images[i], t, COLOURS_4),
            _overlay4(images[i], p, COLOURS_4),
            err_img,
        ]
        for c, tile in enumerate(tiles):
            ax = axes[r, c]
            ax.imshow(tile, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(("image", "truth", "prediction", "errors")[c], fontsize=9)
        s = scores[i]
        axes[r, 0].set_ylabel(
            f"{names[i].removesuffix('.json')}\ndice {s['dice']:.3f}\noverlap IoU {s['iou_overlap']:.3f}",
            fontsize=8,
        )
    fig.suptitle(
        f"{title}\nA red, B blue, overlap yellow; errors: white = chromosome vs background, "
        "magenta = overlap vs single chromosome",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _overlay4(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    grey = np.repeat(image[..., None], 3, axis=-1).astype(np.float32)
    col = colours[labels].astype(np.float32)
    fg = (labels > 0)[..., None]
    return np.where(fg, (1 - alpha) * grey + alpha * col, grey).clip(0, 255).astype(np.uint8)


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL", "h5py", "chromoseg.infer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.chdir(ROOT)
    import torch

    from chromoseg.config import load_params
    from chromoseg.data.labelme import load_labelme_dir
    from chromoseg.evaluate import score_output
    from chromoseg.finetune import RealSet, finetune_module, load_init
    from chromoseg.model import cpu_model, exec_plan, set_threads
    from chromoseg.pipeline import load_model
    from chromoseg.prepare import load_split

    params = load_params(args.params)
    if args.steps:
        params = dataclasses.replace(params, finetune=dataclasses.replace(params.finetune, steps=args.steps))
    sizes = [int(s) for s in args.sizes.split(",")]
    images, labels4, _, names = load_labelme_dir(args.labelme)
    n = len(images)
    folds = folds_of(n, args.folds, args.seed)
    assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(n)), (
        "each image tested once"
    )
    assert max(sizes) <= min(len(tr) for tr, _ in folds)
    tr = load_split(params.prepare.out_dir, "train")
    te = load_split(params.prepare.out_dir, "test")
    te_images, te_labels4 = te["images"][: args.n_synth], te["labels4"][: args.n_synth]
    set_threads(params.train.num_threads)
    plan = exec_plan(params.train.precision, params.train.channels_last)

    def scored(model_path: str | Path):
        # As `chromoseg evaluate-external` loads and runs a model (params.yaml's `infer` settings).
        m = load_model(str(model_path), params.infer)

        def on(imgs, labs):
            res = m.predict(imgs)
            metrics = score_output(res, labs, m.ab_order, m.combine_label, m.combine_label, m.separation)
            return res, metrics, (m.ab_order, m.combine_label, m.separation)

        return on

    ck, _ = load_init(args.base, params)
    base = scored(args.base)
    res_base, m_base, (ab_order, combine, sep) = base(images, labels4)
    _, m_base_synth, _ = base(te_images, te_labels4)
    log.info("synthetic-only: real-dev dice %.4f overlap IoU %.4f", m_base["dice"], m_base["iou_overlap"])

    results: dict = {
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "base": str(args.base),
        "finetune": dataclasses.asdict(params.finetune),
        "infer": dataclasses.asdict(params.infer),
        "width_from": "labels (each image rescaled by its polygons' width, as `chromoseg import labelme` does)",
        "folds": [{"train": [names[i] for i in a], "test": [names[i] for i in b]} for a, b in folds],
        "synthetic_only": {
            "real_dev": headline(m_base),
            "per_image": dict(zip(names, per_image(res_base, labels4, ab_order, combine, sep), strict=True)),
            f"synthetic_test_first_{args.n_synth}": headline(m_base_synth),
        },
        "finetuned": {},
    }
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            pooled = {k: np.zeros_like(np.asarray(res_base[k])) for k in ("labels", "mask_a", "mask_b")}
            synth_scores = []
            filled = np.zeros(n, int)
            for f, (train_idx, test_idx) in enumerate(folds):
                use = train_idx[:size]
                # The rule the figures stand on: no fine-tuned score on an image it was trained on.
                assert not set(use) & set(test_idx), f"fold {f}: a training image is in the test part"
                assert not {names[i] for i in use} & {names[i] for i in test_idx}
                real = RealSet(
                    Path(f"fold{f}"), images[use], labels4[use], "", [names[i] for i in use],
                    frozenset(), frozenset(),
                )  # fmt: skip
                t0 = time.perf_counter()
                module, _ = finetune_module(params, ck, real, tr["images"], tr["labels4"], plan)
                seconds.append(time.perf_counter() - t0)
                path = Path(tmp) / f"n{size}_f{f}.pt"
                state = {k: v.cpu() for k, v in module.state_dict().items()}
                torch.save({**ck, "train": dataclasses.asdict(ck["train"]), "state_dict": state}, path)
                model = scored(path)
                res, _, _ = model(images[test_idx], labels4[test_idx])
                for k in pooled:
                    pooled[k][test_idx] = np.asarray(res[k])
                filled[test_idx] += 1
                if size == max(sizes):
                    synth_scores.append(headline(model(te_images, te_labels4)[1]))
                log.info("%d images, fold %d: fine-tuned in %.0f s", size, f, seconds[-1])
            assert (filled == 1).all(), "every image predicted once, by the model of the fold it tests"
            m = score_output(pooled, labels4, ab_order, combine, combine, sep)
            entry = {
                "real_dev_pooled": headline(m),
                "per_image": dict(
                    zip(names, per_image(pooled, labels4, ab_order, combine, sep), strict=True)
                ),
            }
            if synth_scores:
                entry[f"synthetic_test_first_{args.n_synth}_per_fold"] = synth_scores
            results["finetuned"][str(size)] = entry
            log.info(
                "%d images: pooled real-dev dice %.4f overlap IoU %.4f", size, m["dice"], m["iou_overlap"]
            )
            if size == max(sizes):
                write_sheets(args.sheets, images, labels4, names, res_base, pooled, results, size, ab_order)
            results["seconds_per_finetune"] = {
                "mean": round(float(np.mean(seconds)), 1),
                "min": round(float(np.min(seconds)), 1),
                "max": round(float(np.max(seconds)), 1),
            }
            out = Path(args.out)  # after every size: a long run that stops keeps what it measured
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1) + "\n")

    print(table(results, sizes, args.n_synth))
    return 0


def write_sheets(folder, images, labels4, names, res_base, res_ft, results, size, ab_order) -> None:
    n = len(names)
    for tag, res, scores, title in (
        ("synthetic", res_base, results["synthetic_only"]["per_image"], "synthetic-only model"),
        ("finetuned", res_ft, results["finetuned"][str(size)]["per_image"],
         f"fine-tuned on {size} real images (each image predicted by the fold model that did not train on it)"),
    ):  # fmt: skip
        per = [scores[nm] for nm in names]
        order = sorted(range(n), key=lambda i: per[i]["dice"])
        sheet(Path(folder) / f"finetune_errors_{tag}.png", images, labels4, res, order, names, per,
              title, ab_order)  # fmt: skip


def table(results: dict, sizes: list[int], n_synth: int) -> str:
    b = results["synthetic_only"]["real_dev"]
    lines = [
        "| model | real images | real-dev dice (pooled CV) | overlap IoU | chromosome PI IoU |",
        "|---|---|---|---|---|",
        f"| synthetic-only | 0 | {b['dice']:.4f} | {b['iou_overlap']:.4f} | {b['iou_chromosomes_pi']:.4f} |",
    ]
    for s in sorted(sizes):
        m = results["finetuned"][str(s)]["real_dev_pooled"]
        lines.append(
            f"| fine-tuned | {s} | {m['dice']:.4f} | {m['iou_overlap']:.4f} | {m['iou_chromosomes_pi']:.4f} |"
        )
    key = f"synthetic_test_first_{n_synth}"
    bs = results["synthetic_only"][key]
    ft = results["finetuned"][str(max(sizes))][key + "_per_fold"]
    lines += [
        "",
        f"synthetic test split, first {n_synth} images: synthetic-only dice {bs['dice']:.4f}, overlap IoU "
        f"{bs['iou_overlap']:.4f}; fine-tuned on {max(sizes)} (5 fold models) dice "
        f"{np.mean([m['dice'] for m in ft]):.4f} (min {min(m['dice'] for m in ft):.4f}), overlap IoU "
        f"{np.mean([m['iou_overlap'] for m in ft]):.4f} (min {min(m['iou_overlap'] for m in ft):.4f})",
        f"seconds per fine-tune: {results['seconds_per_finetune']}",
        "",
        "Confusion counts on real-dev (pixels; rows truth, columns prediction):",
        "",
        "| model | truth | background | chromosome | overlap |",
        "|---|---|---|---|---|",
    ]
    big = str(max(sizes))
    for name, m in (
        ("synthetic-only", b),
        (f"fine-tuned on {big} (CV)", results["finetuned"][big]["real_dev_pooled"]),
    ):
        for cls, row in zip(("background", "chromosome", "overlap"), m["confusion_matrix"], strict=True):
            lines.append(f"| {name} | {cls} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
