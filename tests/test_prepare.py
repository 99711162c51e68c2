import json

import numpy as np
import pytest

from chromoseg.config import PrepareConfig, params_from_dict
from chromoseg.data.io import DataError, read_dataset, write_dataset
from chromoseg.prepare import load_split, run_prepare, split_indices


def test_index_split_follows_ghosh():
    parts = split_indices(1000, PrepareConfig(), None, seed=0)
    np.testing.assert_array_equal(parts["train"], np.arange(800))
    np.testing.assert_array_equal(parts["val"], np.arange(800, 1000)[:100])  # at most half the test part
    parts = split_indices(13434, PrepareConfig(), None, seed=0)
    assert len(parts["train"]) == 13434 - 2687
    np.testing.assert_array_equal(parts["val"], np.arange(13434 - 2687, 13434 - 2687 + 200))
    assert parts["test"][0] == parts["val"][-1] + 1 and parts["test"][-1] == 13433


def test_group_split_has_no_shared_groups():
    sources = np.repeat(np.arange(50), 20)
    cfg = PrepareConfig(split="group", val_size=40)
    parts = split_indices(len(sources), cfg, sources, seed=3)
    train_g = set(sources[parts["train"]])
    test_g = set(sources[parts["val"]]) | set(sources[parts["test"]])
    assert not train_g & test_g
    assert 0.18 <= (len(parts["val"]) + len(parts["test"])) / len(sources) <= 0.3
    with pytest.raises(DataError, match="source_id"):
        split_indices(100, cfg, None, seed=0)


def test_prepare_writes_splits_and_combines(tmp_path, small_synth, monkeypatch):
    images, labels, sources = small_synth
    raw = tmp_path / "raw.h5"
    write_dataset(raw, images, labels, sources)
    monkeypatch.chdir(tmp_path)
    p = params_from_dict(
        {
            "combine_label": True,
            "prepare": {
                "raw": str(raw),
                "out_dir": "prep",
                "val_size": 4,
                "metrics": "m.json",
                "ab_order": "area",
            },
        }
    )
    summary = run_prepare(p)
    tr, va, te = (load_split("prep", s) for s in ("train", "val", "test"))
    assert len(tr["images"]) + len(va["images"]) + len(te["images"]) == summary["n_kept"]
    assert set(np.unique(tr["labels"])) <= {0, 1, 2}
    assert set(np.unique(tr["labels4"])) <= {0, 1, 2, 3}
    # Combined labels are exactly the merge of the 4-class truth.
    np.testing.assert_array_equal(tr["labels"], np.array([0, 1, 1, 2], np.uint8)[tr["labels4"]])
    # The area rule makes A the larger chromosome in every image.
    l4 = tr["labels4"].reshape(len(tr["labels4"]), -1)
    assert (((l4 == 1) | (l4 == 3)).sum(1) >= ((l4 == 2) | (l4 == 3)).sum(1)).all()
    assert json.loads((tmp_path / "m.json").read_text())["n_val"] == 4


def test_hdf5_roundtrip_is_byte_identical(tmp_path, small_synth):
    images, labels, sources = small_synth
    a = write_dataset(tmp_path / "a.h5", images, labels, sources)
    b = write_dataset(tmp_path / "b.h5", images, labels, sources)
    assert a.read_bytes() == b.read_bytes()
    ds = read_dataset(a)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    np.testing.assert_array_equal(ds.source_ids, sources)
    assert ds.key == "dataset_1" and oct(a.stat().st_mode)[-3:] in ("644", "664")
