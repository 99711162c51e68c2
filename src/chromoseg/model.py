"""One model factory (smp by name) and the CPU/GPU execution plan (precision, memory format)."""

from __future__ import annotations

import logging
import os
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from chromoseg.config import ConfigError, TrainConfig, input_multiple_of
from chromoseg.losses import merge_ab_logits

log = logging.getLogger(__name__)

# smp architectures that accept encoder_depth/decoder_channels the U-Net way.
ARCHS = ("Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "Linknet", "MAnet", "PAN")
# Those whose decoder takes one width per stage and ends at full resolution.
UNET_LIKE = ("Unet", "UnetPlusPlus", "MAnet")


def build_model(cfg: TrainConfig, n_classes: int) -> torch.nn.Module:
    """An smp model with a grey (1-channel) input and `n_classes` logits, no pretrained weights.

    Combined labels with `cfg.ab_aux`: a 4-class network inside `MergeAB` (3-class logits out).
    """
    if cfg.ab_aux and n_classes == 3:
        return MergeAB(_build_net(cfg, 4))
    return _build_net(cfg, n_classes)


def _build_net(cfg: TrainConfig, n_classes: int) -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    if cfg.arch not in ARCHS:
        raise ConfigError(f"train.arch {cfg.arch!r} is not supported; choose one of {list(ARCHS)}")
    kwargs: dict[str, Any] = {
        "encoder_name": cfg.encoder,
        "encoder_weights": None,
        "in_channels": 1,
        "classes": n_classes,
        # Every architecture gets the depth: the unused stages are deleted below, and the input is
        # padded to 2 ** depth (`input_multiple`).
        "encoder_depth": cfg.encoder_depth,
    }
    if cfg.arch in UNET_LIKE:
        if len(cfg.decoder_channels) != cfg.encoder_depth:
            raise ConfigError(
                f"train.decoder_channels has {len(cfg.decoder_channels)} values but train.encoder_depth "
                f"is {cfg.encoder_depth}; give one decoder width per encoder stage"
            )
        kwargs["decoder_channels"] = list(cfg.decoder_channels)
    if cfg.full_res_channels and cfg.arch not in UNET_LIKE:
        raise ConfigError(
            f"train.full_res_channels needs a decoder that ends at full resolution (Unet, UnetPlusPlus, "
            f"MAnet), not {cfg.arch!r}; set it to 0"
        )
    try:
        base = smp.create_model(cfg.arch, **kwargs)
    except KeyError as exc:
        raise ConfigError(
            f"train.encoder {cfg.encoder!r} is not an smp encoder ({exc}); "
            "see segmentation_models_pytorch.encoders.get_encoder_names()"
        ) from exc
    except (ValueError, AssertionError, AttributeError) as exc:
        raise ConfigError(
            f"train.arch {cfg.arch!r} cannot be built with train.encoder_depth {cfg.encoder_depth} "
            f"and encoder {cfg.encoder!r} ({exc}); try another train.encoder_depth or train.arch"
        ) from exc
    drop_unused_stages(base.encoder, cfg.encoder_depth)
    if cfg.arch not in UNET_LIKE:
        _check_output_size(base, cfg)
    if cfg.global_context and not cfg.full_res_channels:
        raise ConfigError(
            "train.global_context modulates the full-resolution head; set train.full_res_channels > 0"
        )
    if not cfg.full_res_channels:
        return base
    return FullResUnet(base, cfg.full_res_channels, n_classes, cfg.global_context)


def _check_output_size(net: torch.nn.Module, cfg: TrainConfig) -> None:
    """Raise a clear error if `net` does not give full-size logits for a padded 88 px image.

    smp's FPN, PSPNet and PAN fix their upsampling for one encoder depth, so at another depth they
    give logits of the wrong size, or fail on a small input. One eval-mode forward, no state changed.
    """
    m = input_multiple(cfg)
    side = -(-88 // m) * m
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, 1, side, side))
        got = f"{out.shape[-2]}x{out.shape[-1]}"
    except RuntimeError as exc:
        got = f"an error ({str(exc).splitlines()[0][:120]})"
    finally:
        net.train(was_training)
    if got != f"{side}x{side}":
        raise ConfigError(
            f"train.arch {cfg.arch!r} with train.encoder_depth {cfg.encoder_depth} gives {got} for a "
            f"{side}x{side} input, not full-size logits; use encoder_depth 5 for FPN, 3 for PSPNet and "
            "PAN (smp fixes their upsampling for one depth), or a U-Net"
        )


def drop_unused_stages(encoder: torch.nn.Module, depth: int) -> None:
    """Delete the ResNet stages that `encoder_depth` never runs (in place).

    smp builds all four ResNet stages whatever the depth; at depth 3 the unused `layer3`/`layer4` of
    resnet18 are 10.5 M of its 11.2 M weights (42 MB in every checkpoint and registered model).
    They are built first and deleted after, so the random initialisation of every used weight, and
    with it training, is unchanged. Stage `layerK` runs at depth K + 1 and deeper.
    """
    from segmentation_models_pytorch.encoders.resnet import ResNetEncoder

    if not isinstance(encoder, ResNetEncoder):
        return
    for k in range(max(depth, 1), 5):
        if hasattr(encoder, f"layer{k}"):
            delattr(encoder, f"layer{k}")


# Keys of the stages `drop_unused_stages` deletes, as checkpoints made before it still hold them.
_STAGE_KEY = re.compile(r"(^|\.)encoder\.layer[1-4]\.")


def load_weights(net: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a state_dict strictly, ignoring only weights of encoder stages the network no longer has."""
    own = net.state_dict()
    net.load_state_dict({k: v for k, v in state.items() if k in own or not _STAGE_KEY.search(k)})


def _conv_bn_relu(cin: int, cout: int) -> list[torch.nn.Module]:
    return [
        torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(cout),
        torch.nn.ReLU(inplace=True),
    ]


class FullResUnet(torch.nn.Module):
    """An smp U-Net whose last decoder stage also sees full-resolution features of the input.

    smp's U-Net has no skip at stride 1: its full-resolution output is upsampled from stride-2
    features. The labels here are a fixed contour level of a blurred image, so where a pixel centre
    lies against that contour is decided by full-resolution grey values; a small stride-1 branch
    (two 3x3 convolutions of `channels`) is fused with the decoder output before the classifier.

    `context` > 0 adds image-level conditioning: the deepest encoder features, pooled over the whole
    image (mean and max), go through a small MLP of `context` hidden units that scales and shifts the
    head's features before their ReLU. Blur, camera response and overlap absorption are shared by
    every edge of an image, so the whole image tells where on each edge the label outline lies better
    than a pixel's neighbourhood does. The last layer starts at zero, i.e. at the plain head.
    """

    def __init__(self, base: torch.nn.Module, channels: int, n_classes: int, context: int = 0) -> None:
        super().__init__()
        self.encoder = base.encoder
        self.decoder = base.decoder
        dec_out = base.segmentation_head[0].in_channels
        self.stem = torch.nn.Sequential(*_conv_bn_relu(1, channels), *_conv_bn_relu(channels, channels))
        self.head = torch.nn.Sequential(
            *_conv_bn_relu(dec_out + channels, channels), torch.nn.Conv2d(channels, n_classes, 1)
        )
        self.context = None
        if context:
            film = torch.nn.Linear(context, 2 * channels)
            torch.nn.init.zeros_(film.weight)
            torch.nn.init.zeros_(film.bias)
            deep = 2 * base.encoder.out_channels[-1]
            self.context = torch.nn.Sequential(
                torch.nn.Linear(deep, context), torch.nn.ReLU(inplace=True), film
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        h = torch.cat([self.decoder(feats), self.stem(x)], dim=1)
        if self.context is None:
            return self.head(h)
        deep = feats[-1]
        scale, shift = self.context(torch.cat([deep.mean((2, 3)), deep.amax((2, 3))], 1)).chunk(2, dim=1)
        h = self.head[1](self.head[0](h))  # conv + batch norm; then the image's scale and shift
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.head[3](self.head[2](h))


class MergeAB(torch.nn.Module):
    """A 4-class network (bg, A, B, overlap) used as a combined-label model (`train.ab_aux`).

    In training mode it returns the 4-class logits, for `losses.AuxABLoss`; in eval mode (validation,
    evaluation, export, serving) the 3-class logits with A and B merged (`losses.merge_ab_logits`),
    so everything downstream sees an ordinary combined-label model.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits4 = self.net(x)
        return logits4 if self.training else merge_ab_logits(logits4)


def input_multiple(cfg: TrainConfig) -> int:
    """Height and width must be divisible by this (2 ** encoder depth)."""
    return input_multiple_of(cfg)


@dataclass(frozen=True)
class ExecPlan:
    """How to run the network here: device, autocast dtype, memory format."""

    device: str
    amp_dtype: torch.dtype | None
    channels_last: bool
    cpu: str
    capability: str
    reason: str

    @property
    def precision(self) -> str:
        return "fp32" if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch.")

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device, enabled=False)
        return torch.autocast(self.device, dtype=self.amp_dtype)

    def describe(self) -> dict[str, str]:
        return {
            "device": self.device,
            "precision": self.precision,
            "channels_last": str(self.channels_last),
            "cpu_model": self.cpu,
            "cpu_capability": self.capability,
            "plan_reason": self.reason,
        }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_cpu_bf16() -> bool:
    """True where bf16 matmul/conv run natively (AMX or AVX512-BF16); elsewhere bf16 is emulated and slow."""
    flags = cpu_flags()
    # oneDNN can be capped below the hardware (ONEDNN_MAX_CPU_ISA=AVX2, used to emulate the AVX2-only
    # machines); then its bf16 kernels are emulated too, whatever /proc/cpuinfo says.
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and cap not in ("ALL", "DEFAULT") and not any(k in cap for k in ("BF16", "AMX", "AVX10")):
        return False
    return bool({"amx_bf16", "amx_tile"} <= flags or "avx512_bf16" in flags)


def exec_plan(precision: str = "auto", channels_last: str = "auto", device: str | None = None) -> ExecPlan:
    """Choose device, precision and memory format for this machine.

    `auto` picks bf16 autocast only on CPUs with native bf16 (measured ~2.5x train, ~5x inference on
    AMX); on AVX2-only CPUs bf16 is emulated and several times slower, so fp32 is kept there.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cap = torch.backends.cpu.get_cpu_capability() if device == "cpu" else torch.cuda.get_device_name()
    native = fast_cpu_bf16() if device == "cpu" else torch.cuda.is_bf16_supported()
    if precision == "auto":
        if device == "cuda":
            amp = torch.bfloat16 if native else torch.float16
            reason = "CUDA autocast"
        elif native:
            amp, reason = torch.bfloat16, "CPU has native bf16 (AMX/AVX512-BF16): bf16 autocast"
        else:
            amp, reason = None, "CPU lacks native bf16: fp32 (bf16 would be emulated and slower)"
    elif precision == "bf16":
        amp, reason = torch.bfloat16, "bf16 requested in params"
        if device == "cpu" and not native:
            log.warning("bf16 requested but this CPU has no native bf16; expect it to be much slower")
    elif precision == "fp32":
        amp, reason = None, "fp32 requested in params"
    else:
        raise ValueError(f"precision {precision!r} is not one of ['auto', 'fp32', 'bf16']")
    if channels_last == "auto":
        # channels_last pays off with bf16 (AMX/AVX512-BF16) and on GPUs; fp32 training on AVX2-only
        # CPUs measured no faster with it (0.91x), so plain NCHW there.
        cl = device == "cuda" or amp is not None
    else:
        cl = channels_last == "on"
    return ExecPlan(
        device=device, amp_dtype=amp, channels_last=cl, cpu=cpu_model(), capability=cap, reason=reason
    )


def set_threads(n: int = 0) -> int:
    """Use `n` intra-op threads (0: all cores this process may use)."""
    if n <= 0:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def prepare_module(model: torch.nn.Module, plan: ExecPlan) -> torch.nn.Module:
    model = model.to(plan.device)
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def to_input(x: torch.Tensor, plan: ExecPlan) -> torch.Tensor:
    x = x.to(plan.device, non_blocking=True)
    if plan.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
