"""Predictor: padding/cropping, shapes, dtype checks and backend agreement on a tiny random model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from chromoseg.config import TrainConfig
from chromoseg.infer import Predictor, choose_backend, clean_state_dict, decide_ab, pad_center, padded_size
from chromoseg.model import build_model, exec_plan

# A plain smp U-Net (no full-resolution branch, context head or A/B head), grey as is.
TINY = TrainConfig(
    encoder_depth=3, decoder_channels=(16, 8, 8), full_res_channels=0, global_context=0, ab_aux=False,
    normalize="none",
)  # fmt: skip
FP32 = exec_plan("fp32", "off", device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two OpenMP threads on a busy 2-core machine stall at barriers (minutes instead of seconds).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(TINY, 3).eval()


def test_padded_size_rounds_up() -> None:
    assert padded_size(88, 88, 32) == (96, 96)
    assert padded_size(100, 131, 32) == (128, 160)
    assert padded_size(8, 8, 32) == (32, 32)
    assert padded_size(96, 64, 32) == (96, 64)


def test_pad_center_places_images_in_the_middle() -> None:
    x = np.ones((2, 3, 5), np.float32)
    out, (top, left) = pad_center(x, 8, 8)
    assert out.shape == (2, 8, 8) and (top, left) == (2, 1)
    assert out.sum() == x.sum()
    assert out[:, top : top + 3, left : left + 5].min() == 1.0


@pytest.mark.parametrize("shape", [(100, 131), (88, 88), (8, 8), (96, 96)])
def test_predictor_crops_back_to_input_size(model: torch.nn.Module, shape: tuple[int, int]) -> None:
    pred = Predictor(model, TINY, 3, FP32, backend="torch", batch_size=2)
    images = np.random.default_rng(0).random((3, *shape), dtype=np.float32)
    logits = pred.predict_logits(images)
    labels = pred.predict_labels(images)
    assert logits.shape == (3, 3, *shape) and logits.dtype == np.float32
    assert labels.shape == (3, *shape) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, logits.argmax(1))


def test_batching_does_not_change_results(model: torch.nn.Module) -> None:
    images = np.random.default_rng(1).random((5, 40, 50), dtype=np.float32)
    a = Predictor(model, TINY, 3, FP32, backend="torch", batch_size=2).predict_logits(images)
    b = Predictor(model, TINY, 3, FP32, backend="torch", batch_size=64).predict_logits(images)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_padding_equals_running_the_padded_image(model: torch.nn.Module) -> None:
    images = np.random.default_rng(2).random((1, 88, 88), dtype=np.float32)
    got = Predictor(model, TINY, 3, FP32, backend="torch").predict_logits(images)
    padded = np.zeros((1, 1, 96, 96), np.float32)
    padded[0, 0, 4:92, 4:92] = images[0]
    with torch.inference_mode():
        want = model(torch.from_numpy(padded)).numpy()[:, :, 4:92, 4:92]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_state_dict_input_and_compile_prefix(model: torch.nn.Module) -> None:
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    assert set(clean_state_dict(state)) == set(model.state_dict())
    images = np.random.default_rng(3).random((2, 32, 32), dtype=np.float32)
    a = Predictor(state, TINY, 3, FP32, backend="torch").predict_logits(images)
    b = Predictor(model, TINY, 3, FP32, backend="torch").predict_logits(images)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_onnx_backend_matches_torch(model: torch.nn.Module) -> None:
    images = np.random.default_rng(4).random((3, 100, 131), dtype=np.float32)
    ref = Predictor(model, TINY, 3, FP32, backend="torch").predict_logits(images)
    got = Predictor(model, TINY, 3, FP32, backend="onnx", batch_size=2).predict_logits(images)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # a second size reuses the same session (dynamic H, W)
    small = images[:1, :8, :8]
    np.testing.assert_allclose(
        Predictor(model, TINY, 3, FP32, backend="onnx").predict_logits(small),
        Predictor(model, TINY, 3, FP32, backend="torch").predict_logits(small),
        atol=1e-4,
    )


def test_channels_last_and_bf16_stay_close(model: torch.nn.Module) -> None:
    images = np.random.default_rng(5).random((2, 64, 64), dtype=np.float32)
    ref = Predictor(model, TINY, 3, FP32, backend="torch").predict_logits(images)
    cl = Predictor(model, TINY, 3, exec_plan("fp32", "on", device="cpu"), backend="torch")
    np.testing.assert_allclose(cl.predict_logits(images), ref, atol=1e-4)
    bf = Predictor(model, TINY, 3, exec_plan("bf16", "on", device="cpu"), backend="torch")
    np.testing.assert_allclose(bf.predict_logits(images), ref, atol=0.1 * (1 + np.abs(ref).max()))


def test_auto_backend_choice(monkeypatch) -> None:
    import chromoseg.infer as infer

    assert choose_backend(exec_plan("bf16", "on", device="cpu")) == "torch"
    monkeypatch.setattr(infer, "_onnx_available", lambda: True)
    assert choose_backend(FP32) == "onnx"  # fp32 on CPU: ONNX Runtime where installed
    monkeypatch.setattr(infer, "_onnx_available", lambda: False)
    assert choose_backend(FP32) == "torch"


def test_concurrent_calls_are_consistent(model: torch.nn.Module) -> None:
    pred = Predictor(model, TINY, 3, FP32, backend="torch", batch_size=1)
    images = np.random.default_rng(6).random((3, 32, 32), dtype=np.float32)
    want = pred.predict_logits(images)
    results: list[np.ndarray] = []

    def call() -> None:
        results.append(pred.predict_logits(images))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for r in results:
        np.testing.assert_allclose(r, want, atol=1e-6)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((4, 4), np.float32), "shape"),
        (np.zeros((1, 8, 8), np.uint8), "dtype"),
        (np.zeros((0, 8, 8), np.float32), "empty"),
    ],
)
def test_bad_input_is_a_clear_error(model: torch.nn.Module, bad: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Predictor(model, TINY, 3, FP32, backend="torch").predict_logits(bad)


def test_unknown_backend_lists_choices(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="onnx"):
        Predictor(model, TINY, 3, FP32, backend="tensorrt")  # type: ignore[arg-type]


def test_normalize_intensity_is_exposure_invariant():
    from chromoseg.infer import normalize_intensity

    img = np.zeros((1, 20, 20), np.float32)
    img[0, 2:18, 5:10] = 70 / 255  # a single chromosome
    img[0, 8:12, 5:10] = 140 / 255  # an overlap, twice as bright
    out = normalize_intensity(img)
    assert out[0, 3, 6] == pytest.approx(0.5) and out[0, 9, 6] == pytest.approx(1.0)
    assert out[0, 0, 0] == 0.0
    np.testing.assert_allclose(normalize_intensity(img * 1.6), out, rtol=1e-6)
    dark = np.full((1, 8, 8), 0.01, np.float32)  # nearly black: left alone
    np.testing.assert_array_equal(normalize_intensity(dark), dark)


@pytest.mark.parametrize("overlap_rows", [2, 6, 9])
def test_single_mode_keeps_single_grey_whatever_the_overlap_size(overlap_rows: int):
    from chromoseg.infer import normalize_intensity

    img = np.zeros((1, 20, 20), np.float32)
    img[0, 2:18, 5:10] = 70 / 255  # a single chromosome, 16 rows
    img[0, 2 : 2 + overlap_rows, 5:10] = 119 / 255  # overlap 1.7x as bright, up to 9 of 16 rows
    single = normalize_intensity(img, "single")
    assert single[0, 17, 6] == pytest.approx(0.5)
    assert single[0, 2, 6] == pytest.approx(0.85)
    for gone in ("foreground", "mean"):
        with pytest.raises(ValueError, match="normalize mode"):
            normalize_intensity(img, gone)


def test_full_res_branch_model_runs_and_round_trips() -> None:
    from dataclasses import replace

    from chromoseg.model import FullResUnet

    cfg = replace(TINY, full_res_channels=8)
    torch.manual_seed(1)
    net = build_model(cfg, 4).eval()
    assert isinstance(net, FullResUnet)
    images = np.random.default_rng(5).random((2, 37, 50), dtype=np.float32)
    logits = Predictor(net, cfg, 4, FP32, backend="torch").predict_logits(images)
    assert logits.shape == (2, 4, 37, 50)
    # A checkpoint state dict rebuilds the same network (the path evaluate and serving take).
    again = Predictor(net.state_dict(), cfg, 4, FP32, backend="torch").predict_logits(images)
    np.testing.assert_array_equal(again, logits)
    # The branch changes the output: it is wired in, not dead weight.
    with torch.no_grad():
        net.stem[0].weight.mul_(3.0)
    changed = Predictor(net, cfg, 4, FP32, backend="torch").predict_logits(images)
    assert np.abs(changed - logits).max() > 1e-3
    with pytest.raises(ValueError, match="full_res_channels"):
        build_model(replace(cfg, arch="FPN"), 3)


def test_global_context_starts_as_the_plain_head_and_conditions_on_the_whole_image() -> None:
    from dataclasses import replace

    cfg = replace(TINY, full_res_channels=8)
    ctx = replace(cfg, global_context=16)
    torch.manual_seed(3)
    plain = build_model(cfg, 3).eval()
    net = build_model(ctx, 3).eval()
    # Same weights everywhere but the (zero-initialised) conditioning MLP: the same output.
    missing = net.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("context.") for k in missing)
    images = np.random.default_rng(6).random((2, 40, 40), dtype=np.float32)
    base = Predictor(plain, cfg, 3, FP32, backend="torch").predict_logits(images)
    np.testing.assert_allclose(
        Predictor(net, ctx, 3, FP32, backend="torch").predict_logits(images), base, atol=1e-5
    )
    # Once trained (here: perturbed), a pixel's logits depend on content far outside its receptive
    # field: a bright spot in one corner changes the logits in the opposite corner.
    with torch.no_grad():
        net.context[2].weight.normal_(0.0, 0.5)
    far = images.copy()
    far[:, :6, :6] = 1.0
    a = Predictor(net, ctx, 3, FP32, backend="torch").predict_logits(images)
    b = Predictor(net, ctx, 3, FP32, backend="torch").predict_logits(far)
    assert np.abs(a[:, :, -4:, -4:] - b[:, :, -4:, -4:]).max() > 1e-3
    # The ONNX export (the fp32 CPU backend) gives the same logits.
    onnx = Predictor(net, ctx, 3, FP32, backend="onnx").predict_logits(images)
    np.testing.assert_allclose(onnx, a, atol=1e-4)
    with pytest.raises(ValueError, match="full_res_channels"):
        build_model(replace(TINY, global_context=16), 3)


def test_ab_aux_model_is_4_class_in_training_and_3_class_outside() -> None:
    from dataclasses import replace

    from chromoseg.losses import merge_ab_logits
    from chromoseg.model import MergeAB

    cfg = replace(TINY, ab_aux=True)
    torch.manual_seed(2)
    net = build_model(cfg, 3)
    assert isinstance(net, MergeAB)
    x = torch.rand(2, 1, 32, 32)
    logits4 = net.train()(x)
    assert logits4.shape == (2, 4, 32, 32)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), merge_ab_logits(net.net(x)))
    # 4-class training has its own A/B classes: the flag adds nothing there.
    assert not isinstance(build_model(cfg, 4), MergeAB)
    # Rebuilt from a state dict (evaluate, serving) and exported to ONNX, it answers in 3 classes.
    images = np.random.default_rng(6).random((2, 37, 50), dtype=np.float32)
    eager = Predictor(net.state_dict(), cfg, 3, FP32, backend="torch").predict_logits(images)
    assert eager.shape == (2, 3, 37, 50)
    onnx = Predictor(net, cfg, 3, FP32, backend="onnx").predict_logits(images)
    np.testing.assert_allclose(onnx, eager, atol=1e-4)


def test_ab_head_splits_the_chromosome_pixels_of_its_own_labels() -> None:
    """A combined model with the A/B head: `predict_segmentation` returns the merged labels and the
    head's A/B split of them (A where the A logit wins), on every backend; plain combined models have
    no split (geometry separates them) and 4-class models are their own split."""
    from dataclasses import replace

    from chromoseg.labels import combine_labels

    cfg = replace(TINY, ab_aux=True)
    torch.manual_seed(4)
    net = build_model(cfg, 3).eval()
    last = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():  # an untrained net: favour A and B so that both are predicted
        last.bias[1:3] += 1.0
    images = np.random.default_rng(8).random((3, 40, 44), dtype=np.float32)
    pred = Predictor(net, cfg, 3, FP32, backend="torch")
    assert pred.ab_head and pred.separation == "ab_head"
    labels, labels4 = pred.predict_segmentation(images)
    np.testing.assert_array_equal(labels, pred.predict_labels(images))
    np.testing.assert_array_equal(combine_labels(labels4), labels)
    raw = Predictor(net.net, cfg, 4, FP32, backend="torch").predict_logits(images)
    chrom = labels == 1
    assert chrom.sum() > 100 and (labels4[chrom] == 1).any() and (labels4[chrom] == 2).any()
    np.testing.assert_array_equal(labels4[chrom] == 1, (raw[:, 1] >= raw[:, 2])[chrom])
    onnx = Predictor(net, cfg, 3, FP32, backend="onnx").predict_segmentation(images)
    assert (onnx[1] != labels4).mean() < 1e-3  # fp32 rounding may flip a tie-close pixel

    plain = Predictor(build_model(TINY, 3).eval(), TINY, 3, FP32, backend="torch")
    assert plain.predict_segmentation(images)[1] is None and plain.separation == "geometry"
    four = Predictor(build_model(TINY, 4).eval(), TINY, 4, FP32, backend="torch", ab_order="area")
    lab, lab4 = four.predict_segmentation(images)
    np.testing.assert_array_equal(lab, lab4)


def test_tta_is_off_by_default_and_commutes_with_rotation(model: torch.nn.Module) -> None:
    images = np.random.default_rng(7).random((2, 30, 70), dtype=np.float32)  # padded to 32 x 96
    plain = Predictor(model, TINY, 3, FP32, backend="torch")
    assert plain.tta_views == 1 and plain.describe()["tta_views"] == "1"
    tta = Predictor(model, TINY, 3, FP32, backend="torch", tta_views=8)
    a = tta.predict_logits(images)
    # The average over all 8 views does not depend on how the input was turned.
    turned = tta.predict_logits(np.ascontiguousarray(np.rot90(images, 1, axes=(1, 2))))
    np.testing.assert_allclose(turned, np.rot90(a, 1, axes=(2, 3)), atol=1e-5)
    # It is not the plain prediction (a random network is far from rotation-invariant).
    assert np.abs(np.exp(a) - torch.from_numpy(plain.predict_logits(images)).softmax(1).numpy()).max() > 1e-3


@pytest.mark.parametrize(
    ("views", "invariant_to"),
    [
        (2, lambda x: x[..., ::-1]),  # identity + horizontal flip
        (4, lambda x: x[..., ::-1, :]),  # + vertical flip and 180 degrees
        (4, lambda x: np.rot90(x, 2, axes=(-2, -1))),
    ],
)
def test_fewer_tta_views_average_over_their_own_flips(model: torch.nn.Module, views, invariant_to) -> None:
    images = np.random.default_rng(3).random((2, 32, 64), dtype=np.float32)
    pred = Predictor(model, TINY, 3, FP32, backend="torch", tta_views=views)
    a = pred.predict_logits(images)
    b = pred.predict_logits(np.ascontiguousarray(invariant_to(images)))
    np.testing.assert_allclose(b, np.ascontiguousarray(invariant_to(a)), atol=1e-5)
    # 2 views are not rotation-invariant: they are not the 8-view average.
    eight = Predictor(model, TINY, 3, FP32, backend="torch", tta_views=8).predict_logits(images)
    assert np.abs(a - eight).max() > 1e-4
    with pytest.raises(ValueError, match="tta_views must be one of"):
        Predictor(model, TINY, 3, FP32, backend="torch", tta_views=3)


def test_tta_aligns_chromosome_a_and_b_of_every_view() -> None:
    cfg = TINY
    pred = Predictor(build_model(cfg, 4), cfg, 4, FP32, backend="torch", tta_views=8)
    calls = []

    def pointwise(batch: np.ndarray, swap: bool) -> np.ndarray:
        # A per-pixel "network": A bright, B dark; every other view names them the other way round.
        x = batch[:, None]
        logits = np.concatenate([0 * x, 8 * x, 8 * (1 - x), 0 * x + 1], axis=1).astype(np.float32)
        calls.append(1)
        return logits[:, [0, 2, 1, 3]] if swap and len(calls) % 2 == 0 else logits

    images = np.random.default_rng(8).random((3, 32, 32), dtype=np.float32)
    pred._forward = lambda b: pointwise(b, swap=False)
    straight = pred.predict_logits(images)
    pred._forward = lambda b: pointwise(b, swap=True)
    swapped = pred.predict_logits(images)
    assert len(calls) == 16  # 8 views, twice
    np.testing.assert_allclose(swapped, straight, atol=1e-6)
    expected = torch.from_numpy(pointwise(images, swap=False)).log_softmax(1).numpy()
    np.testing.assert_allclose(straight, expected, atol=1e-5)


def test_unused_encoder_stages_are_dropped_and_old_checkpoints_still_load() -> None:
    cfg = TrainConfig(
        encoder_depth=3, decoder_channels=(16, 8, 8), full_res_channels=8, global_context=0, ab_aux=True
    )
    torch.manual_seed(0)
    net = build_model(cfg, 3).eval()
    keys = net.state_dict().keys()
    assert not [k for k in keys if ".layer3." in k or ".layer4." in k]
    assert [k for k in keys if ".layer2." in k]  # the stages depth 3 runs stay
    # A checkpoint written before the stages were dropped still holds them: they are ignored.
    old = dict(net.state_dict())
    old["net.encoder.layer3.0.conv1.weight"] = torch.zeros(256, 128, 3, 3)
    images = np.random.default_rng(1).random((2, 40, 40), dtype=np.float32)
    ref = Predictor(net, cfg, 3, FP32, backend="torch").predict_logits(images)
    got = Predictor(old, cfg, 3, FP32, backend="torch").predict_logits(images)
    np.testing.assert_array_equal(got, ref)
    # Any other unknown or missing weight is still an error.
    bad = dict(net.state_dict())
    bad["net.head.9.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"head\.9"):
        Predictor(bad, cfg, 3, FP32, backend="torch")


def test_decide_ab_weighs_overlap_against_a_and_b_together() -> None:
    # Probabilities (bg, A, B, overlap) for four pixels.
    probs = np.array(
        [
            [0.10, 0.30, 0.25, 0.35],  # unsure which chromosome: A + B = 0.55 beats overlap, then A
            [0.05, 0.15, 0.20, 0.60],  # overlap beats A + B
            [0.50, 0.20, 0.15, 0.15],  # background beats A + B = 0.35
            [0.30, 0.05, 0.40, 0.25],  # chromosome B
        ],
        np.float32,
    )
    logits = np.log(probs).T.reshape(1, 4, 1, 4)
    labels4, choice = decide_ab(logits)
    np.testing.assert_array_equal(labels4[0, 0], [1, 3, 0, 2])
    np.testing.assert_array_equal(choice[0, 0], [1, 2, 1, 2])
    assert logits.argmax(1)[0, 0, 0] == 3  # where a plain argmax differs


@pytest.mark.parametrize(
    ("arch", "depth"), [("FPN", 5), ("PSPNet", 3), ("DeepLabV3Plus", 3), ("Linknet", 3), ("PAN", 3)]
)
def test_other_architectures_give_full_size_logits(arch: str, depth: int) -> None:
    from dataclasses import replace

    cfg = replace(TINY, arch=arch, encoder_depth=depth, full_res_channels=0, global_context=0)
    torch.manual_seed(0)
    net = build_model(cfg, 3).eval()
    images = np.random.default_rng(2).random((2, 37, 50), dtype=np.float32)
    logits = Predictor(net, cfg, 3, FP32, backend="torch").predict_logits(images)
    assert logits.shape == (2, 3, 37, 50) and np.isfinite(logits).all()


@pytest.mark.parametrize(("arch", "depth"), [("FPN", 3), ("PSPNet", 5), ("PAN", 5)])
def test_architecture_at_a_depth_smp_cannot_do_is_a_config_error(arch: str, depth: int) -> None:
    from dataclasses import replace

    from chromoseg.config import ConfigError

    cfg = replace(TINY, arch=arch, encoder_depth=depth, full_res_channels=0, global_context=0)
    with pytest.raises(ConfigError, match=rf"train.arch '{arch}' with train.encoder_depth {depth} gives"):
        build_model(cfg, 3)
