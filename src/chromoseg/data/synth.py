"""Synthetic overlapping chromosome pairs in Pommier's format, with exact labels by construction.

Each image holds two chromosomes, A and B, rendered from an analytic model fitted by eye and by
measurement to the real-dev images (`/work/shared/data/real-dev`): black background, DAPI grey about
70, a bright telomere spot at each chromatid tip, a rounded body (brighter on the axis) with two
sister chromatids and a centromere constriction, banding along the axis, intensities that nearly add
where the chromosomes overlap, optical blur and mild camera noise.

The label is geometric (inside the chromosome outline), so label 3 is exactly the pixels inside both
outlines. The outline is placed where the chromosome's own blurred image falls to `EDGE_LEVEL` of
the grey inside its edge (`edge_offset`), as an annotator draws it at the visible edge: the label is
then a function of what the image shows, not of hidden per-image shoulder widths, and a model can
learn the boundary to a fraction of a pixel. Slivers of at most 4 pixels where two outlines cross
are merged into their neighbours (`chromoseg.data.validate`), so that the set is clean.

Groups: `source_id` is the source group of the image. Each of `n_sources` groups is a pair of source
chromosomes (length, width, centromere, banding, telomeres) that appears in about
`n_images / n_sources` images in different poses, bends, crossings and staining, like Pommier's
pairs drawn from a few metaphases; splitting by group keeps every chromosome on one side.

Determinism: image `i` depends only on `(seed, i)` (`np.random.default_rng([seed, 0, i])`), so any
chunk reproduces the same bytes. Only IEEE-exact operations (+, -, *, /, sqrt, rint) touch pixel
arrays; transcendental functions are evaluated on scalars only, and the blur and noise run in exact
integer fixed point (1/4096 grey), so the output is byte-identical across CPUs (AVX2 vs AVX-512).
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from chromoseg.config import SynthConfig
from chromoseg.data.io import write_dataset
from chromoseg.data.validate import find_problems, majority_repair

log = logging.getLogger(__name__)

Q = 4096  # fixed-point scale: geometry and grey levels are quantised to 1/Q before any rounding
_N_KNOTS = 24  # banding knots along the chromosome axis
_KNOT_T = np.linspace(0.0, 1.0, _N_KNOTS)
_CHUNK = 512  # images per worker task
# Appearance constants tuned against real-dev with `chromoseg data report` (see report.py).
# The outline (label) is the contour where the chromosome's own noise-free image (blur and camera
# response included) falls to EDGE_LEVEL of the grey just inside its edge: where an annotator sees the edge
# (real-dev polygon boundaries sit at ~0.38 of the interior, `edge_fraction` in the data report).
# A fixed level makes the label a function of the image, not of hidden per-image parameters.
EDGE_LEVEL = 0.32
OVERLAP_LOSS_RANGE = (0.15, 0.45)  # overlap grey = a + b - loss * a * b / grey
SHOT_RANGE = (0.06, 0.2)  # shot noise std = factor * sqrt(grey)
BACKGROUND_NOISE_FRACTION = 0.08  # images with a mild background offset and noise
DOME_RANGE = (0.1, 0.4)  # rounded cross-section (Source.dome)
BAND_RANGE = (0.05, 0.16)  # banding amplitude (relative)
PAIR_GREY_RANGE = (0.78, 1.3)  # per-chromosome grey factor around the image's grey


@dataclass(frozen=True)
class Source:
    """One source chromosome: shape and banding shared by every image it appears in."""

    length: float  # centreline length, px at the 88 x 88 scale
    width: float  # label (outline) width, px
    centromere: float  # centromere position along the axis, 0..1
    constriction: float  # relative width loss at the centromere, 0..1
    groove: float  # depth of the dark line between the sister chromatids, 0..1
    telomere: float  # telomere spot brightness relative to the chromosome grey
    bands: tuple[float, ...]  # multiplicative banding profile at `_KNOT_T`
    tilt: float = 0.0  # linear brightness change from one end to the other (relative)
    dome: float = 0.0  # rounded cross-section: grey falls by this fraction from the axis to the outline


@dataclass(frozen=True)
class Pose:
    """One chromosome placed in an image: centre, axis direction, bend (v = bend * u**2)."""

    src: Source
    cx: float
    cy: float
    cos: float
    sin: float
    length: float
    width: float
    bend: float


def _q(x: float) -> float:
    """Quantise a scalar to 1/2**20 so that libm last-ulp differences never reach the pixels."""
    return round(x * 1048576.0) / 1048576.0


@lru_cache(maxsize=4096)
def make_source(seed: int, group: int, which: int, cfg: SynthConfig) -> Source:
    """Source chromosome `which` (0 or 1) of source group `group`; depends only on its arguments."""
    rng = np.random.default_rng([seed, 1, group, which])
    lo, hi = cfg.length_range
    wlo, whi = cfg.width_range
    # Smooth random banding: a random walk, smoothed, mapped to roughly 0.7 .. 1.2.
    walk = np.cumsum(rng.normal(0.0, 1.0, _N_KNOTS + 4))
    walk = np.convolve(walk, np.ones(5) / 5.0, mode="valid")
    walk = walk - walk.mean()
    span = max(float(np.abs(walk).max()), 1e-6)
    bands = 1.0 + rng.uniform(*BAND_RANGE) * walk / span
    bands = bands + rng.normal(0.0, 0.02, _N_KNOTS)
    return Source(
        length=_q(rng.uniform(lo, hi)),
        width=_q(rng.uniform(wlo, whi)),
        centromere=_q(rng.uniform(0.25, 0.5) if rng.random() < 0.5 else rng.uniform(0.5, 0.75)),
        constriction=_q(rng.uniform(0.05, 0.22)),
        groove=_q(rng.uniform(0.0, 0.06)),
        telomere=_q(rng.uniform(2.0, 4.4)),
        bands=tuple(_q(float(b)) for b in bands),
        tilt=_q(rng.uniform(-0.3, 0.3)),
        dome=_q(rng.uniform(*DOME_RANGE)),
    )


def _local(pose: Pose, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Fields of one chromosome, all (H, W): local axis coordinates u, v, distance d to the
    centreline, signed normal offset dv, axial position t in 0..1 and the outline radius r."""
    dx = X - pose.cx
    dy = Y - pose.cy
    u = pose.cos * dx + pose.sin * dy
    v = pose.cos * dy - pose.sin * dx
    h = pose.length / 2.0
    uc = np.clip(u, -h, h)
    c = pose.bend
    dv = (v - c * uc * uc) / np.sqrt(1.0 + 4.0 * c * c * uc * uc)
    du = u - uc
    d = np.sqrt(du * du + dv * dv)
    t = (uc + h) / pose.length
    return u, v, d, dv, t, _radius(pose, t)


def _radius(pose: Pose, t: np.ndarray) -> np.ndarray:
    """Outline half-width along the axis, (H, W): constant with a constriction at the centromere."""
    s = pose.src
    z = (t - s.centromere) * (pose.length / 4.0)  # constriction spans about +-4 px
    bump = np.maximum(0.0, 1.0 - z * z)
    return (pose.width / 2.0) * (1.0 - s.constriction * bump)


def _mask(pose: Pose, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Label mask of one chromosome, (H, W) bool."""
    return _mask_of(_local(pose, X, Y))


def _mask_of(fields: tuple[np.ndarray, ...]) -> np.ndarray:
    """Inside the outline; compares quantised fields so that ties are stable across machines."""
    d, r = fields[2], fields[5]
    return np.rint(d * Q) <= np.rint(r * Q)


def _psi(u: float) -> float:
    """Antiderivative of the standard normal CDF: u * Phi(u) + phi(u) (scalar)."""
    return u * 0.5 * (1.0 + math.erf(u / math.sqrt(2.0))) + math.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)


def edge_offset(level: float, soft: float, sigma: float, gamma: float) -> float:
    """Distance (px) from the centre of the soft shoulder out to the `level` contour of the image.

    A straight edge whose pre-blur profile falls linearly from 1 to 0 over `soft` px, blurred by a
    Gaussian of `sigma` px, has level L(x) = sigma/soft * [psi((soft/2 - x)/sigma) -
    psi((-soft/2 - x)/sigma)] at x px outside the shoulder centre; the camera response maps L to
    L**gamma. Solved by bisection on scalars, quantised, so it is the same on every CPU.
    """
    target = level ** (1.0 / gamma)
    lo, hi = -3.0 * (soft + sigma), 3.0 * (soft + sigma)
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        val = sigma / soft * (_psi((soft / 2 - mid) / sigma) - _psi((-soft / 2 - mid) / sigma))
        if val > target:
            lo = mid
        else:
            hi = mid
    return _q(0.5 * (lo + hi))


def _ink(pose: Pose, fields: tuple[np.ndarray, ...], grey: float, soft: float, offset: float) -> np.ndarray:
    """Pre-blur grey level of one chromosome in units of 1/Q, (H, W) int64."""
    s = pose.src
    u, v, d, dv, t, r = fields
    # Stained core inside the outline with a soft shoulder whose centre is `offset` px inside the
    # outline, so that the outline is the EDGE_LEVEL contour of the blurred image.
    core = r - offset
    prof = np.clip((core - d) / soft + 0.5, 0.0, 1.0)
    # A rounded body (thicker, so brighter, on the axis: real-dev centre/side grey ~1.02, up to ~1.09)
    # with a faint dark line between the sister chromatids.
    rho = np.minimum(d / np.maximum(r, 1.0), 1.0)
    prof = prof * (1.0 - s.dome * rho * rho)
    g = dv / (0.35 * np.maximum(r, 1.0))
    prof = prof * (1.0 - s.groove * np.maximum(0.0, 1.0 - g * g))
    band = np.interp(t, _KNOT_T, np.asarray(s.bands)) * (1.0 + s.tilt * (t - 0.5))
    val = grey * band * prof
    # Telomere spots at the two chromatid tips of each end (quadratic bumps, blurred later).
    h = pose.length / 2.0
    rw = pose.width / 2.0
    for end in (-1.0, 1.0):
        ue = end * (h + 0.25 * rw)
        ve = pose.bend * h * h
        for side in (-1.0, 1.0):
            du = u - ue
            dvv = v - (ve + side * 0.38 * rw)
            q2 = (du * du + dvv * dvv) / 1.3
            val = val + (grey * s.telomere) * np.maximum(0.0, 1.0 - q2)
    return np.rint(val * Q).astype(np.int64)


def _gauss_kernel(sigma: float) -> np.ndarray:
    """Integer Gaussian kernel summing exactly to Q (scalar libm calls only, then quantised)."""
    rad = max(1, math.ceil(3.0 * sigma))
    w = [math.exp(-(j * j) / (2.0 * sigma * sigma)) for j in range(-rad, rad + 1)]
    tot = sum(w)
    k = np.array([round(Q * x / tot) for x in w], dtype=np.int64)
    k[rad] += Q - int(k.sum())
    return k


def _blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W) int64 field in units of 1/Q; exact integer arithmetic."""
    k = _gauss_kernel(sigma).astype(np.float64)
    # Values stay below 2**53, so float64 sums of integers are exact in any order.
    f = ndi.correlate1d(field.astype(np.float64), k, axis=0, mode="constant")
    f = ndi.correlate1d(f, k, axis=1, mode="constant")
    return (f.astype(np.int64) + Q * Q // 2) // (Q * Q)


def _centreline(pose: Pose, n: int = 9) -> np.ndarray:
    """(n, 2) world points along the centreline."""
    u = np.linspace(-pose.length / 2.0, pose.length / 2.0, n)
    v = pose.bend * u * u
    return np.stack([pose.cx + pose.cos * u - pose.sin * v, pose.cy + pose.sin * u + pose.cos * v], 1)


def _place(src: Source, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Per-image jitter of one chromosome: (length, width, bend, 0)."""
    length = _q(src.length * rng.uniform(0.9, 1.1))
    width = _q(src.width * rng.uniform(0.94, 1.06))
    bend = _q(rng.normal(0.0, 0.5) / max(length, 1.0) * 0.25)
    return length, width, bend, 0.0


def _layout(
    sa: Source, sb: Source, rng: np.random.Generator, size: int, touching: bool, X: np.ndarray, Y: np.ndarray
) -> tuple[Pose, Pose]:
    """Pose both chromosomes: B crosses A (or only touches it) and the pair fits in the frame."""
    la, wa, ca, _ = _place(sa, rng)
    lb, wb, cb, _ = _place(sb, rng)
    theta = rng.uniform(0.0, math.pi)
    delta = rng.uniform(math.radians(8), math.radians(90)) * (1 if rng.random() < 0.5 else -1)
    ta = rng.uniform(0.12, 0.88)
    tb = rng.uniform(0.05, 0.95)
    side = 1.0 if rng.random() < 0.5 else -1.0
    gap_extra = rng.uniform(-0.5, 1.5)
    jx, jy = rng.uniform(-1.0, 1.0, 2)
    ka = (_q(math.cos(theta)), _q(math.sin(theta)))
    kb = (_q(math.cos(theta + delta)), _q(math.sin(theta + delta)))
    margin = 2.0
    fit = 1.0
    for _ in range(6):
        a_len, b_len = _q(la * fit), _q(lb * fit)
        ua = (ta - 0.5) * a_len
        pa = (ka[0] * ua - ka[1] * ca * ua * ua, ka[1] * ua + ka[0] * ca * ua * ua)
        ub = (tb - 0.5) * b_len
        pb = (kb[0] * ub - kb[1] * cb * ub * ub, kb[1] * ub + kb[0] * cb * ub * ub)
        A = Pose(sa, 0.0, 0.0, ka[0], ka[1], a_len, wa, ca)
        bx, by = pa[0] - pb[0], pa[1] - pb[1]
        B = Pose(sb, bx, by, kb[0], kb[1], b_len, wb, cb)
        if touching:
            # Slide B along its normal until the outlines clear, then by a small random gap.
            nx, ny = -kb[1] * side, kb[0] * side
            ptsa = _centreline(A, 41)
            need = (wa + wb) / 2.0
            step = 0.0
            for _ in range(400):
                B = Pose(sb, bx + step * nx, by + step * ny, kb[0], kb[1], b_len, wb, cb)
                diff = ptsa[:, None, :] - _centreline(B, 41)[None, :, :]
                gap = math.sqrt(float((diff * diff).sum(-1).min()))
                if gap >= need:
                    break
                # A shift of s changes the distance by at most s, so this never jumps past the
                # first clear position (up to the 1/4 px resolution).
                step = _q(step + max(need - gap, 0.25))
            step = max(0.0, step - 1.0 + gap_extra)
            for _ in range(20):
                B = Pose(sb, bx + step * nx, by + step * ny, kb[0], kb[1], b_len, wb, cb)
                if not (_mask(A, X - size / 2, Y - size / 2) & _mask(B, X - size / 2, Y - size / 2)).any():
                    break
                step += 0.5
        pts = np.concatenate([_centreline(A), _centreline(B)])
        rad = max(wa, wb) / 2.0
        lo = pts.min(0) - rad
        hi = pts.max(0) + rad
        extent = float((hi - lo).max())
        room = size - 2 * margin
        if extent <= room:
            break
        fit *= room / extent * 0.98
    centre = (lo + hi) / 2.0
    slack = np.maximum(room - (hi - lo), 0.0) / 2.0
    ox = _q(size / 2.0 - float(centre[0]) + jx * float(slack[0]))
    oy = _q(size / 2.0 - float(centre[1]) + jy * float(slack[1]))
    A = Pose(sa, ox + A.cx, oy + A.cy, A.cos, A.sin, A.length, A.width, A.bend)
    B = Pose(sb, ox + B.cx, oy + B.cy, B.cos, B.sin, B.length, B.width, B.bend)
    return A, B


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, two (size, size) float64 arrays (x = column, y = row)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return x, y


def render(cfg: SynthConfig, i: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Image `i` of the dataset: (H, W) uint8 grey, (H, W) uint8 label 0..3, source group id."""
    size = cfg.size
    X, Y = _grid(size)
    rng = np.random.default_rng([cfg.seed, 0, i])
    group = int(rng.integers(cfg.n_sources))
    which = int(rng.integers(2))
    sa = make_source(cfg.seed, group, which, cfg)
    sb = make_source(cfg.seed, group, 1 - which, cfg)
    touching = bool(rng.random() < cfg.touching_fraction)
    A, B = _layout(sa, sb, rng, size, touching, X, Y)

    flds_a, flds_b = _local(A, X, Y), _local(B, X, Y)
    ma, mb = _mask_of(flds_a), _mask_of(flds_b)
    label = ma.astype(np.uint8) + 2 * mb.astype(np.uint8)

    grey = _q(rng.uniform(*cfg.intensity_range))
    soft = _q(rng.uniform(0.8, 1.6))
    sigma = _q(rng.uniform(*cfg.blur_range))
    gamma = _q(rng.uniform(0.85, 1.15))
    core = edge_offset(EDGE_LEVEL, soft, sigma, gamma)
    # The two chromosomes of a pair can differ in brightness by up to ~1.7x (as in real-dev), so
    # a model cannot call "overlap" from brightness alone.
    fa = _ink(A, flds_a, _q(grey * rng.uniform(*PAIR_GREY_RANGE)), soft, core)
    fb = _ink(B, flds_b, _q(grey * rng.uniform(*PAIR_GREY_RANGE)), soft, core)
    # Overlaps are a little less than additive (absorption, camera response): ratio about 1.7.
    loss = round(rng.uniform(*OVERLAP_LOSS_RANGE) * Q)
    # A smooth (bilinear) loss term: across B's edge on A's plateau the added grey is B's own profile
    # times a constant, so the overlap outline sits at the same relative level as any other edge.
    gq = max(round(grey * Q), 1)
    field = fa + fb - ((fa * fb + gq // 2) // gq * loss + Q // 2) // Q
    blurred = _blur(field, sigma)  # units 1/Q

    # Camera noise: shot noise that scales with sqrt(signal), plus mild background noise/offset
    # in a minority of images (real-dev backgrounds are clean, about 0).
    noise_sd = _q(rng.uniform(*cfg.noise_range))
    sig = np.maximum(blurred, 0).astype(np.float64) / float(Q)
    shot = np.sqrt(sig) * _q(rng.uniform(*SHOT_RANGE))
    noise = rng.standard_normal((size, size)) * shot
    if rng.random() < BACKGROUND_NOISE_FRACTION:
        noise = noise + rng.standard_normal((size, size)) * noise_sd + _q(rng.uniform(0.0, 1.0))
    total = blurred + np.rint(noise * Q).astype(np.int64)
    img = np.clip((total + Q // 2) // Q, 0, 255)

    lut = np.array([round(255.0 * (k / 255.0) ** gamma) for k in range(256)], dtype=np.uint8)
    return lut[img.astype(np.uint8)], label, group


def _generate_range(cfg: SynthConfig, start: int, stop: int) -> tuple[np.ndarray, ...]:
    n = stop - start
    images = np.zeros((n, cfg.size, cfg.size), np.uint8)
    labels = np.zeros((n, cfg.size, cfg.size), np.uint8)
    groups = np.zeros(n, np.int32)
    for k in range(n):
        images[k], labels[k], groups[k] = render(cfg, start + k)
    # Pixel-sized slivers where outlines cross (<= 4 px, or a pixel unlike all its neighbours) are
    # merged into their neighbours, so the default set passes `check_labels` with nothing to fix.
    problems = find_problems(labels)
    bad = problems["speck"] | problems["isolated"]
    idx = np.flatnonzero(bad.any(axis=(1, 2)))
    if idx.size:
        labels[idx] = majority_repair(labels[idx], bad[idx])
    return images, labels, groups


def generate(
    cfg: SynthConfig, n: int | None = None, start: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images `start .. start+n-1`: (N, H, W) uint8 grey, (N, H, W) uint8 labels, (N,) int32 group."""
    n = cfg.n_images if n is None else n
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}; pass the number of images to generate")
    if cfg.n_sources < 1:
        raise ValueError(f"synth.n_sources must be >= 1, got {cfg.n_sources}")
    if cfg.size < 32:
        raise ValueError(f"synth.size must be >= 32 pixels, got {cfg.size}")
    workers = max(1, min(cfg.workers, os.cpu_count() or 1))
    if workers == 1 or n < 2 * _CHUNK:
        return _generate_range(cfg, start, start + n)
    bounds = [(s, min(s + _CHUNK, start + n)) for s in range(start, start + n, _CHUNK)]
    with ProcessPoolExecutor(max_workers=workers) as ex:
        parts = list(ex.map(_generate_range, [cfg] * len(bounds), *zip(*bounds, strict=True)))
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]


def synthesize_to_file(cfg: SynthConfig, out: Path | None = None, n: int | None = None) -> Path:
    """Generate the dataset and write it atomically in Pommier's format (`dataset_1`, `source_id`)."""
    path = Path(out) if out is not None else Path(cfg.out)
    t0 = time.perf_counter()
    images, labels, groups = generate(cfg, n)
    write_dataset(path, images, labels, source_ids=groups)
    log.info(
        "wrote %d synthetic images %s to %s in %.1f s",
        len(images),
        images.shape[1:],
        path,
        time.perf_counter() - t0,
    )
    return path
