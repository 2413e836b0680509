"""Image loading, the one preprocessing path, folder scanning, splits, cache and batch augmentation.

Inference, training, evaluation, the app, bench and export all go through
``load_image`` -> ``fit_frame`` (``restore_fill``, then ``fit_square``, of the part's square when
the card frames on it) -> ``normalize``; training keeps the output of ``fit_frame`` in memory (decoded
once) and layers augmentation on top.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
import os
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from .errors import DefectclsError, ImageLoadError

try:  # optional: a faster PNG decoder (libspng); Pillow decodes when it is missing or DEFECTCLS_PNG_DECODER=pillow
    import pyspng as _spng
except ImportError:  # pragma: no cover - depends on the platform's wheels
    _spng = None
PNG_DECODER = os.environ.get("DEFECTCLS_PNG_DECODER", "auto").lower()  # auto | pillow | libspng (also in inspect)
if PNG_DECODER == "pillow":
    _spng = None

IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LABELS = ("good", "bad")
MIN_SIDE = 16
MAX_PIXELS = 50_000_000  # ~7000x7000; larger is refused before decoding (decompression bombs)
MAX_BYTES = 50 * 1024 * 1024


def verdict(prob_bad: float, threshold: float, held: bool = False) -> str:
    """The one decision rule: a part is bad when P(bad) >= its model's threshold, or when its photo is held
    (``photo_check``: one the model cannot judge is not passed as good)."""
    return LABELS[int(held or prob_bad >= threshold)]


@dataclass(frozen=True)
class Sample:
    path: str
    label: int  # 0 good, 1 bad


def _to_uint8(img: Image.Image) -> Image.Image:
    """High bit-depth and float images to 8-bit, keeping the full range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    return img


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite transparent images onto black, the background of our photos."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img


def _fast_png(data: bytes, img: Image.Image, color: str) -> np.ndarray | None:
    """Decode a plain 8-bit L/RGB PNG with libspng (pyspng), about 1.5x faster than Pillow's decoder.

    Returns None (and Pillow decodes) when pyspng is not installed (it has no wheels for
    some platforms), for any other format or mode, for PNGs with transparency or EXIF
    orientation, and when libspng refuses the data, so Pillow gives the precise reason.
    The result is identical to Pillow's (same pixels; the same ITU-R 601-2 luma for gray).
    """
    if _spng is None or img.format != "PNG" or img.mode not in ("L", "RGB") or img.info.get("transparency") is not None \
            or "exif" in img.info or min(img.size) < MIN_SIDE:
        return None
    try:
        arr = _spng.load(data)
    except (RuntimeError, ValueError):
        return None
    want = 2 if img.mode == "L" else 3
    if arr.dtype != np.uint8 or arr.ndim != want or arr.shape[:2] != (img.size[1], img.size[0]):
        return None
    if arr.ndim == 3 and arr.shape[2] != 3:
        return None
    return as_color(arr, color)


def load_image(src: str | os.PathLike | bytes, color: str = "gray", fast_png: bool = True) -> np.ndarray:
    """Decode any supported image to uint8: HxW for 'gray', HxWx3 for 'rgb'.

    Raises ImageLoadError with a one-line reason for anything that is not a
    usable picture (empty, not an image, truncated, too small, too large).
    FAST_PNG=False skips libspng: it holds the GIL while decoding, so several decode
    threads get more done with Pillow, which releases it (``defectcls inspect``).
    """
    if color not in ("gray", "rgb"):
        raise DefectclsError(f"color must be 'gray' or 'rgb', got {color!r}")
    name = "upload" if isinstance(src, bytes | bytearray) else os.fspath(src)
    try:
        if isinstance(src, bytes | bytearray):
            data = bytes(src)
        else:
            size = os.path.getsize(src)
            if size > MAX_BYTES:
                raise ImageLoadError(f"{name}: file is {size / 1e6:.0f} MB, more than the {MAX_BYTES / 1e6:.0f} MB allowed")
            with open(src, "rb") as fh:
                data = fh.read()
    except ImageLoadError:
        raise
    except OSError as exc:
        raise ImageLoadError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise ImageLoadError(f"{name}: file is empty")
    if len(data) > MAX_BYTES:
        raise ImageLoadError(f"{name}: file is {len(data) / 1e6:.0f} MB, more than the {MAX_BYTES / 1e6:.0f} MB allowed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageLoadError(f"{name}: image is {w}x{h} pixels, more than the {MAX_PIXELS:,} allowed")
            fast = _fast_png(data, img, color) if fast_png else None
            if fast is not None:
                return fast
            img.seek(0)  # first frame of animated GIFs and multi-page TIFFs
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{name}: image declares too many pixels (decompression bomb)") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(f"{name}: not a recognised image (PNG, JPEG, BMP, TIFF, ...)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"{name}: image data is broken or truncated ({exc})") from exc
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ImageLoadError(f"{name}: image is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    img = _flatten_alpha(_to_uint8(img))
    try:
        img = img.convert("L" if color == "gray" else "RGB")
    except (OSError, ValueError) as exc:
        raise ImageLoadError(f"{name}: cannot convert image mode {img.mode} ({exc})") from exc
    return np.asarray(img)


def fit_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Pad to a centred square with black (keeps the aspect ratio), then resize to size x size."""
    h, w = arr.shape[:2]
    if h != w:
        side = max(h, w)
        pad = [((side - h) // 2, side - h - (side - h) // 2), ((side - w) // 2, side - w - (side - w) // 2)]
        if arr.ndim == 3:
            pad.append((0, 0))
        arr = np.pad(arr, pad)
    if arr.shape[0] != size:
        img = Image.fromarray(arr)
        arr = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(arr)


# ---------------------------------------------------------------- framing on the part

FRAMES = ("full", "part")
FRAME_GRID = 128          # the part is found on a copy about this many pixels wide


def _otsu(q: np.ndarray) -> int:
    """Otsu's threshold of integer values 0..255: the split with the largest between-class variance."""
    p = np.bincount(q.ravel(), minlength=256).astype(np.float64)
    p /= p.sum()
    w = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w - mu) ** 2 / (w * (1.0 - w))
    return int(np.nanargmax(between)) if np.isfinite(between).any() else 127


def _gray_blocks(arr: np.ndarray, k: int) -> np.ndarray:
    """The means of ARR's k x k blocks (and of its first three channels), float32: a copy k times smaller.
    Summed in integers, then divided: 2-3x faster than averaging floats."""
    x = arr if arr.ndim == 2 else arr[..., :3]
    rows, cols = x.shape[0] // k, x.shape[1] // k
    s = x[: rows * k, : cols * k].astype(np.uint32).reshape(rows, k, cols * k, *x.shape[2:]).sum(axis=1)
    s = s.reshape(rows, cols, k, *x.shape[2:]).sum(axis=2)
    return (s if x.ndim == 2 else s.sum(axis=2)).astype(np.float32) / float(k * k * (1 if x.ndim == 2 else x.shape[2]))


def _part_region(arr: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The round part's region on a copy about ``FRAME_GRID`` pixels wide, and that copy's step in
    pixels of ARR; None where no part stands out (``part_circle`` says how it is found)."""
    from scipy import ndimage as ndi

    k = max(1, min(arr.shape[:2]) // FRAME_GRID)
    log = np.log(_gray_blocks(arr, k) + 4.0)
    lo, hi = float(log.min()), float(log.max())
    if hi - lo < 1e-3:
        return None
    q = np.rint((log - lo) / (hi - lo) * 255.0).astype(np.int64)
    fg = q > _otsu(q)
    b = max(1, round(0.03 * min(fg.shape)))
    ring = np.concatenate([fg[:b].ravel(), fg[-b:].ravel(), fg[b:-b, :b].ravel(), fg[b:-b, -b:].ravel()])
    if ring.mean() > 0.5:
        fg = ~fg
    rr = max(1, round(0.025 * min(fg.shape)))   # opening: thin dark lines (a rim's shadow) do not join up
    yy, xx = np.mgrid[-rr:rr + 1, -rr:rr + 1]
    fg = ndi.binary_opening(fg, structure=xx * xx + yy * yy <= rr * rr)
    lab, n = ndi.label(fg)
    if n == 0:
        return None
    part = ndi.binary_fill_holes(lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:])))
    if not 0.005 <= part.sum() / part.size <= 0.9:
        return None
    return part, k


def part_circle(arr: np.ndarray) -> tuple[float, float, float] | None:
    """Centre (x, y) and radius, in pixels of ARR, of the round part; None where no part stands out.

    On a copy about ``FRAME_GRID`` pixels wide: Otsu's threshold on the logarithm of the
    brightness splits the photo in two; the side the border ring mostly falls on is the
    background. The largest connected region of the other side, holes filled, is the part
    (on the casting photos, the dark inner disc; on the emblems, the whole disc); the
    radius is that of a disc of its area. In the log domain a change of gain or gamma
    moves the threshold with the pixels, so light drift does not move the frame (measured
    in docs/benchmarks.md: under brightness, contrast, gamma, blur, JPEG and noise the
    radius moves < 1% and the centre < 1 px at 300 px).
    """
    found = _part_region(arr)
    return None if found is None else _circle(*found)


def _circle(part: np.ndarray, k: int) -> tuple[float, float, float]:
    """Centre and radius (of a disc of its area), in pixels of the photo, of a region found on a copy K times smaller."""
    ys, xs = np.nonzero(part)
    return (float(xs.mean()) + 0.5) * k, (float(ys.mean()) + 0.5) * k, math.sqrt(xs.size / math.pi) * k


OVAL_RATIO = 0.85   # minor / major axis of the part's outline under which a photo gets a note: the casting
                    # folder's good photos measure 0.90-1.00 (median 0.97), the emblems 0.99; 0.85 is a camera
                    # about 32 degrees off the axis of a round part
ELLIPSE_FIT = 0.94   # overlap (IoU) of the outline with the ellipse of its moments over which the outline is an
                     # ellipse (a disc seen at a slant) and its axes mean a tilt. Casting folder: 0.99 on straight
                     # and slanted parts, 0.947 on a slanted one whose bright hub splits the region, 0.88-0.938
                     # where the region ran into a dark patch on the rim (docs/benchmarks.md, "A camera off the
                     # part's axis")
SURROUND_BINS = 36   # ``PartOutline.surround`` counts directions in 10-degree steps
SURROUND_MIN = 0.8   # an outline whose region lies in fewer of the directions round its centre is a fragment's (an arc
                     # of the casting's dark inner ring under a brighter exposure: 0.72-0.75), and its shape says
                     # nothing about the part
FAR_FROM_ROUND = 0.75   # minor / major axis of the outline under which the part is held whatever its ellipse fit: a
                        # camera far off the axis, a part broken or chipped, or a dark mark or shadow joined to its
                        # edge. Casting folder: no good photo under 0.89, clean or under 85 variations, but for three
                        # arcs (surround 0.72-0.75) under contrast +25%; 26 bad photos are, clean
                        # (docs/benchmarks.md, "An outline far from round")


@dataclass(frozen=True)
class PartOutline:
    """Where the round part is and how round it looks, in pixels of the photo."""

    cx: float
    cy: float
    radius: float        # of a disc of the region's area (``part_circle``'s)
    axis_ratio: float    # minor / major axis of the outline's second moments: 1 straight on, cos(tilt) tilted
    minor_deg: float     # direction of the minor axis (the tilt's), degrees counter-clockwise from +x as in ``perturb``
    ellipse_fit: float   # IoU of the outline with the ellipse of its moments: near 1 where it is an ellipse
    surround: float      # share of the directions round the outline's centre in which the region lies: 1 for a
                         # disc or a closed ring, about 0.7-0.75 for half a ring (a fragment of the part)

    @property
    def tilt_deg(self) -> float:
        """The camera's angle off the part's axis if the part is a disc, from ``axis_ratio``."""
        return math.degrees(math.acos(min(1.0, max(0.0, self.axis_ratio))))


def part_outline(arr: np.ndarray) -> PartOutline | None:
    """The outline of ``part_circle``'s region (its convex hull: a bright hub or a mark that splits the
    region does not dent it) with the shape of its second moments; None where no part stands out."""
    from scipy.spatial import ConvexHull, QhullError

    found = _part_region(arr)
    if found is None:
        return None
    part, k = found
    cx, cy, radius = _circle(part, k)
    ys, xs = np.nonzero(part)
    hull = part.copy()
    pts = np.stack([xs, ys], axis=1).astype(np.float64)
    with contextlib.suppress(QhullError, ValueError):
        poly = Image.new("L", part.shape[::-1], 0)
        ImageDraw.Draw(poly).polygon([tuple(pts[v] + 0.5) for v in ConvexHull(pts).vertices], fill=1)
        hull |= np.asarray(poly, dtype=bool)
    hy, hx = np.nonzero(hull)
    cov = np.cov(np.stack([hx, hy]).astype(np.float64))
    ev, vec = np.linalg.eigh(cov)
    if ev[0] <= 0:
        return PartOutline(cx, cy, radius, 0.0, 0.0, 0.0, 0.0)
    mx, my = hx.mean(), hy.mean()                       # the outline's centre, on the small copy
    ang = np.arctan2(ys - my, xs - mx)
    surround = float((np.histogram(ang, bins=SURROUND_BINS, range=(-math.pi, math.pi))[0] > 0).mean())
    yy, xx = np.mgrid[0:part.shape[0], 0:part.shape[1]]
    d = np.stack([xx - mx, yy - my], axis=-1)
    ellipse = np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d) <= 4.0   # a uniform ellipse's moments
    fit = float((ellipse & hull).sum() / (ellipse | hull).sum())
    minor = math.degrees(math.atan2(-vec[1, 0], vec[0, 0])) % 180.0
    return PartOutline(cx, cy, radius, math.sqrt(ev[0] / ev[1]), minor, fit, surround)


SHARP_GRID = 300   # sharpness is measured on a copy about this many pixels wide (the casting photos' native side)


def sharpness(arr: np.ndarray) -> float:
    """How much of the photo's detail is fine: the variance of what a Gaussian of sigma 1.5 px removes over the
    variance of what lies between sigma 1.5 and 4 px, on a copy about ``SHARP_GRID`` pixels wide.

    A ratio of two detail bands, so a change of brightness or contrast leaves it as it is; focus blur lowers it
    (on the casting photos blur of sigma 1.5 px at 300 px takes it to about a third: docs/benchmarks.md,
    "Softer photos"), sensor noise and JPEG raise it, and enlarging a photo lowers it as its detail moves to
    coarser scales.
    """
    from scipy.ndimage import gaussian_filter

    g = _gray_blocks(arr, max(1, min(arr.shape[:2]) // SHARP_GRID))
    u = min(g.shape) / SHARP_GRID
    fine = gaussian_filter(g, 1.5 * u, mode="nearest")
    coarse = gaussian_filter(fine, math.sqrt(4.0 ** 2 - 1.5 ** 2) * u, mode="nearest")   # sigma 4 in all
    band = float(np.var(fine - coarse))
    return float(np.var(g - fine)) / band if band > 1e-6 else 0.0


PHOTO_RANGE_Q = (0.005, 0.5, 0.995)   # the quantiles of the training photos a card keeps (``estimate_photo_range``)
SOFT_FACTOR = 0.7    # a photo whose sharpness is under this share of the training photos' low end gets a note. On
                     # the casting photos: every photo blurred by sigma 1.5 at 300 px, no good one blurred by 0.75,
                     # and none clean or under light, JPEG, noise, turns, zoom, shifts or fills (docs/benchmarks.md)


SIZE_MARGIN = 0.05   # a part this much smaller or larger than training showed (its photos' range, widened by its
                     # zoom) gets a note. On the casting photos no good one clean, and none under scale 0.85-1.15
                     # (docs/benchmarks.md, "The part's size in the frame")


def part_size(arr: np.ndarray) -> float | None:
    """The part's radius as a share of the photo's shorter side (``part_circle``); None where no part stands out."""
    c = part_circle(arr)
    return None if c is None else c[2] / min(arr.shape[:2])


def _look(arr: np.ndarray) -> tuple[float, float | None]:
    return sharpness(arr), part_size(arr)


def estimate_photo_range(paths: Sequence[str], color: str = "gray", n: int = 256, seed: int = 0) -> dict | None:
    """What the training photos look like, for photo notes: the ``PHOTO_RANGE_Q`` quantiles of ``sharpness``
    and of ``part_size`` over up to N seeded photos of PATHS, and how many were measured. None when none of them
    decodes. The caller adds ``zoom`` (the training's zoom range, ``AugConfig.scale``) where the model sees the
    whole photo: without it ``photo_check`` says nothing of the part's size."""
    return _photo_range_of(measure_sample(paths, _look, color, n, seed))


def _photo_range_of(looks: list[tuple[float, float | None]]) -> dict | None:
    if not looks:
        return None
    out = {"sharpness": [round(float(x), 5) for x in np.quantile([s for s, _ in looks], PHOTO_RANGE_Q)],
           "n": len(looks)}
    sizes = [r for _, r in looks if r is not None]
    if sizes:
        out["size"] = [round(float(x), 5) for x in np.quantile(sizes, PHOTO_RANGE_Q)]
    return out


def add_zoom(photo_range: dict, frame_ref: float | None, zoom: float | None) -> None:
    """Record on PHOTO_RANGE the training's zoom range (``AugConfig.scale``) where the model sees the whole photo
    (no FRAME_REF): what ``trained_sizes`` widens the photos' sizes by. A model framed on the part gets none."""
    if not frame_ref and zoom is not None:
        photo_range["zoom"] = float(zoom)


def trained_sizes(photo_range: dict | None) -> tuple[float, float] | None:
    """The part sizes (``part_size``) a model was trained on: its photos' range (``photo_range["size"]``) widened
    by the training's zoom (``photo_range["zoom"]``); None where the card does not say both."""
    size, zoom = (photo_range or {}).get("size"), (photo_range or {}).get("zoom")
    if not size or zoom is None:
        return None
    return size[0] * (1 - zoom), size[-1] * (1 + zoom)


FOCUS_GAIN, FOCUS_MAX = 0.5, 6.0   # ``restore_focus``: unsharp amount per unit of missing sharpness, and its cap


def restore_focus(arr: np.ndarray, focus_below: float | None, sharp: float | None = None) -> np.ndarray:
    """ARR sharpened back towards the training photos where it is softer than them; as it is otherwise.

    FOCUS_BELOW is the training photos' low end of ``sharpness`` (a card's ``focus_below``; None: never).
    A photo of sharpness s < FOCUS_BELOW gets an unsharp mask of sigma 1.5 px at 300 px and amount
    ``FOCUS_GAIN`` x (FOCUS_BELOW / s - 1), at most ``FOCUS_MAX``: none at the training photos' low end,
    more the softer the photo. On the casting photos (two seeds) it takes the good parts rejected under
    focus blur of sigma 1.5 from 50 and 40 of 431 to 28 and 8, under sigma 2 from 157 and 102 to 61 and 34,
    and misses no part more (docs/benchmarks.md, "Soft photos sharpened back"); a larger gain clears
    more good parts and lets pin marks through. SHARP: ``sharpness(arr)`` where the caller has it already.
    """
    if not focus_below:
        return arr
    s = sharpness(arr) if sharp is None else sharp
    if s >= focus_below:
        return arr
    from scipy.ndimage import gaussian_filter

    amount = min(FOCUS_MAX, FOCUS_GAIN * (focus_below / max(s, 1e-6) - 1.0))
    g = arr.astype(np.float32)
    sig = 1.5 * min(arr.shape[:2]) / SHARP_GRID
    soft = gaussian_filter(g, (sig, sig) if arr.ndim == 2 else (sig, sig, 0), mode="nearest")
    return np.clip(np.rint(g + amount * (g - soft)), 0, 255).astype(np.uint8)


def verdict_line(path, label: str, prob_bad: float, threshold: float, latency_ms: float, held: bool = False,
                 notes: list[str] | None = None, cam: str | None = None) -> str:
    """One verdict as ``predict`` and the edge runtime print it, with its notes as indented lines."""
    return (f"{path}: {label}{' (held)' if held else ''} (P(bad) {prob_bad:.4f}, threshold {threshold:.4f}, "
            f"{latency_ms:.1f} ms)" + (f" -> {cam}" if cam else "") + notes_text(notes or []))


def photo_check(arr: np.ndarray, photo_range: dict | None = None, sharp: float | None = None,
                filled: np.ndarray | None = None) -> tuple[list[str], bool]:
    """What about the photo makes its verdict less sure than the model's numbers say (notes; empty for a
    usual photo), and whether the photo is held: judged bad whatever the model says (``verdict``).

    Held, as the model cannot judge it and a part it cannot judge must not pass as good: no round part
    stands out from the background (a lamp off, a wrong photo), or its outline, where it is an ellipse,
    is oval (a camera off the part's axis, which the models are not trained for: docs/benchmarks.md,
    "A camera off the part's axis"; none of the casting folder's 2875 good photos is held, clean or under
    85 variations: docs/benchmarks.md, "An outline far from round"). An outline that is no ellipse (the region ran into a mark or
    a shadow) says nothing about the camera, and is held only where it is far from round (``FAR_FROM_ROUND``)
    and its region goes round the outline's centre (``SURROUND_MIN``; an arc of a ring is a fragment): the
    slanted photo whose hub splits its region fits an ellipse only just, and noise or a turn pushes the fit
    under ``ELLIPSE_FIT`` while its axes stay at 0.69. A note alone, not held, with PHOTO_RANGE
    (a card's, ``estimate_photo_range``): the photo is much softer than the photos the model was trained
    on (``SOFT_FACTOR``): out of focus is where false alarms gather under drift (docs/benchmarks.md,
    "Softer photos"); or the part is smaller or larger in the photo than training showed it (``trained_sizes``,
    ``SIZE_MARGIN``): past the zoom it was trained on is where misses begin (docs/benchmarks.md, "The part's size
    in the frame"). SHARP: ``sharpness(arr)`` where the caller has it already. FILLED: ARR with a tool's fill
    mended (``restore_fill``), where the size is measured: black corners make the whole photo the part.
    """
    o = part_outline(arr)
    if o is None:
        return ["no round part stands out from the background: is this a photo of the part? Judged bad until "
                "a person looks"], True
    notes, held = [], False
    if o.axis_ratio < OVAL_RATIO and o.ellipse_fit >= ELLIPSE_FIT:
        notes.append(f"the part looks oval (axes {o.axis_ratio:.2f}, a camera about {o.tilt_deg:.0f} degrees off its "
                     "axis): the model is not trained for tilted photos, so the part is judged bad until a person "
                     "looks; square the camera to the part")
        held = True
    elif o.axis_ratio < FAR_FROM_ROUND and o.surround >= SURROUND_MIN:
        notes.append(f"the part's outline is far from round (axes {o.axis_ratio:.2f}): a camera far off the part's "
                     "axis, a broken or chipped part, or a dark mark or shadow joined to its edge; judged bad until a "
                     "person looks")
        held = True
    lim = (photo_range or {}).get("sharpness")
    if lim:
        s = sharpness(arr) if sharp is None else sharp
        if s < SOFT_FACTOR * lim[0]:
            notes.append(f"the photo looks softer than in training (sharpness {s:.2f}, training {lim[0]:.2f}-"
                         f"{lim[-1]:.2f}): out of focus, enlarged, or another camera; its verdict is less reliable: "
                         "check the focus")
    sizes = trained_sizes(photo_range)
    if sizes and not held:   # a held part's outline is no disc seen straight on: its area says nothing of distance
        r = o.radius / min(arr.shape[:2]) if filled is None or filled is arr else part_size(filled)
        if r is not None and not sizes[0] * (1 - SIZE_MARGIN) <= r <= sizes[1] * (1 + SIZE_MARGIN):
            # no "smaller" or "larger": a part that overflows the frame can measure small (the region found is
            # then another)
            notes.append(f"the part's size in the photo is outside what the model was trained on (radius {r:.3f} "
                         f"of the side, trained on {sizes[0]:.3f}-{sizes[1]:.3f}): the camera moved closer or further, "
                         "or its lens changed; its verdict is less reliable: check the camera's distance")
    return notes, held


def photo_notes(arr: np.ndarray, photo_range: dict | None = None, sharp: float | None = None) -> list[str]:
    """``photo_check``'s notes alone."""
    return photo_check(arr, photo_range, sharp)[0]


def photo_held(arr: np.ndarray) -> bool:
    """``photo_check``'s hold alone (no sharpness measured)."""
    return photo_check(arr)[1]


def _held_one(args: tuple[str, str]) -> bool:
    try:
        return photo_held(load_image(*args))
    except ImageLoadError:
        return False


def held_all(paths: Sequence[str], color: str = "gray", workers: int | None = None) -> np.ndarray:
    """``photo_held`` of each photo of PATHS (bool array; an unreadable one is not held), decoded in WORKERS
    processes: what scoring needs to count verdicts as the product gives them."""
    return np.array(_map_photos(_held_one, [(str(p), color) for p in paths], workers), bool)


def _map_photos(fn, jobs: list, workers: int | None = None, progress: bool = False) -> list:
    """FN of each of JOBS in order, in WORKERS processes (default up to 4) when there are enough to pay for them."""
    workers = workers or min(4, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 32:
        with ProcessPoolExecutor(workers) as pool:
            return list(_progress(pool.map(fn, jobs, chunksize=16), len(jobs), progress))
    return list(_progress(map(fn, jobs), len(jobs), progress))


def notes_text(notes: list[str]) -> str:
    """Photo notes as indented lines to follow a one-line verdict ('' for none)."""
    return "".join(f"\n  note: {n}" for n in notes)


def frame_box(arr: np.ndarray, frame_ref: float | None) -> tuple[int, int, int] | None:
    """The square (x0, y0, side) of ARR the model sees: centred on the part, its side such that the
    part's radius is FRAME_REF of it (the training photos' median). None: the whole photo
    (FRAME_REF None, or no part found, or a part under a quarter or over four times the usual size)."""
    if not frame_ref:
        return None
    c = part_circle(arr)
    if c is None:
        return None
    cx, cy, r = c
    side = r / frame_ref
    full = max(arr.shape[:2])
    if not 0.25 * full <= side <= 4.0 * full:
        return None
    s = max(MIN_SIDE, int(round(side)))
    return int(round(cx - s / 2.0)), int(round(cy - s / 2.0)), s


def border_median(img: np.ndarray, frac: float = 0.02) -> np.ndarray:
    """Per-channel median of the image's border ring FRAC of the side wide (float, shape (C,)): its background."""
    h, w = img.shape[:2]
    r = max(1, round(min(h, w) * frac))
    c = 1 if img.ndim == 2 else img.shape[2]
    ring = np.concatenate([img[:r].reshape(-1, c), img[-r:].reshape(-1, c),
                           img[r:-r, :r].reshape(-1, c), img[r:-r, -r:].reshape(-1, c)])
    return np.median(ring, axis=0)


FILL_TOL = 6           # a tool's black (0) or white (255) fill, give or take resampling and rounding
FILL_MIN_FRAC = 0.001  # the smallest filled area that counts, of the photo
FILL_GAP = 40          # a fill at least this far (0-255) from the training photos' background is not background
FILL_RING = 3          # px: the band of the photo just outside a fill (past its resampled seam) ...
FILL_STEP = 16         # ... whose 90th percentile (10th for black) lies at least this far from the fill's shade
FILL_HULL_MARGIN = 1.0  # px: a fill's pixels lie outside the convex hull of the photo's footprint by at least ...
FILL_HULL_SHARE = 0.02  # ... all but this share of them


def _is_fill(m: np.ndarray, level: np.ndarray, shade: int) -> bool:
    """Whether region M (of ``level`` near SHADE, touching the edge) is what a turn, shrink or shift leaves.

    Such a region meets the photo in a step and lies outside the photo's footprint, a convex
    polygon. Light clipped to white by a brighter exposure rises to white gradually (on the casting
    photos brightened 15-40%: 90th percentile of the band just outside 241-255, against 110-233 for
    a tool's white fill after a turn or shrink) and dents the footprint where it wraps round the part.
    """
    from scipy import ndimage as ndi
    from scipy.spatial import ConvexHull, QhullError

    pad = FILL_RING + 3   # the work happens in M's bounding box, widened to hold the band outside it
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    y0, x0 = max(rows[0] - pad, 0), max(cols[0] - pad, 0)
    box = (slice(y0, rows[-1] + pad + 1), slice(x0, cols[-1] + pad + 1))
    mb = m[box]
    seam = ndi.binary_dilation(mb)   # the 1-pixel resampled edge
    # the photo just outside (past a seam of up to 2 px): nearly all of it a step away from the shade
    ring = ndi.binary_dilation(mb, iterations=FILL_RING + 2) & ~ndi.binary_dilation(seam)
    if not ring.any():
        return False
    near = np.percentile(level[box][ring], 90 if shade else 10)
    if abs(float(near) - shade) < FILL_STEP:
        return False
    # the photo's footprint, less the seam: its outline is where it meets the seam, and the frame
    h, w = m.shape
    meet = ndi.binary_dilation(seam) & ~seam
    frame = np.zeros((h, w), bool)
    frame[[0, -1], :] = frame[:, [0, -1]] = True
    frame[box] &= ~seam
    pts = np.concatenate([np.argwhere(meet) + (y0, x0), np.argwhere(frame)]).astype(np.float64)
    try:
        eq = ConvexHull(pts).equations
    except (QhullError, ValueError):   # the footprint is a line or nothing
        return False
    inside = np.all((np.argwhere(mb) + (y0, x0)) @ eq[:, :2].T + eq[:, 2] <= -FILL_HULL_MARGIN, axis=1)
    return float(inside.mean()) <= FILL_HULL_SHARE


def restore_fill(arr: np.ndarray, background: Sequence[float] | None) -> np.ndarray:
    """ARR with the corners a tool filled black or white when it turned, shrank or shifted the photo
    given the photo's own background, as training's own fill (``augment``) gives them.

    A fill is a region of black (every channel <= ``FILL_TOL``) or white (>= 255 - ``FILL_TOL``)
    that touches the photo's edge and covers at least ``FILL_MIN_FRAC`` of it, of a shade at least
    ``FILL_GAP`` from BACKGROUND (the training photos' background, ``estimate_background``; a
    black fill on a part photographed on black is background already), that the photo meets in a
    step and that lies outside the convex hull of the rest of the photo (``_is_fill``: a background
    clipped to white by a brighter exposure stays as it is). It and a 1-pixel seam (the resampled
    edge) take the per-channel median of the photo's pixels next to it. BACKGROUND None
    (cards before it), or no such region: ARR itself, not a copy.
    """
    if background is None:
        return arr
    from scipy import ndimage as ndi

    bg = np.asarray(background, np.float32)
    lo, hi = (arr, arr) if arr.ndim == 2 else (arr.max(axis=2), arr.min(axis=2))
    mask = None
    for shade, level, cand in ((0, lo, lo <= FILL_TOL), (255, hi, hi >= 255 - FILL_TOL)):
        if np.abs(bg - shade).min() < FILL_GAP or not (cand[0].any() or cand[-1].any() or cand[:, 0].any()
                                                        or cand[:, -1].any()):
            continue
        lab, _ = ndi.label(cand)
        edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        edge = edge[edge > 0]
        keep = edge[np.bincount(lab.ravel())[edge] >= FILL_MIN_FRAC * lab.size]
        for r in keep:
            m = lab == r
            if _is_fill(m, level, shade):
                mask = m if mask is None else mask | m
    if mask is None:
        return arr
    mask = ndi.binary_dilation(mask)
    near = ndi.distance_transform_edt(~mask) <= max(2, round(0.04 * min(arr.shape[:2])))
    near &= ~mask
    fill = np.round(np.atleast_1d(np.median(arr[near], axis=0) if near.any() else bg)).astype(np.uint8)
    out = arr.copy()
    out[mask] = fill[0] if arr.ndim == 2 else fill
    return out


def measure_sample(paths: Sequence[str], measure, color: str = "gray", n: int = 256, seed: int = 0) -> list:
    """MEASURE of each decodable one of up to N seeded photos of PATHS (what training records on the card)."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(paths), size=min(n, len(paths)), replace=False) if len(paths) else []
    out = []
    for i in pick:
        try:
            out.append(measure(load_image(paths[int(i)], color)))
        except ImageLoadError:
            continue
    return out


def estimate_background(paths: Sequence[str], color: str = "gray", n: int = 256, seed: int = 0) -> list[float] | None:
    """The per-channel median of the border medians of up to N seeded photos of PATHS (0-255): what
    ``restore_fill`` tells a tool's fill from. None when none of them decodes."""
    return _background_of(measure_sample(paths, border_median, color, n, seed))


def _background_of(meds: list[np.ndarray]) -> list[float] | None:
    return [round(float(v), 1) for v in np.median(meds, axis=0)] if meds else None


def estimate_look(paths: Sequence[str], color: str = "gray", n: int = 256,
                  seed: int = 0) -> tuple[list[float] | None, dict | None]:
    """``estimate_background`` and ``estimate_photo_range`` of the same seeded photos, each decoded once."""
    both = measure_sample(paths, lambda a: (border_median(a), _look(a)), color, n, seed)
    return _background_of([b for b, _ in both]), _photo_range_of([s for _, s in both])


def crop_square(arr: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    """The square BOX of ARR; where it reaches past the photo, the photo's border median fills it."""
    x0, y0, s = box
    h, w = arr.shape[:2]
    if x0 >= 0 and y0 >= 0 and x0 + s <= w and y0 + s <= h:
        return arr[y0:y0 + s, x0:x0 + s]
    out = np.empty((s, s, *arr.shape[2:]), np.uint8)
    fill = border_median(arr).round().astype(np.uint8)
    out[...] = fill[0] if arr.ndim == 2 else fill
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + s, w), min(y0 + s, h)
    if xa < xb and ya < yb:
        out[ya - y0:yb - y0, xa - x0:xb - x0] = arr[ya:yb, xa:xb]
    return out


def fit_box(arr: np.ndarray, size: int, box: tuple[int, int, int] | None) -> np.ndarray:
    """``fit_square`` of ARR's square BOX (``frame_box``); with BOX None, of the whole photo."""
    return fit_square(arr if box is None else crop_square(arr, box), size)


def fit_frame(arr: np.ndarray, size: int, frame_ref: float | None = None,
              background: Sequence[float] | None = None, focus_below: float | None = None) -> np.ndarray:
    """``fit_square`` of the part's square (``restore_fill`` and ``restore_focus`` first); with FRAME_REF None,
    of the whole photo."""
    arr = restore_focus(restore_fill(arr, background), focus_below)
    return fit_box(arr, size, frame_box(arr, frame_ref))


def estimate_frame_ref(paths: Sequence[str], color: str = "gray", n: int = 256, seed: int = 0) -> float:
    """The median part radius / photo side over up to N seeded photos of PATHS (unlabelled geometry only)."""
    def ratio(arr: np.ndarray) -> float | None:
        c = part_circle(arr)
        return None if c is None else c[2] / max(arr.shape[:2])

    picked = min(n, len(paths))
    ratios = [r for r in measure_sample(paths, ratio, color, n, seed) if r is not None]
    if len(ratios) < max(1, picked // 2):
        raise DefectclsError(f"--frame part: no round part stands out from the background in {picked - len(ratios)} "
                             f"of {picked} sampled photos; train with --frame full")
    return round(float(np.median(ratios)), 5)


def normalize(arr: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 HxW or HxWxC (or a batch NxCxHxW) -> float32 CxHxW, (x/255 - mean) / std."""
    x = arr.astype(np.float32) / 255.0
    if x.ndim == 2:
        x = x[None]
    elif x.ndim == 3 and x.shape[-1] in (1, 3) and x.shape[0] not in (1, 3):
        x = x.transpose(2, 0, 1)
    c = x.shape[-3]
    m = np.asarray(mean, np.float32).reshape(c, 1, 1)
    s = np.asarray(std, np.float32).reshape(c, 1, 1)
    return np.ascontiguousarray((x - m) / s)


def preprocess(src: str | os.PathLike | bytes | np.ndarray, img_size: int, color: str,
               mean: Sequence[float], std: Sequence[float], frame_ref: float | None = None,
               background: Sequence[float] | None = None, focus_below: float | None = None) -> np.ndarray:
    """The one preprocessing path: file/bytes/array -> float32 CxHxW ready for the model."""
    arr = src if isinstance(src, np.ndarray) else load_image(src, color)
    arr = as_color(arr, color)
    return normalize(fit_frame(arr, img_size, frame_ref, background, focus_below), mean, std)


@dataclass(frozen=True)
class Prepared:
    """A decoded photo made ready for the model (``Preprocessing.prepare``): input, square, notes, and their times."""

    x: np.ndarray                          # float32 CxHxW
    box: tuple[int, int, int] | None       # the square of the photo the model sees; None: the whole photo
    notes: list[str]                       # ``photo_check``'s
    preprocess_ms: float
    check_ms: float                        # the check's own time
    held: bool = False                     # ``photo_check``: judged bad whatever the model says


@dataclass(frozen=True)
class Preprocessing:
    """A model card's preprocessing (colour mode, size, mean/std), picklable for decode processes.

    ``Predictor``, ``EdgePredictor`` and ``defectcls inspect``'s decode processes all go through it.
    """

    color: str
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    frame_ref: float | None = None   # framing on the part (``fit_frame``); None: the whole photo
    background: tuple[float, ...] | None = None  # the training photos' background (``restore_fill``); None: as is
    photo_range: dict | None = field(default=None, compare=False)  # the training photos' look (``photo_notes``)
    focus_below: float | None = None   # softer photos are sharpened back (``restore_focus``); None: never

    @classmethod
    def from_card(cls, card) -> Preprocessing:
        """From a ``ModelCard`` or the card dict an exported ONNX file carries."""
        get = card.get if isinstance(card, dict) else (lambda k: getattr(card, k, None))
        ref, bg = get("frame_ref"), get("background")
        return cls(str(get("color")), int(get("img_size")), tuple(float(v) for v in get("mean")),
                   tuple(float(v) for v in get("std")), float(ref) if ref else None,
                   tuple(float(v) for v in bg) if bg else None, get("photo_range") or None,
                   float(get("focus_below")) if get("focus_below") else None)

    def box(self, arr: np.ndarray) -> tuple[int, int, int] | None:
        """The square (x0, y0, side) of the decoded photo the model sees; None: the whole photo."""
        if not self.frame_ref:
            return None
        return frame_box(restore_focus(restore_fill(arr, self.background), self.focus_below), self.frame_ref)

    def _boxed(self, filled: np.ndarray, sharp: float | None = None) -> tuple[np.ndarray, tuple[int, int, int] | None]:
        """Model input of a photo whose fills are mended, and the square of it the model sees (``box``)."""
        arr = restore_focus(filled, self.focus_below, sharp)
        box = frame_box(arr, self.frame_ref)
        return normalize(fit_box(arr, self.img_size, box), self.mean, self.std), box

    def prepare(self, arr: np.ndarray) -> Prepared:
        """``preprocess`` of a decoded photo, the square it used (``box``, the part found once) and its
        ``photo_notes`` against the card's training photos. On a card that both sharpens soft photos back
        and checks their sharpness, the photo's sharpness is measured once for both (the notes judge the
        photo as it came: where a fill was mended first, they measure it apart)."""
        t0 = time.perf_counter()
        img = as_color(arr, self.color)
        filled = restore_fill(img, self.background)
        sharp = sharpness(filled) if self.focus_below else None
        x, box = self._boxed(filled, sharp)
        t1 = time.perf_counter()
        notes, held = photo_check(img, self.photo_range, sharp if filled is img else None, filled)
        return Prepared(x, box, notes, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3, held)

    def load(self, src: str | os.PathLike | bytes | np.ndarray, fast_png: bool = True) -> np.ndarray:
        """Decode to uint8 in the model's colour mode (arrays are converted, not copied when possible)."""
        if isinstance(src, np.ndarray):
            return as_color(src, self.color)
        return load_image(src, self.color, fast_png=fast_png)

    def preprocess(self, src: str | os.PathLike | bytes | np.ndarray) -> np.ndarray:
        """File/bytes/array -> float32 CxHxW; the same function training and export use."""
        return self._boxed(restore_fill(as_color(self.load(src), self.color), self.background))[0]


def as_color(arr: np.ndarray, color: str) -> np.ndarray:
    """Bring an already decoded uint8 array to the colour mode a model wants."""
    if arr.dtype != np.uint8:
        raise ImageLoadError(f"array input must be uint8, got {arr.dtype}")
    if color == "gray" and arr.ndim == 3:
        return np.asarray(Image.fromarray(arr[..., :3] if arr.shape[-1] >= 3 else arr[..., 0]).convert("L"))
    if color == "rgb" and arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    return arr


# ---------------------------------------------------------------- folders and splits

def scan_folder(root: str | os.PathLike) -> list[Sample]:
    """All images under ROOT/good and ROOT/bad (recursively), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise DefectclsError(f"data folder {root} does not exist")
    samples: list[Sample] = []
    for label, name in enumerate(LABELS):
        sub = root / name
        if not sub.is_dir():
            raise DefectclsError(f"data folder {root} has no '{name}/' subfolder (expected {root}/good and {root}/bad)")
        samples += [Sample(str(p), label) for p in sorted(sub.rglob("*")) if p.suffix.lower() in IMG_EXTS and p.is_file()]
    if not samples:
        raise DefectclsError(f"no images (PNG, JPEG, BMP, TIFF) found in {root}/good or {root}/bad")
    return samples


def read_label_csv(path: str | os.PathLike) -> list[Sample]:
    """Read a reviewed-labels CSV (columns path,label first; labels good/bad)."""
    out: list[Sample] = []
    base = Path(path).resolve().parent
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames or "label" not in reader.fieldnames:
                raise DefectclsError(f"{path}: a labels CSV needs 'path' and 'label' columns")
            for i, row in enumerate(reader, start=2):
                label = (row.get("label") or "").strip().lower()
                if label not in LABELS:
                    raise DefectclsError(f"{path}:{i}: label must be 'good' or 'bad', got {label!r}")
                p = Path(row["path"])
                out.append(Sample(str(p if p.is_absolute() else base / p), LABELS.index(label)))
    except OSError as exc:
        raise DefectclsError(f"cannot read labels CSV {path}: {exc.strerror or exc}") from exc
    return out


def merge_labels(samples: list[Sample], extra: list[Sample]) -> tuple[list[Sample], int, int]:
    """Extra labels override samples with the same file and add the rest; returns (samples, overridden, added)."""
    index = {os.path.realpath(s.path): i for i, s in enumerate(samples)}
    merged = list(samples)
    overridden = added = 0
    for s in extra:
        key = os.path.realpath(s.path)
        if key in index:
            if merged[index[key]].label != s.label:
                overridden += 1
            merged[index[key]] = Sample(merged[index[key]].path, s.label)
        else:
            index[key] = len(merged)
            merged.append(s)
            added += 1
    return merged, overridden, added


def mixed_shots(labels: Sequence[int], groups: Sequence[int]) -> set[int]:
    """The group numbers (``copies.copy_groups``) whose images carry both labels: one shot filed as good and as bad."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    seen_good = set(groups[labels == 0].tolist())
    return {int(g) for g in set(groups[labels != 0].tolist()) if g in seen_good}


def stratified_split(labels: Sequence[int], fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                     seed: int = 0, groups: Sequence[int] | None = None) -> dict[str, list[int]]:
    """Seeded per-class split into train/val/test index lists (each class in every part when it can be).

    GROUPS (a group number per image, e.g. ``copies.copy_groups``): each class's images of one group go to one
    part, so no part holds a copy of another's photo. Groups are dealt in a seeded order, each to the part
    furthest below its share, so the parts' sizes miss their shares by at most about one group. A class without
    copies (every group a single image) is split as without GROUPS. A group whose images carry both labels (one
    shot filed as good and as bad) then goes whole to the part its more numerous class was dealt to, so no part
    scores a shot that another trained with the other label.
    """
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise DefectclsError(f"split fractions must sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    if groups is not None and len(groups) != len(labels):
        raise DefectclsError(f"split groups: {len(groups)} group numbers for {len(labels)} images")
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n = len(idx)
        n_val = max(1, round(fractions[1] * n)) if fractions[1] > 0 and n >= 3 else 0
        n_test = max(1, round(fractions[2] * n)) if fractions[2] > 0 and n >= 3 else 0
        if groups is None or len(set(np.asarray(groups)[idx].tolist())) == n:   # no copies: photo by photo
            parts["val"] += idx[:n_val].tolist()
            parts["test"] += idx[n_val:n_val + n_test].tolist()
            parts["train"] += idx[n_val + n_test:].tolist()
            continue
        members: dict[int, list[int]] = {}
        for i in idx:   # groups in the order their first member was drawn: a seeded order
            members.setdefault(int(groups[i]), []).append(int(i))
        want = {"train": n - n_val - n_test, "val": n_val, "test": n_test}
        got = dict.fromkeys(want, 0)
        for group in members.values():
            name = max((k for k in want if want[k] > 0), key=lambda k: (want[k] - got[k]) / want[k])
            parts[name] += group
            got[name] += len(group)
    if groups is not None:   # a shot filed under both labels goes whole to the part of its more numerous class
        part_of = {int(i): k for k, v in parts.items() for i in v}
        for g in mixed_shots(labels, groups):
            shot = np.flatnonzero(np.asarray(groups) == g).tolist()
            ys = labels[shot].tolist()
            lead = max(set(ys), key=lambda c: (ys.count(c), c))   # a tie goes with the bad photos
            for i in shot:
                part_of[i] = part_of[shot[ys.index(lead)]]
        parts = {k: [i for i, p in part_of.items() if p == k] for k in parts}
    return {k: sorted(v) for k, v in parts.items()}


def fingerprint(samples: Sequence[Sample]) -> str:
    """A cheap identity of a labelled file list: names, sizes and labels."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.path):
        try:
            size = os.path.getsize(s.path)
        except OSError:
            size = -1
        h.update(f"{os.path.basename(s.path)}\t{size}\t{s.label}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- decode cache

def _decode_one(args: tuple[str, int, str, float | None, tuple[float, ...] | None, float | None]
                ) -> tuple[np.ndarray | None, str | None]:
    path, size, color, frame_ref, background, focus_below = args
    try:
        arr = fit_frame(load_image(path, color), size, frame_ref, background, focus_below)
    except ImageLoadError as exc:
        return None, str(exc)
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), None


def load_masks(samples: Sequence[Sample], mask_dir: str | os.PathLike, size: int
               ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Defect masks at working size for SAMPLES (whole-photo framing, as ``fit_square``).

    A bad image's mask is MASK_DIR/<its file name>, or the same name ending in .png (``defectcls synth
    --masks`` writes them), non-zero where the defect is, of the image's own size; a good image's mask
    is empty. Returns (uint8 N x 1 x S x S, known: bool N, [(path, reason)] of bad images whose mask is
    missing, unreadable or of another size); those are marked unknown and train without the mask loss.
    """
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise DefectclsError(f"mask folder not found: {mask_dir}")
    masks = np.zeros((len(samples), 1, size, size), np.uint8)
    known = np.ones(len(samples), bool)
    problems = []
    for i, s in enumerate(samples):
        if s.label != 1:
            continue
        path = mask_dir / Path(s.path).name
        if not path.is_file():   # a JPEG photo's mask is usually a PNG of the same name
            path = path.with_suffix(".png") if path.with_suffix(".png").is_file() else path
        try:
            if not path.is_file():
                raise ImageLoadError("no mask")
            m = load_image(path, "gray")
            with Image.open(s.path) as im:
                if im.size != (m.shape[1], m.shape[0]):
                    raise ImageLoadError(f"mask is {m.shape[1]}x{m.shape[0]}, image {im.size[0]}x{im.size[1]}")
        except (ImageLoadError, OSError) as exc:
            known[i] = False
            problems.append((s.path, f"{path}: {exc}"))
            continue
        masks[i, 0] = fit_square(np.where(m > 0, 255, 0).astype(np.uint8), size)
    return masks, known, problems


def cache_path(samples: Sequence[Sample], size: int, color: str, frame_ref: float | None = None,
               background: Sequence[float] | None = None, focus_below: float | None = None) -> Path:
    root = Path(os.environ.get("DEFECTCLS_CACHE_DIR") or Path.home() / ".cache" / "defectcls")
    h = hashlib.sha256((f"{size}|{color}|" + (f"frame{frame_ref!r}|" if frame_ref else "")
                        + (f"bg{list(background)!r}|" if background else "")
                        + (f"focus{focus_below!r}|" if focus_below else "")).encode())
    for s in samples:
        try:
            st = os.stat(s.path)
            h.update(f"{os.path.realpath(s.path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{s.path}|missing\n".encode())
    return root / f"decoded-{h.hexdigest()[:20]}.npz"


def decode_all(samples: Sequence[Sample], size: int, color: str = "gray", workers: int | None = None,
               use_disk_cache: bool = True, progress: bool = False,
               frame_ref: float | None = None, background: Sequence[float] | None = None,
               focus_below: float | None = None) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode every sample once to uint8 NxCxSxS at working size (framed on the part with FRAME_REF,
    tools' fills given BACKGROUND's photo background, softer photos sharpened below FOCUS_BELOW:
    ``fit_frame``).

    Returns (array of the readable ones, their indices into samples, [(path, reason)] of unreadable ones).
    A disk cache keyed by paths, sizes and mtimes makes re-runs skip decoding.
    """
    bg = tuple(background) if background else None
    cpath = cache_path(samples, size, color, frame_ref, bg, focus_below) if use_disk_cache else None
    if cpath is not None and cpath.exists():
        try:
            with np.load(cpath, allow_pickle=False) as z:
                bad = [tuple(x) for x in z["failed"].tolist()] if z["failed"].size else []
                return z["images"], z["ok"].tolist(), bad
        except (OSError, ValueError, KeyError):
            pass
    jobs = [(s.path, size, color, frame_ref, bg, focus_below) for s in samples]
    results = _map_photos(_decode_one, jobs, workers, progress)
    ok = [i for i, (a, _) in enumerate(results) if a is not None]
    failed = [(samples[i].path, err) for i, (a, err) in enumerate(results) if a is None]
    c = 1 if color == "gray" else 3
    images = np.stack([results[i][0] for i in ok]) if ok else np.zeros((0, c, size, size), np.uint8)
    if cpath is not None:
        try:
            cpath.parent.mkdir(parents=True, exist_ok=True)
            tmp = cpath.with_suffix(".tmp.npz")
            np.savez(tmp, images=images, ok=np.asarray(ok, np.int64),
                     failed=np.asarray(failed, dtype=str).reshape(-1, 2))
            os.replace(tmp, cpath)
        except OSError:
            pass
    return images, ok, failed


def _progress(it, total: int, show: bool):
    if not show:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="decode", unit="img", leave=False)
