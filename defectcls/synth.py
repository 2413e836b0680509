"""Procedural generator of good/bad inspection photos of a round embossed emblem.

Every image is a pure function of one integer seed (see :func:`image_seed`): the
seed drives :class:`PartSpec` (pose, lighting, finish, noise, colour cast) and,
for bad parts, the defect list.  The part itself is rendered from a height map
(outer ring, base disc, car-logo-like elliptical rings) shaded with Lambert
diffuse + Blinn-Phong specular light, all vectorised in float32 numpy.

For a given seed, ``render_part(seed, bad=True)`` is the ``bad=False`` image
with defects painted on it: the defects use random draws made after all the
draws of the good image, so outside the defect mask both renders agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DefectclsError

__all__ = ["PartSpec", "render_part", "image_seed", "generate"]

BASE_RADIUS_FRAC = 0.40  # outer radius of the part / image size at scale 1
SUBTLE_THRESHOLD = 0.7  # severity above this counts as "subtle"
SUBTLE_IMAGE_PROB = 0.20  # share of bad images whose defects are all subtle
CAST_PROB = 0.30  # share of images (both classes) with a reddish background cast
DEFECT_KINDS = ("blotch", "corruption", "scratch")

# Emblem geometry in part-radius units, in the part's own (rotated) frame.
_RING_IN = 0.84  # inner radius of the raised outer ring
_BASE_H = 0.45  # height of the base disc (outer ring top is 1.0)
_EMB_H = 0.95  # height of the tops of the inner elliptical rings
# (centre x, centre y, semi-axis a, semi-axis b) of the inner elliptical rings
_ELLIPSES = (
    (0.0, 0.04, 0.66, 0.40),  # wide horizontal ring
    (0.0, 0.10, 0.27, 0.60),  # tall vertical ring
    (0.0, -0.20, 0.36, 0.15),  # small inner ellipse
)


@dataclass(frozen=True)
class PartSpec:
    """Everything random about one image apart from defects, derived from a seed."""

    size: int
    rotation: float  # degrees, applied to the emblem geometry
    offset: tuple[float, float]  # (dx, dy) of the part centre from the image centre, px
    scale: float  # radius = scale * BASE_RADIUS_FRAC * size
    light: tuple[float, float, float]  # unit vector towards the light (x right, y down, z up)
    shininess: float  # Blinn-Phong exponent
    specular: float  # specular strength
    gain: float  # global lighting gain
    albedo_raised: float  # albedo of the polished raised parts
    albedo_base: float  # albedo of the grained base disc
    ring_width: float  # half width of the inner rings, part-radius units
    texture_amp: float  # brushed-texture amplitude
    noise_sigma: float  # gaussian sensor noise, 0..255 units
    background: float  # background level, 0..255 units
    color_cast: bool
    cast: tuple[float, float, float]  # RGB offset added to the background
    texture_seed: int  # seed of the textures and the sensor noise

    @property
    def radius(self) -> float:
        """Outer radius of the part in pixels."""
        return self.scale * BASE_RADIUS_FRAC * self.size

    @property
    def center(self) -> tuple[float, float]:
        """Part centre (x, y) in pixel coordinates (pixel centres at integers)."""
        c = (self.size - 1) / 2.0
        return (c + self.offset[0], c + self.offset[1])

    @classmethod
    def sample(cls, rng: np.random.Generator, size: int) -> PartSpec:
        """Draw a spec from ``rng`` (the draw order is part of the determinism contract)."""
        rotation = float(rng.uniform(0.0, 360.0))
        off = rng.uniform(-0.03, 0.03, size=2) * size
        scale = float(rng.uniform(0.92, 1.08))
        az = rng.uniform(math.radians(200), math.radians(250))  # from upper left
        el = rng.uniform(math.radians(40), math.radians(55))
        light = (
            float(math.cos(el) * math.cos(az)),
            float(math.cos(el) * math.sin(az)),
            float(math.sin(el)),
        )
        shininess = float(rng.uniform(40.0, 90.0))
        specular = float(rng.uniform(0.4, 0.7))
        gain = float(rng.uniform(0.9, 1.1))
        albedo_raised = float(rng.uniform(0.62, 0.72))
        albedo_base = float(rng.uniform(0.34, 0.44))
        ring_width = float(rng.uniform(0.040, 0.048))
        texture_amp = float(rng.uniform(0.02, 0.045))
        noise_sigma = float(rng.uniform(1.0, 3.0))
        background = float(rng.uniform(2.0, 9.0))
        color_cast = bool(rng.random() < CAST_PROB)
        cr, cg, cb = rng.uniform((10.0, 2.0, 0.0), (20.0, 5.0, 0.6))
        cb = cb * cg  # B in 0..3 and never above G: always reddish
        cast = (float(cr), float(cg), float(cb)) if color_cast else (0.0, 0.0, 0.0)
        texture_seed = int(rng.integers(0, 2**63 - 1))
        return cls(
            size=int(size),
            rotation=rotation,
            offset=(float(off[0]), float(off[1])),
            scale=scale,
            light=light,
            shininess=shininess,
            specular=specular,
            gain=gain,
            albedo_raised=albedo_raised,
            albedo_base=albedo_base,
            ring_width=ring_width,
            texture_amp=texture_amp,
            noise_sigma=noise_sigma,
            background=background,
            color_cast=color_cast,
            cast=cast,
            texture_seed=texture_seed,
        )


# --------------------------------------------------------------------------- helpers


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _lowfreq(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth noise ~N(0,1)-ish of ``shape`` from a ``cells`` x ``cells`` grid, bicubic."""
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    im = Image.fromarray(g).resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.float32)


def _ellipse_ring(u: np.ndarray, v: np.ndarray, e: tuple[float, float, float, float], half_w: float, bevel: float) -> np.ndarray:
    """Bevelled ring profile (0..1) along an ellipse, via first-order distance."""
    cx, cy, a, b = e
    x = (u - cx) * (1.0 / a)
    y = (v - cy) * (1.0 / b)
    q = np.sqrt(x * x + y * y) + 1e-6
    # |grad q| = sqrt((x/a)^2 + (y/b)^2) / q ; distance ~ (q - 1) / |grad q|
    gx = x * (1.0 / a)
    gy = y * (1.0 / b)
    grad = np.sqrt(gx * gx + gy * gy) / q + 1e-6
    d = np.abs(q - 1.0) / grad
    return _smoothstep((half_w + bevel - d) * (1.0 / bevel))


def _render_base(spec: PartSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the defect-free part: (gray float32 image in 0..255, coverage alpha, rho).

    ``rho`` is the distance from the part centre in part-radius units.  The shading
    is only computed in the part's bounding window.
    """
    n = spec.size
    R = spec.radius
    cx, cy = spec.center
    trng = np.random.default_rng(spec.texture_seed)

    xs = ((np.arange(n, dtype=np.float32) - cx) / R).reshape(1, n)
    ys = ((np.arange(n, dtype=np.float32) - cy) / R).reshape(n, 1)
    rho = np.sqrt(xs * xs + ys * ys)
    alpha = np.clip((1.0 - rho) * R + 0.5, 0.0, 1.0)  # anti-aliased coverage of the disc

    # Background: dark, slightly uneven.
    blotchy = _lowfreq(trng, (n, n), 6)
    img = spec.background + 2.0 * blotchy

    # Window of the part (plus a margin for the gradient).
    ext = R + 3
    ya, yb = max(int(cy - ext), 0), min(int(cy + ext) + 2, n)
    xa, xb = max(int(cx - ext), 0), min(int(cx + ext) + 2, n)
    win = (slice(ya, yb), slice(xa, xb))
    rw = rho[win]

    bevel_o = 0.035
    # Outer ring: rises from the base disc at _RING_IN, falls at the rim.
    ring_o = _smoothstep((rw - (_RING_IN - bevel_o)) * (1.0 / bevel_o))
    rim = _smoothstep((1.0 - rw) * (1.0 / 0.03))
    h = _BASE_H + (1.0 - _BASE_H) * ring_o
    # Inner elliptical rings in the rotated frame of the emblem.
    th = math.radians(spec.rotation)
    c, s = math.cos(th), math.sin(th)
    xw, yw = xs[:, xa:xb], ys[ya:yb, :]
    uw, vw = c * xw + s * yw, -s * xw + c * yw
    inner = _ellipse_ring(uw, vw, _ELLIPSES[0], spec.ring_width, 0.028)
    for e in _ELLIPSES[1:]:
        np.maximum(inner, _ellipse_ring(uw, vw, e, spec.ring_width, 0.028), out=inner)
    h = np.maximum(h, _BASE_H + (_EMB_H - _BASE_H) * inner)
    h *= 0.6 + 0.4 * rim  # rounded rim edge
    raised = np.maximum(ring_o, inner)

    # Normals from the height map (height in pixels), central differences.
    hpix = h * np.float32(0.035 * R * 0.5)
    gx = np.zeros_like(hpix)
    gy = np.zeros_like(hpix)
    gx[:, 1:-1] = hpix[:, 2:] - hpix[:, :-2]
    gy[1:-1, :] = hpix[2:, :] - hpix[:-2, :]
    inv = 1.0 / np.sqrt(gx * gx + gy * gy + 1.0)
    lx, ly, lz = spec.light
    # n = (-gx, -gy, 1) * inv
    diffuse = np.maximum((lz - gx * lx - gy * ly) * inv, 0.0)
    hx, hy, hz = lx, ly, lz + 1.0
    hn = 1.0 / math.sqrt(hx * hx + hy * hy + hz * hz)
    ndh = np.maximum((hz - gx * hx - gy * hy) * (inv * hn), 1e-6)
    spec_term = np.exp(spec.shininess * np.log(ndh))

    # Finish: lathe-turned concentric marks on raised parts, uneven reflectance.
    nb = int(R * 1.05) + 4
    marks = np.convolve(trng.standard_normal(nb), np.full(3, 1.0 / math.sqrt(3.0)), mode="same")
    lathe = np.interp(rw * R, np.arange(nb), marks).astype(np.float32)
    albedo = spec.albedo_base + (spec.albedo_raised - spec.albedo_base) * raised
    albedo *= 1.0 + spec.texture_amp * lathe * raised + 0.03 * blotchy[win]
    gloss = 0.35 + 0.65 * raised  # the sand-blasted base disc is less glossy

    # Spot-light falloff: brighter towards the light, darker on the far side.
    spot = 1.0 + 0.12 * (xw * lx + yw * ly) - 0.10 * rw * rw
    lit = (0.06 + albedo * (1.25 * diffuse) + spec.specular * gloss * spec_term) * spot
    part = (255.0 * spec.gain) * lit
    aw = alpha[win]
    img[win] = aw * part + (1.0 - aw) * img[win]
    return img, alpha, rho


def _draw_severities(rng: np.random.Generator, subtle_share: float = SUBTLE_IMAGE_PROB) -> list[float]:
    n_def = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    if rng.random() < subtle_share:
        return [float(rng.uniform(SUBTLE_THRESHOLD + 1e-3, 1.0)) for _ in range(n_def)]
    return [float(rng.uniform(0.0, SUBTLE_THRESHOLD)) for _ in range(n_def)]


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _point_on_part(rng: np.random.Generator, spec: PartSpec, max_r: float) -> tuple[float, float]:
    """Uniform random pixel position within ``max_r`` part radii of the centre."""
    r = max_r * math.sqrt(rng.random())
    a = rng.uniform(0, 2 * math.pi)
    cx, cy = spec.center
    return cx + r * spec.radius * math.cos(a), cy + r * spec.radius * math.sin(a)


def _window(x0: float, y0: float, x1: float, y1: float, n: int) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    xa, xb = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)) + 1, n)
    ya, yb = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)) + 1, n)
    xs = np.arange(xa, xb, dtype=np.float32).reshape(1, -1)
    ys = np.arange(ya, yb, dtype=np.float32).reshape(-1, 1)
    return slice(ya, yb), slice(xa, xb), xs, ys


def _blotch(img: np.ndarray, rng: np.random.Generator, spec: PartSpec, sev: float) -> tuple[np.ndarray, dict]:
    D = 2.0 * spec.radius
    diam = max(_lerp(0.16, 0.04, sev) * D * float(rng.uniform(0.9, 1.1)), 3.0)
    rb = diam / 2.0
    factor = _lerp(0.15, 0.65, sev) + float(rng.uniform(-0.03, 0.03))
    bx, by = _point_on_part(rng, spec, 0.93 - 1.35 * rb / spec.radius)
    k = [2, 3, 4, 5]
    amps = [float(a) / (kk - 1) ** 0.5 for a, kk in zip(rng.uniform(0.0, 0.10, size=4), k, strict=True)]
    phases = [float(p) for p in rng.uniform(0, 2 * math.pi, size=4)]
    soft = 0.3 * rb + 0.5
    ext = rb * 1.35 + soft
    ys_, xs_, xs, ys = _window(bx - ext, by - ext, bx + ext, by + ext, spec.size)
    dx, dy = xs - bx, ys - by
    dist = np.sqrt(dx * dx + dy * dy)
    ang = np.arctan2(dy, dx)
    rad = np.full_like(dist, rb)
    for kk, am, ph in zip(k, amps, phases, strict=True):
        rad = rad + rb * am * np.cos(kk * ang + ph)
    a = _smoothstep((rad - dist) / soft + 0.5)
    img[ys_, xs_] *= 1.0 - a * (1.0 - factor)
    m = np.zeros(img.shape, bool)
    m[ys_, xs_] = a >= 0.5
    return m, {"kind": "blotch", "severity": sev, "variant": "dark", "factor": float(factor)}


def _corruption(img: np.ndarray, rng: np.random.Generator, spec: PartSpec, sev: float) -> tuple[np.ndarray, dict]:
    n = spec.size
    D = 2.0 * spec.radius
    side = max(_lerp(0.15, 0.04, sev) * D, 3.0)
    w = max(side * rng.uniform(0.7, 1.4), 3.0)
    h = max(side * side / w, 3.0)
    shape = "rect" if rng.random() < 0.55 else "irregular"
    fill = str(rng.choice(["black", "blocks", "shift"]))
    half = 0.5 * math.hypot(w, h)
    px, py = _point_on_part(rng, spec, 0.93 - half / spec.radius)
    ys_, xs_, xs, ys = _window(px - w / 2 - 1, py - h / 2 - 1, px + w / 2 + 1, py + h / 2 + 1, n)
    if shape == "rect":
        reg = (np.abs(xs - px) <= w / 2) & (np.abs(ys - py) <= h / 2)
    else:
        reg = np.zeros((ys.shape[0], xs.shape[1]), bool)
        for _ in range(int(rng.integers(2, 5))):
            cw, ch = w * rng.uniform(0.35, 0.7), h * rng.uniform(0.35, 0.7)
            ox = rng.uniform(-(w - cw) / 2, (w - cw) / 2)
            oy = rng.uniform(-(h - ch) / 2, (h - ch) / 2)
            reg |= (np.abs(xs - px - ox) <= cw / 2) & (np.abs(ys - py - oy) <= ch / 2)
    sub = img[ys_, xs_]
    hh, ww = sub.shape
    blk = max(2, int(round(rng.uniform(4, 12) * n / 1024)))
    if fill == "black":
        new = np.full(sub.shape, rng.uniform(0.0, 10.0), np.float32)
    elif fill == "blocks":
        g = rng.uniform(0, 255, size=(hh // blk + 1, ww // blk + 1)).astype(np.float32)
        new = np.repeat(np.repeat(g, blk, 0), blk, 1)[:hh, :ww]
    else:  # pixels shifted from elsewhere on the part, with glitchy band gains
        ang = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(0.25, 0.5) * spec.radius
        sx, sy = int(round(dist * math.cos(ang))), int(round(dist * math.sin(ang)))
        yy = np.clip(np.arange(ys_.start, ys_.stop) + sy, 0, n - 1)
        xx = np.clip(np.arange(xs_.start, xs_.stop) + sx, 0, n - 1)
        new = img[np.ix_(yy, xx)].copy()
        gains = np.where(
            rng.random(hh // blk + 1) < 0.5,
            rng.uniform(0.25, 0.55, hh // blk + 1),
            rng.uniform(1.6, 2.2, hh // blk + 1),
        ).astype(np.float32)
        new *= np.repeat(gains, blk)[:hh, None]
        new = np.minimum(new, 255.0)
    sub[reg] = new[reg]
    img[ys_, xs_] = sub
    m = np.zeros(img.shape, bool)
    m[ys_, xs_] = reg
    return m, {"kind": "corruption", "severity": sev, "variant": f"{shape}-{fill}"}


def _seg_dist(xs: np.ndarray, ys: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance from pixel grid to a polyline."""
    best = None
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=True):
        ex, ey = x1 - x0, y1 - y0
        ll = ex * ex + ey * ey + 1e-9
        t = np.clip(((xs - x0) * ex + (ys - y0) * ey) / ll, 0.0, 1.0)
        dx = xs - (x0 + t * ex)
        dy = ys - (y0 + t * ey)
        d2 = dx * dx + dy * dy
        best = d2 if best is None else np.minimum(best, d2)
    return np.sqrt(best)


def _scratch(img: np.ndarray, rng: np.random.Generator, spec: PartSpec, sev: float) -> tuple[np.ndarray, dict]:
    n = spec.size
    R = spec.radius
    D = 2.0 * R
    length = _lerp(0.30, 0.08, sev) * D * rng.uniform(0.9, 1.1)
    width = max(_lerp(6.0, 3.0, sev) * n / 1024.0, 1.5)
    contrast = _lerp(0.8, 0.25, sev) + rng.uniform(0.0, 0.05)
    bright = bool(rng.random() < 0.4)
    curved = bool(rng.random() < 0.6)
    cx, cy = spec.center
    lim = 0.93 * R - width
    for _ in range(50):
        x0, y0 = _point_on_part(rng, spec, 0.85)
        a = rng.uniform(0, 2 * math.pi)
        x2, y2 = x0 + length * math.cos(a), y0 + length * math.sin(a)
        bend = rng.uniform(-0.3, 0.3) if curved else 0.0
        x1 = (x0 + x2) / 2 - bend * length * math.sin(a)
        y1 = (y0 + y2) / 2 + bend * length * math.cos(a)
        t = np.linspace(0.0, 1.0, 17)[:, None]
        pts = (1 - t) ** 2 * np.array([x0, y0]) + 2 * (1 - t) * t * np.array([x1, y1]) + t**2 * np.array([x2, y2])
        if np.all(np.hypot(pts[:, 0] - cx, pts[:, 1] - cy) <= lim):
            break
    else:  # fall back to a short radial scratch near the centre
        pts = np.array([[cx, cy], [cx + 0.3 * length, cy + 0.3 * length]])
    pad = width + 2
    ys_, xs_, xs, ys = _window(pts[:, 0].min() - pad, pts[:, 1].min() - pad, pts[:, 0].max() + pad, pts[:, 1].max() + pad, n)
    d = _seg_dist(xs, ys, pts.astype(np.float32))
    a = np.clip(width / 2 + 0.5 - d, 0.0, 1.0)
    sub = img[ys_, xs_]
    if bright and float(np.median(sub[a > 0.5])) > 150.0:
        bright = False  # no room to brighten on a highlight: scratch shows dark there
    if bright:
        sub += a * contrast * (sub + 40.0)
    else:
        sub *= 1.0 - a * contrast
    m = np.zeros(img.shape, bool)
    m[ys_, xs_] = a >= 0.5
    variant = ("bright" if bright else "dark") + ("-curved" if curved else "-straight")
    return m, {
        "kind": "scratch",
        "severity": sev,
        "variant": variant,
        "width_px": float(width),
        "contrast": float(contrast),
    }


_DEFECT_FUNCS = {"blotch": _blotch, "corruption": _corruption, "scratch": _scratch}


def _bbox(m: np.ndarray) -> list[int]:
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


# --------------------------------------------------------------------------- public API


def _check_mix(kinds: Sequence[str], subtle_share: float) -> tuple[str, ...]:
    kinds = tuple(kinds)
    if not kinds or any(k not in DEFECT_KINDS for k in kinds):
        raise DefectclsError(f"defect kinds must be among {', '.join(DEFECT_KINDS)}, got {', '.join(kinds) or 'none'}")
    if not 0.0 <= subtle_share <= 1.0:
        raise DefectclsError(f"subtle share must be within [0, 1], got {subtle_share}")
    return kinds


def render_part(seed: int, bad: bool, size: int = 1024, kinds: Sequence[str] = DEFECT_KINDS,
                subtle_share: float = SUBTLE_IMAGE_PROB) -> tuple[Image.Image, np.ndarray | None, dict]:
    """Render one part photo.

    KINDS: the defect kinds a bad part draws from; SUBTLE_SHARE: the share of bad parts whose
    defects are all subtle (severity above ``SUBTLE_THRESHOLD``). The defaults are the product's
    mix; narrower ones make a set of the hard cases (e.g. only scratches, all subtle).

    Returns ``(image, mask, meta)``: an RGB PIL image of ``size`` x ``size``; for bad
    parts a uint8 HxW defect mask in {0, 255} (None for good parts); and a JSON-able
    dict with ``rotation`` (deg), ``offset`` ([dx, dy] px), ``scale``, ``color_cast``
    (bool) and ``defects`` (list of ``{kind, severity, bbox, ...}``, ``bbox`` =
    ``[x0, y0, x1, y1]`` with exclusive ends, severity 0 = obvious .. 1 = subtle).
    """
    kinds = _check_mix(kinds, subtle_share)
    rng = np.random.default_rng(seed)
    spec = PartSpec.sample(rng, size)
    img, alpha, rho = _render_base(spec)

    defects: list[dict] = []
    mask = None
    if bad:
        on_part = rho < 1.0
        union = np.zeros((size, size), bool)
        for sev in _draw_severities(rng, subtle_share):
            kind = str(rng.choice(kinds))
            # Own generator per defect: the defect list does not depend on ``size``.
            drng = np.random.default_rng(int(rng.integers(0, 2**63 - 1)))
            m, info = _DEFECT_FUNCS[kind](img, drng, spec, sev)
            m &= on_part
            union |= m
            info["bbox"] = _bbox(m)
            defects.append(info)
        mask = union.astype(np.uint8) * 255

    # Sensor noise (same for R, G and B: the part stays exactly gray).
    nrng = np.random.default_rng([spec.texture_seed, 1])
    img += nrng.standard_normal((size, size), dtype=np.float32) * np.float32(spec.noise_sigma)
    gray = np.clip(img + 0.5, 0.0, 255.0)
    if spec.color_cast:
        out = np.empty((size, size, 3), np.uint8)
        inv = 1.0 - alpha
        for ch in range(3):
            out[..., ch] = np.clip(gray + np.float32(spec.cast[ch]) * inv, 0.0, 255.0).astype(np.uint8)
    else:
        g8 = gray.astype(np.uint8)
        out = np.repeat(g8[:, :, None], 3, axis=2)
    meta = {
        "seed": int(seed),
        "bad": bool(bad),
        "size": int(size),
        "rotation": spec.rotation,
        "offset": [spec.offset[0], spec.offset[1]],
        "scale": spec.scale,
        "color_cast": spec.color_cast,
        "subtle": bool(defects) and all(d["severity"] > SUBTLE_THRESHOLD for d in defects),
        "defects": defects,
    }
    return Image.fromarray(out), mask, meta


def image_seed(seed: int, label: str, index: int) -> int:
    """Per-image seed derived from (seed, label, index) with numpy SeedSequence.

    Image ``index`` of class ``label`` does not depend on how many images are asked for.
    """
    label_code = int.from_bytes(label.encode("utf-8"), "little")
    ss = np.random.SeedSequence([int(seed), label_code, int(index)])
    return int(ss.generate_state(1, dtype=np.uint64)[0])


def _save_png(im: Image.Image, path: Path) -> None:
    im.save(path, format="PNG", compress_level=1, optimize=False, pnginfo=None)


def _job(args: tuple[str, str, int, int, int, bool, tuple[str, ...], float]) -> None:
    out, label, index, seed, size, masks, kinds, subtle_share = args
    img, mask, _ = render_part(image_seed(seed, label, index), label == "bad", size, kinds, subtle_share)
    stem = f"{label}_{index:05d}.png"
    root = Path(out)
    _save_png(img, root / label / stem)
    if masks and mask is not None:
        _save_png(Image.fromarray(mask), root / "masks" / stem)


def generate(
    out: str | Path,
    n_good: int = 1000,
    n_bad: int = 350,
    seed: int = 0,
    size: int = 1024,
    masks: bool = False,
    workers: int = 1,
    progress: bool = False,
    kinds: Sequence[str] = DEFECT_KINDS,
    subtle_share: float = SUBTLE_IMAGE_PROB,
) -> dict:
    """Write OUT/good/good_00000.png ..., OUT/bad/bad_00000.png ... (and OUT/masks/bad_*.png).

    Output bytes are a pure function of the arguments (``workers`` does not change
    them). KINDS and SUBTLE_SHARE as in ``render_part``. Returns ``{out, n_good, n_bad, size, seed}``.
    """
    kinds = _check_mix(kinds, subtle_share)
    root = Path(out)
    (root / "good").mkdir(parents=True, exist_ok=True)
    (root / "bad").mkdir(parents=True, exist_ok=True)
    if masks:
        (root / "masks").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), "good", i, seed, size, masks, kinds, subtle_share) for i in range(n_good)]
    jobs += [(str(root), "bad", i, seed, size, masks, kinds, subtle_share) for i in range(n_bad)]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="synth", unit="img")
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_job, jobs, chunksize=4):
                if bar is not None:
                    bar.update(1)
    else:
        for j in jobs:
            _job(j)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return {"out": str(root), "n_good": n_good, "n_bad": n_bad, "size": size, "seed": seed}
