"""Batched training augmentation on tensors (rotation, scale, shift, flips, light, blur, noise, JPEG).

Runs on the whole batch at once on the training device, so per-sample Python
work does not compete with the model step; the one exception is the JPEG re-encoding
of a quarter of the batch through Pillow (about a millisecond per 224 px image).
Inputs are float tensors in [0, 1].

The ranges span the drifts that ``defectcls.perturb`` scores a model under, in the same
units and with a margin: a gain for brightness, a factor around the image mean for
contrast, ``x ** g`` for gamma, blur sigma in pixels of a 300 px image (scaled to the
working size), JPEG quality, zoom and shift around the centre. Geometric changes fill
uncovered pixels with the image's own background (the median of its border), or, at the
shares ``fill_border_p``, ``fill_reflect_p`` and ``fill_const_p``, with the nearest border
pixel, the photo's mirror image, or a constant (black, white or grey): the network should
judge the part, not how a tool filled the corners of a turned photo.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import AugConfig

__all__ = ["AugConfig", "augment", "geometric", "photometric", "gaussian_blur", "paint_defects"]

# Where and how large a painted blotch is, as shares of the image side, on a photo framed as the casting folder's are
# (the part centred, its outer edge about 0.42 of the side from the centre, its dark inner ring inside about 0.26)
PAINT_RADIUS = (0.27, 0.41)   # distance of the blotch's centre from the image centre: the bright ring and its outer edge
PAINT_SIGMA = (0.006, 0.016)  # each lobe's Gaussian sigma: 1.2-3 px at 192 px, wider than a 1-3 px pin mark at 300 px
PAINT_DEPTH = (0.5, 0.85)     # share of the light taken away at the blotch's core


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g) * (hi - lo) + lo).to(device)


def border_median(x: torch.Tensor, frac: float = 0.02) -> torch.Tensor:
    """Per-image, per-channel median of the border ring (N, C, 1, 1): the background (as perturb.background)."""
    h, w = x.shape[-2:]
    r = max(1, round(min(h, w) * frac))
    ring = torch.cat([x[..., :r, :].flatten(2), x[..., -r:, :].flatten(2),
                      x[..., r:h - r, :r].flatten(2), x[..., r:h - r, w - r:].flatten(2)], dim=2)
    return ring.median(dim=2).values[..., None, None]


def geometric(x: torch.Tensor, cfg: AugConfig, g: torch.Generator, masks: torch.Tensor | None = None
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Random rotation/scale/shift/flip of a batch; uncovered pixels get the image's own background.

    With MASKS (N x 1 x H x W defect masks in [0, 1]) returns (images, masks) moved alike: a mask follows
    its image's mirror or edge fill, and is 0 where the image got a constant fill. The random draws are
    the same with or without masks.
    """
    n = x.shape[0]
    dev = x.device
    ang = _uniform(n, 0, 2 * math.pi, g, dev) if cfg.rotate else torch.zeros(n, device=dev)
    s = _uniform(n, 1 - cfg.scale, 1 + cfg.scale, g, dev) if cfg.scale else torch.ones(n, device=dev)
    fx = torch.where(_uniform(n, 0, 1, g, dev) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n, device=dev)
    fy = torch.where(_uniform(n, 0, 1, g, dev) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n, device=dev)
    tx = _uniform(n, -cfg.shift, cfg.shift, g, dev) * 2
    ty = _uniform(n, -cfg.shift, cfg.shift, g, dev) * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos * fx, -sin, tx], 1), torch.stack([sin * fx, cos, ty], 1)], 1)
    theta[:, :, 1] *= fy[:, None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # each image's fill: a constant (its border median, or black/white/grey at fill_const_p), its edge pixel
    # repeated (fill_border_p) or its mirror image (fill_reflect_p); the draws keep this order
    border = torch.zeros(n, dtype=torch.bool, device=dev)
    reflect = torch.zeros(n, dtype=torch.bool, device=dev)
    c = border_median(x)
    if cfg.fill_border_p:
        border = _uniform(n, 0, 1, g, dev) < cfg.fill_border_p
    if cfg.fill_reflect_p or cfg.fill_const_p:
        # the rest of the batch: mirror image or a constant, as absolute shares of the batch
        rest = max(1e-9, 1.0 - cfg.fill_border_p)
        u = _uniform(n, 0, 1, g, dev)
        reflect = ~border & (u < cfg.fill_reflect_p / rest)
        idx = (~border & ~reflect & (u < (cfg.fill_reflect_p + cfg.fill_const_p) / rest)).nonzero().flatten()
        if len(idx):
            kind = _uniform(len(idx), 0, 3, g, dev).floor()
            const = torch.where(kind == 0, 0.0, torch.where(kind == 1, 1.0, _uniform(len(idx), 0, 1, g, dev)))
            c[idx] = const.view(-1, 1, 1, 1).to(c.dtype)
    # sampling is linear: zero padding of (x - c), plus c, fills uncovered pixels with c; one pass over the
    # batch is cheaper than gathering the constant-filled images apart, so the others are sampled again
    out = F.grid_sample(x - c, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + c
    m = None if masks is None else F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    for pick, mode in ((border, "border"), (reflect, "reflection")):
        idx = pick.nonzero().flatten()
        if len(idx):
            out[idx] = F.grid_sample(x[idx], grid[idx], mode="bilinear", padding_mode=mode, align_corners=False)
            if m is not None:
                m[idx] = F.grid_sample(masks[idx], grid[idx], mode="bilinear", padding_mode=mode, align_corners=False)
    return out if m is None else (out, m)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with one sigma for the whole batch."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _bad_factor(n: int, cfg: AugConfig, labels: torch.Tensor | None, device) -> torch.Tensor:
    """Per-image strength factor of blur and JPEG: ``bad_degrade`` for bad parts, 1 otherwise."""
    f = torch.ones(n, device=device)
    if labels is not None and cfg.bad_degrade != 1.0:
        f[labels.to(device) == 1] = float(cfg.bad_degrade)
    return f


def photometric(x: torch.Tensor, cfg: AugConfig, g: torch.Generator,
                labels: torch.Tensor | None = None) -> torch.Tensor:
    """Random gain, contrast, gamma, blur and sensor noise, per image.

    With LABELS, blur reaches bad parts (label 1) at ``cfg.bad_degrade`` of its strength: a
    blurred pin-sized defect is spared, but every training photo blurred past that share
    is a good part, and the network can learn "blurred means good" (at 0.5, 16 of 564 bad real
    photos missed under blur 1.5 when trained on 1350 photos; at 0.75 and 1, 5). Noise reaches
    both classes alike for the same reason: when only good parts got the strongest noise the
    network learned "noisy means good" (7% of bad photos missed at sigma 8 of 255).
    """
    n = x.shape[0]
    dev = x.device
    if cfg.brightness:
        x = x * _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, g, dev).view(n, 1, 1, 1)
    if cfg.contrast:
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, g, dev).view(n, 1, 1, 1) + m
    x = x.clamp(0, 1)
    if cfg.gamma:
        lg = math.log1p(cfg.gamma)
        x = x.clamp_min(1e-6) ** torch.exp(_uniform(n, -lg, lg, g, dev)).view(n, 1, 1, 1)
    if cfg.blur_p and cfg.blur_sigma:
        idx = (_uniform(n, 0, 1, g, dev) < cfg.blur_p).nonzero().flatten()
        if len(idx):
            sigma = float(_uniform(1, 0.3, cfg.blur_sigma, g, "cpu")) * x.shape[-1] / 300.0
            x = x.clone()
            fac = _bad_factor(n, cfg, labels, dev)
            for f in fac[idx].unique().tolist():
                sub = idx[fac[idx] == f]
                x[sub] = gaussian_blur(x[sub], sigma * f)
    if cfg.noise:
        sig = _uniform(n, 0, cfg.noise, g, dev).view(n, 1, 1, 1)
        x = x + torch.randn(x.shape, generator=g).to(dev) * sig
    return x.clamp(0, 1)


def jpeg(x: torch.Tensor, cfg: AugConfig, g: torch.Generator, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Re-encode a random share of the batch as JPEG (quality uniform in [jpeg_quality, 95]), as a camera does.

    With LABELS, bad parts lose quality at ``cfg.bad_degrade`` of the rate (see photometric).
    """
    from PIL import Image

    n = x.shape[0]
    pick = (_uniform(n, 0, 1, g, "cpu") < cfg.jpeg_p).nonzero().flatten()
    quality = (95 - (95 - _uniform(n, cfg.jpeg_quality, 95, g, "cpu")) * _bad_factor(n, cfg, labels, "cpu"))
    quality = quality.round().int()
    if not len(pick):
        return x
    u8 = (x[pick.to(x.device)].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    dec = []
    for img, q in zip(u8, quality[pick].tolist(), strict=True):
        img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=q)
        d = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L" if img.ndim == 2 else "RGB"))
        dec.append(d[None] if d.ndim == 2 else d.transpose(2, 0, 1))
    out = x.clone()
    out[pick.to(x.device)] = torch.from_numpy(np.stack(dec)).to(x.device, x.dtype) / 255.0
    return out


def paint_defects(x: torch.Tensor, labels: torch.Tensor, share: float, g: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paint a dark blotch (three overlapping Gaussian lobes) on about SHARE of the good parts of a float [0, 1]
    batch, on the part's bright ring or across its outer edge (``PAINT_RADIUS``), and label them bad.

    A from-scratch network sees each of a few hundred real defects in many poses but few kinds of them; a rim chip
    unlike any it trained on can score among the good parts. Blotches on good parts show it more places a defect can
    be. They are larger than the pin marks the folder files both ways (``PAINT_SIGMA``), so they teach "dark and
    irregular", not "any dot". Returns (images, labels, painted) with ``painted`` the boolean mask of the parts
    changed; X and LABELS are not modified in place. Draws from G only when SHARE > 0.
    """
    painted = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    if share <= 0 or len(labels) == 0:
        return x, labels, painted
    n, _, h, w = x.shape
    dev = x.device
    painted = (labels == 0) & (_uniform(n, 0, 1, g, labels.device) < share)
    k = int(painted.sum())
    if k == 0:
        return x, labels, painted
    side = float(min(h, w))
    ang = _uniform(k, 0, 2 * math.pi, g, dev)
    rad = _uniform(k, *PAINT_RADIUS, g, dev) * side
    cx, cy = (w - 1) / 2 + rad * torch.cos(ang), (h - 1) / 2 + rad * torch.sin(ang)
    sigma = _uniform(k, *PAINT_SIGMA, g, dev) * side
    depth = _uniform(k, *PAINT_DEPTH, g, dev)
    yy = torch.arange(h, device=dev, dtype=x.dtype)[None, :, None]
    xx = torch.arange(w, device=dev, dtype=x.dtype)[None, None, :]
    blot = torch.zeros(k, h, w, device=dev, dtype=x.dtype)
    for _ in range(3):   # lobes up to one sigma off the centre, of 0.6-1 of its width: an irregular outline
        ox, oy = (_uniform(k, -1, 1, g, dev) * sigma, _uniform(k, -1, 1, g, dev) * sigma)
        s = sigma * _uniform(k, 0.6, 1.0, g, dev)
        d2 = (xx - (cx + ox)[:, None, None]) ** 2 + (yy - (cy + oy)[:, None, None]) ** 2
        blot = torch.maximum(blot, torch.exp(-d2 / (2 * s[:, None, None] ** 2)))
    out = x.clone()
    out[painted] = x[painted] * (1 - depth[:, None, None, None] * blot[:, None])
    return out, torch.where(painted, torch.ones_like(labels), labels), painted


def augment(x: torch.Tensor, cfg: AugConfig, g: torch.Generator, labels: torch.Tensor | None = None,
            masks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Full training augmentation of a float [0,1] batch: pose, then light and sensor, then compression.

    LABELS (0 good, 1 bad) let blur and JPEG spare the bad parts' defects (``cfg.bad_degrade`` below 1).
    With MASKS (defect masks, N x 1 x H x W) returns (images, masks), the masks moved with the pose.
    """
    if masks is not None:
        x, masks = geometric(x, cfg, g, masks)
    else:
        x = geometric(x, cfg, g)
    x = photometric(x, cfg, g, labels)
    x = jpeg(x, cfg, g, labels) if cfg.jpeg_p else x
    return x if masks is None else (x, masks)
