"""Score a checkpoint with 1, 2, 4 or 8 test-time views on the test split and a labelme folder.

python scripts/frontier_score.py model.pt out.json REAL_VIEWS TEST_VIEWS PREPARED_DIR LABELME_DIR
(views as comma lists, e.g. 1,4,8 and 1; the real images are rescaled by their polygons' width).
"""

import json
import sys

import numpy as np

from chromoseg.config import InferConfig
from chromoseg.data.labelme import load_labelme_dir
from chromoseg.evaluate import score, score_output
from chromoseg.labels import instances_to_labels4
from chromoseg.model import set_threads
from chromoseg.pipeline import load_checkpoint, predictor_from_checkpoint, segment
from chromoseg.prepare import load_split


def main(path: str, out: str, real_views: str, test_views: str, prepared: str, labelme: str) -> None:
    set_threads(0)
    real_v = {int(v) for v in real_views.split(",")}
    test_v = {int(v) for v in test_views.split(",")}
    test = load_split(prepared, "test")
    images, truth4, _, _ = load_labelme_dir(labelme, width_from="labels")
    ck = load_checkpoint(path)
    res = {}
    for v in sorted(real_v | test_v):
        pred = predictor_from_checkpoint(ck, InferConfig(tta_views=v))
        row = {}
        if v in test_v:
            o = segment(pred, test["images"].astype(np.float32) / 255.0, True)
            pred4 = instances_to_labels4(o["mask_a"], o["mask_b"])
            m, _ = score(o["labels"], test["labels"], test["labels4"], True, pred4, pred.separation)
            row.update(test_dice=m["dice"], test_iou_overlap=m["iou_overlap"])
        if v in real_v:
            r = segment(pred, images.astype(np.float32) / 255.0, True)
            rm = score_output(r, truth4, ck["ab_order"], True, True, pred.separation)
            row.update(real_dice=rm["dice"], real_iou_overlap=rm["iou_overlap"])
        res[v] = {k: round(x, 4) for k, x in row.items()}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:7])
