"""How exactly can the synthetic label outline be told from the image? An estimate of the best dice.

The default dataset's label is geometric (`chromoseg.data.synth`): a pixel belongs to a chromosome
when its centre lies inside the outline. The outline sits at a fixed level of the blurred image only
for a straight edge with a flat plateau; the rounded body (`dome`), the shoulder softness, the blur
and the camera response vary per image and per chromosome, and shot noise is added. So from the grey
values alone the outline can be placed only to within some fraction of a pixel, and every pixel
centre that falls in that band is a coin toss for any model.

This script measures that band in 1-D: cross-sections through an edge are rendered exactly like
`synth.render` does (point-sampled profile, the same integer Gaussian kernel, shot noise, uint8,
camera response, per-image normalisation), and a 3-layer MLP trained on 150,000 of them regresses the
outline position. Its mean absolute error, in px, is the expected number of wrong pixel centres per
pixel of outline (pixel centres are 1 px apart along the normal). Two edges:

- `fg/bg`: the outline of a chromosome against the background;
- `overlap`: the outline of chromosome B where it lies on chromosome A (the overlap boundary).

Each with and without the hidden rendering parameters given to the regressor as extra inputs
(`known`): a 2-D model that infers them from the whole image sits between the two rows.

    python scripts/label_ceiling.py            # both edges, one after the other (~15 min)
    python scripts/label_ceiling.py overlap    # one edge (run fg/bg and overlap side by side on 2 cores)

It is an estimate, not a bound: a better regressor could do a little better, and corners, tips and
curvature (not modelled) make the 2-D problem harder.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from chromoseg.data.synth import EDGE_LEVEL, Q, _gauss_kernel, edge_offset

W = 40  # window, px
N_TRAIN, N_TEST, STEPS = 150_000, 5_000, 30_000


def _profile(d: np.ndarray, r: float, off: float, soft: float, dome: float) -> np.ndarray:
    """Pre-blur profile of `synth._ink` across a straight chromosome (no banding, no telomeres)."""
    p = np.clip((r - off - d) / soft + 0.5, 0.0, 1.0)
    rho = np.minimum(d / r, 1.0)
    return p * (1.0 - dome * rho * rho)


def _camera(field: np.ndarray, sigma: float, gamma: float, shot: float, rng) -> np.ndarray:
    """Blur, shot noise, uint8 and camera response as in `synth.render`, then 'single' normalisation."""
    k = _gauss_kernel(sigma).astype(np.float64) / Q
    blurred = np.convolve(field, k, mode="same")
    noisy = blurred + rng.standard_normal(W) * np.sqrt(np.maximum(blurred, 0.0)) * shot
    lut = np.array([round(255.0 * (v / 255.0) ** gamma) for v in range(256)], dtype=np.float64)
    img = lut[np.clip(np.rint(noisy), 0, 255).astype(int)]
    fg = img[img > 0.25 * img.max()]
    return img / max(float(np.percentile(fg, 30)), 1e-3) * 0.5


def sample(edge: str, n: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n cross-sections: (n, W) grey, (n, k) hidden parameters, (n,) outline position (px)."""
    x = np.arange(W, dtype=np.float64)
    grey_out, hidden, target = np.zeros((n, W)), [], np.zeros(n)
    for i in range(n):
        soft, sigma, gamma = rng.uniform(0.8, 1.6), rng.uniform(1.1, 1.7), rng.uniform(0.85, 1.15)
        off = edge_offset(EDGE_LEVEL, soft, sigma, gamma)
        grey = rng.uniform(60, 110)
        shot = rng.uniform(0.06, 0.2)
        rb = rng.uniform(10.3, 14.3) * rng.uniform(0.94, 1.06) / 2
        dome_b = rng.uniform(0.1, 0.4)
        gb = grey * rng.uniform(0.78, 1.3) * rng.uniform(0.85, 1.15)  # pair factor, banding
        cb = W / 2 + rng.uniform(-0.5, 0.5)
        fb = gb * _profile(np.abs(x - cb), rb, off, soft, dome_b)
        params = [soft, sigma, gamma, dome_b, shot]
        if edge == "fg/bg":
            field = fb
        else:
            # A underneath, crossed at an angle: along B's normal, A's distance from its own axis
            # changes at cos(angle); B's edge stays on A's body.
            ra = rng.uniform(10.3, 14.3) / 2
            dome_a = rng.uniform(0.1, 0.4)
            ga = grey * rng.uniform(0.78, 1.3)
            cos = math.cos(rng.uniform(math.radians(8), math.radians(90)))
            da = np.minimum(np.abs(x - (cb + rng.uniform(-3, 3))) * cos, 0.95 * ra)
            fa = ga * _profile(da, ra, off, soft, dome_a)
            loss = rng.uniform(0.15, 0.45)
            field = fa + fb - loss * fa * fb / grey
            params += [dome_a, loss, ga / gb, cos]
        grey_out[i] = _camera(field, sigma, gamma, shot, rng)
        hidden.append(params)
        target[i] = cb + rb - W / 2
    return grey_out.astype(np.float32), np.asarray(hidden, np.float32), target.astype(np.float32)


def fit(x: np.ndarray, y: np.ndarray, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    d = x.shape[1]
    net = torch.nn.Sequential(
        torch.nn.Linear(d, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 1),
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)[:, None]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        idx = torch.randint(0, len(xt), (256,), generator=gen)
        loss = torch.nn.functional.smooth_l1_loss(net(xt[idx]), yt[idx], beta=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net


EDGES = ("fg/bg", "overlap")


def main(argv: list[str]) -> int:
    edges = argv or list(EDGES)
    if not set(edges) <= set(EDGES):
        print(f"edges must be among {list(EDGES)}, got {edges}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    print("edge      parameters  mean |outline error| px (= wrong px per px of outline)")
    for edge in edges:
        k = EDGES.index(edge)
        rng = np.random.default_rng(k)
        xtr, htr, ytr = sample(edge, N_TRAIN, rng)
        xte, hte, yte = sample(edge, N_TEST, rng)
        for known in (False, True):
            a, b = (np.hstack([xtr, htr]), np.hstack([xte, hte])) if known else (xtr, xte)
            net = fit(a, ytr, seed=k)
            with torch.no_grad():
                err = np.abs(net(torch.from_numpy(b))[:, 0].numpy() - yte)
            print(f"{edge:9} {'known' if known else 'hidden':11} {err.mean():.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
