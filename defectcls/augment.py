"""Batched training augmentation on tensors (rotation, scale, shift, flips, light, blur, noise).

Runs on the whole batch at once on the training device, so per-sample Python
work does not compete with the model step. Inputs are float tensors in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugConfig:
    rotate: bool = True          # any angle: the part is round
    flip: bool = True            # horizontal and vertical
    scale: float = 0.12          # zoom in [1-scale, 1+scale]
    shift: float = 0.04          # translation, fraction of the image side
    brightness: float = 0.3      # gain in [1-b, 1+b]
    contrast: float = 0.35       # contrast factor in [1-c, 1+c]
    gamma: float = 0.3           # gamma in [1-g, 1+g]
    blur_p: float = 0.3          # share of the batch that gets a Gaussian blur
    blur_sigma: float = 1.2      # max blur sigma in pixels of the working size
    noise: float = 0.04          # max Gaussian noise sigma (of 1.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def none(cls) -> AugConfig:
        return cls(rotate=False, flip=False, scale=0, shift=0, brightness=0, contrast=0, gamma=0,
                   blur_p=0, blur_sigma=0, noise=0)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g) * (hi - lo) + lo).to(device)


def geometric(x: torch.Tensor, cfg: AugConfig, g: torch.Generator) -> torch.Tensor:
    """Random rotation/scale/shift/flip of a batch, filling with black like the photos' background."""
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
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


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


def photometric(x: torch.Tensor, cfg: AugConfig, g: torch.Generator) -> torch.Tensor:
    """Random gain, contrast, gamma, blur and sensor noise, per image."""
    n = x.shape[0]
    dev = x.device
    if cfg.brightness:
        x = x * _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, g, dev).view(n, 1, 1, 1)
    if cfg.contrast:
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, g, dev).view(n, 1, 1, 1) + m
    x = x.clamp(0, 1)
    if cfg.gamma:
        x = x.clamp_min(1e-6) ** _uniform(n, 1 - cfg.gamma, 1 + cfg.gamma, g, dev).view(n, 1, 1, 1)
    if cfg.blur_p and cfg.blur_sigma:
        pick = (_uniform(n, 0, 1, g, dev) < cfg.blur_p)
        if pick.any():
            sigma = float(_uniform(1, 0.3, cfg.blur_sigma, g, "cpu"))
            x = torch.where(pick.view(n, 1, 1, 1), gaussian_blur(x, sigma), x)
    if cfg.noise:
        sig = _uniform(n, 0, cfg.noise, g, dev).view(n, 1, 1, 1)
        x = x + torch.randn(x.shape, generator=g).to(dev) * sig
    return x.clamp(0, 1)


def augment(x: torch.Tensor, cfg: AugConfig, g: torch.Generator) -> torch.Tensor:
    """Full training augmentation of a float [0,1] batch."""
    return photometric(geometric(x, cfg, g), cfg, g)
