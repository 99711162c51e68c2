import dataclasses
from pathlib import Path

import pytest
import yaml

from chromoseg.config import (
    LEGACY_TRAIN,
    ConfigError,
    Params,
    TrainConfig,
    load_params,
    params_from_dict,
    upgrade_checkpoint_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load_and_are_frozen():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.n_classes == (3 if p.combine_label else 4)
    with pytest.raises(AttributeError):
        p.train.epochs = 3  # type: ignore[misc]


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as exc:
        params_from_dict({"train": {"epoch": 3}})
    msg = str(exc.value)
    assert "'epoch'" in msg and "train" in msg and "epochs" in msg and "batch_size" in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="combine_labels"):
        params_from_dict({"combine_labels": True})


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"combine_label": "yes"}, "combine_label: expected true or false"),
        ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer"),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
        ({"prepare": {"label_policy": "fix"}}, "not one of ['none', 'drop', 'repair']"),
        ({"train": {"class_weights_4": [1, 2]}}, "class_weights_4 needs 4 values"),
        ({"train": {"decoder_channels": "wide"}}, "expected a list"),
    ],
)
def test_mistyped_values(data, fragment):
    with pytest.raises(ConfigError) as exc:
        params_from_dict(data)
    assert fragment in str(exc.value)


def test_ints_accepted_as_floats_and_lists_become_tuples():
    p = params_from_dict({"train": {"lr": 1, "decoder_channels": [8, 4, 2], "encoder_depth": 3}})
    assert p.train.lr == 1.0 and isinstance(p.train.lr, float)
    assert p.train.decoder_channels == (8, 4, 2)


def test_flat_params_include_combine_label_and_sections():
    flat = params_from_dict({"combine_label": False}).flat()
    assert flat["combine_label"] is False
    assert flat["train.batch_size"] == Params().train.batch_size
    assert "prepare.label_policy" in flat and "mlflow.experiment" in flat


def test_load_params_errors_name_the_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train: {epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(f)
    f.write_text(yaml.safe_dump({"trian": {}}))
    with pytest.raises(ConfigError, match=str(f)):
        load_params(f)
    with pytest.raises(ConfigError, match="no such parameter file"):
        load_params(tmp_path / "missing.yaml")


def test_yaml_on_off_accepted_for_switches():
    p = params_from_dict(yaml.safe_load("train: {channels_last: off}"))
    assert p.train.channels_last == "off"
    assert params_from_dict(yaml.safe_load("train: {channels_last: on}")).train.channels_last == "on"


def test_selection_metric_by_mode():
    assert params_from_dict({"combine_label": True}).select_by == "dice"
    assert params_from_dict({"combine_label": False}).select_by == "dice_combined"


def test_dataclass_defaults_are_params_yaml():
    """One source of defaults: `Params()` (what bench and library callers get) is params.yaml."""
    yaml_params = load_params(ROOT / "params.yaml")
    assert dataclasses.asdict(Params()) == dataclasses.asdict(yaml_params)
    assert Params() == yaml_params


@pytest.mark.parametrize("section", ["synth", "prepare", "train", "infer", "evaluate", "register", "mlflow"])
def test_every_params_yaml_key_has_a_comment(section):
    """Each key of params.yaml says on its line (or the comment lines above it) what it does."""
    lines = (ROOT / "params.yaml").read_text().splitlines()
    start = (
        lines.index(f"{section}:")
        if f"{section}:" in lines
        else next(i for i, line in enumerate(lines) if line.startswith(f"{section}:"))
    )
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if line and not line.startswith(" "):
            break
        if not line.strip() or line.strip().startswith("#") or ":" not in line:
            continue
        commented = "#" in line or lines[i - 1].strip().startswith("#")
        assert commented, f"params.yaml {section}: {line.strip()!r} has no comment"


def test_removed_knobs_are_errors_in_params_but_load_from_old_checkpoints():
    for key, value in (("affine_p", 0.5), ("chromosome_grey_p", 0.0), ("pi_loss", True),
                       ("select_by", "auto"), ("tta", True)):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"unknown key\(s\) \['{key}'\] in section 'train'"):
            params_from_dict({"train": {key: value}})
    with pytest.raises(ConfigError, match=r"train.scheduler: 'onecycle' is not one of"):
        params_from_dict({"train": {"scheduler": "onecycle"}})
    with pytest.raises(ConfigError, match=r"train.normalize: 'foreground' is not one of"):
        params_from_dict({"train": {"normalize": "foreground"}})


def test_upgrade_checkpoint_config_fills_what_old_checkpoints_implied():
    old = {"state_dict": {}, "n_classes": 3, "combine_label": True,
           "train": {"arch": "Unet", "encoder": "resnet18", "affine_p": 0.5, "tta": True, "pi_loss": False}}  # fmt: skip
    ck = upgrade_checkpoint_config(old)
    assert isinstance(ck["train"], TrainConfig)
    for key, value in LEGACY_TRAIN.items():
        assert getattr(ck["train"], key) == value, key
    assert ck["train"].normalize == "none" and ck["train"].ab_aux is False
    assert ck["ab_order"] == "area"  # before the rule was recorded, A was the larger chromosome
    assert old["train"]["tta"] is True and "ab_order" not in old  # the input is not changed
    # A checkpoint of this version comes back as it was written.
    new = {"state_dict": {}, "n_classes": 4, "combine_label": False, "ab_order": "position",
           "train": dataclasses.asdict(TrainConfig())}  # fmt: skip
    got = upgrade_checkpoint_config(new)
    assert got["train"] == TrainConfig() and got["ab_order"] == "position"
    with pytest.raises(ConfigError, match="normalize"):
        upgrade_checkpoint_config({**new, "train": {**new["train"], "normalize": "foreground"}})


def test_infer_tta_views_is_validated():
    assert params_from_dict({"infer": {"tta_views": 4}}).infer.tta_views == 4
    with pytest.raises(ConfigError, match=r"infer.tta_views must be one of \[1, 2, 4, 8\], got 3"):
        params_from_dict({"infer": {"tta_views": 3}})


def test_register_metric_by_mode():
    assert params_from_dict({"combine_label": True}).register_metric == "dice"
    assert params_from_dict({"combine_label": False}).register_metric == "dice_pi"
    four = {"combine_label": False, "register": {"metric": "iou_overlap"}}
    assert params_from_dict(four).register_metric == "iou_overlap"
    # The permutation-invariant and merged dice exist for 4 classes only.
    with pytest.raises(ConfigError, match=r"register.metric 'dice_pi' exists with 4 classes only"):
        params_from_dict({"combine_label": True, "register": {"metric": "dice_pi"}})
    with pytest.raises(ConfigError, match=r"register.metric: 'dice_a' is not one of"):
        params_from_dict({"register": {"metric": "dice_a"}})
    with pytest.raises(ConfigError, match=r"register.real_tolerance must be in \[0, 1\)"):
        params_from_dict({"register": {"real_tolerance": -0.1}})
    with pytest.raises(ConfigError, match=r"register.min_gain must be in \[0, 1\)"):
        params_from_dict({"register": {"min_gain": 1.5}})
    assert params_from_dict({}).register.real_labelme == ""  # the real-image gate is opt-in
