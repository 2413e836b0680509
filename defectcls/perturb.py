"""Named perturbations of decoded photos, and scoring a model under each of them.

A perturbation stands for what a line's camera does on a bad day: the light, the focus,
the compression, the sensor or the part's pose drift. It takes a decoded uint8 image
(HxW or HxWx3) at its native resolution and a seeded generator and returns a uint8 image
of the same shape; it is applied *before* the shared preprocessing, as the drift happens
before the photo reaches us.

Units: brightness is a gain (``brightness+25%`` multiplies by 1.25), contrast a factor around
the image mean, gamma the exponent of ``(x/255)**g``, blur a Gaussian sigma in pixels of a
300 px image (scaled with the image side: ``sigma_px = s * side / 300``), JPEG a quality,
noise a Gaussian sigma in 8-bit levels, rotation degrees counter-clockwise, scale the
apparent size of the part (0.9: 10% smaller, around the centre), shift a fraction of the
side. Geometric changes fill uncovered pixels with the image's own background: the median
of its border pixels (the real photos have a light background, synthetic ones a dark one);
the ``fills`` group repeats three pose changes with black, white, mirrored and edge fills.

Beside the registered names (``PERTURBATIONS``, in groups), any magnitude or combination is a name composed
of steps joined by ``+`` (``GRAMMAR``, ``compose``): ``blur2.5+jpeg25``, ``noise16``,
``rotate_any+scale0.8+shift_y+6%_black``.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from . import data as D
from .errors import DefectclsError, ImageLoadError

Perturbation = Callable[[np.ndarray, np.random.Generator], np.ndarray]
CLEAN = "clean"
BORDER_FRAC = 0.02     # width of the border ring that estimates the background, fraction of the side
ROW_KEYS = ("fnr", "fpr", "fn", "fp", "n_bad", "n_good", "held_bad", "held_good", "auroc", "ece", "fpr_at_no_miss")


# ---------------------------------------------------------------- primitives

def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def background(img: np.ndarray) -> np.ndarray:
    """Per-channel median of the image's border ring (float, shape (C,)): the fill for uncovered pixels."""
    return D.border_median(img, BORDER_FRAC)


def brightness(img: np.ndarray, gain: float) -> np.ndarray:
    """Multiply every pixel by GAIN (more or less light), clipped to 8 bits."""
    return _u8(img.astype(np.float32) * gain)


def contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """Scale the deviations from the image mean by FACTOR (0.7: 30% less contrast)."""
    x = img.astype(np.float32)
    m = x.mean()
    return _u8(m + (x - m) * factor)


def gamma(img: np.ndarray, g: float) -> np.ndarray:
    """255 * (x/255) ** G: G < 1 brightens the dark tones, G > 1 darkens them."""
    lut = _u8(255.0 * (np.arange(256) / 255.0) ** g)
    return lut[img]


def blur(img: np.ndarray, sigma300: float) -> np.ndarray:
    """Gaussian focus blur of sigma SIGMA300 pixels at a 300 px side (scaled with the image size)."""
    from scipy.ndimage import gaussian_filter

    s = sigma300 * min(img.shape[:2]) / 300.0
    if s <= 0:
        return img.copy()
    sig = (s, s) if img.ndim == 2 else (s, s, 0)
    return _u8(gaussian_filter(img.astype(np.float32), sigma=sig, mode="nearest"))


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG at QUALITY and decode again (block and ringing artefacts)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("L" if img.ndim == 2 else "RGB"))


def noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add Gaussian sensor noise of SIGMA 8-bit levels, drawn from RNG."""
    return _u8(img.astype(np.float32) + rng.normal(0.0, sigma, img.shape).astype(np.float32))


FILLS = ("background", "black", "white", "reflect", "edge")


def affine(img: np.ndarray, angle: float = 0.0, scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0),
           fill: str = "background", squash: float = 1.0, squash_angle: float = 0.0) -> np.ndarray:
    """Rotate by ANGLE degrees (counter-clockwise) and zoom by SCALE around the centre, then move by SHIFT.

    SQUASH < 1 then shrinks the photo to that share of its extent along the direction SQUASH_ANGLE
    degrees from the x axis (a camera looking at the part off its axis: a round part turns elliptical).
    SHIFT is (dx, dy) in fractions of the width and height (positive: right, down). The
    canvas keeps its size; uncovered pixels get FILL: the image's background (``background``,
    the default), ``black``, ``white``, the photo mirrored across its edge (``reflect``) or its
    nearest edge pixel (``edge``), the choices image tools make. Bilinear; a quarter turn of a
    square image is exact (equals ``np.rot90``).
    """
    if fill not in FILLS:
        raise DefectclsError(f"unknown fill {fill!r}; choose from: {', '.join(FILLS)}")
    h, w = img.shape[:2]
    const = {"black": 0.0, "white": 255.0}.get(fill)
    bg = background(img) if const is None else np.full(1 if img.ndim == 2 else img.shape[2], const)
    fill_color = int(round(float(bg[0]))) if img.ndim == 2 else tuple(int(round(float(v))) for v in bg)
    pad = max(h, w) // 2 if fill in ("reflect", "edge") else 0
    src = img
    if pad:
        src = np.pad(img, ((pad, pad), (pad, pad)) + ((0, 0),) * (img.ndim - 2),
                     mode="reflect" if fill == "reflect" else "edge")
    cx, cy = w / 2.0, h / 2.0
    tx, ty = shift[0] * w, shift[1] * h
    a = -math.radians(angle)
    cos, sin = round(math.cos(a), 15) / scale, round(math.sin(a), 15) / scale
    # output -> input: in = M (out - c - t) + c, the matrix Pillow's own rotate() builds, divided by the zoom
    m = [cos, sin, 0.0, -sin, cos, 0.0]
    if squash != 1.0:   # the output's coordinates are first stretched by 1/SQUASH along the direction d
        b = math.radians(squash_angle)
        d = np.array([math.cos(b), -math.sin(b)])    # in image coordinates (y down)
        lin = np.array([m[:2], m[3:5]]) @ (np.eye(2) + (1.0 / squash - 1.0) * np.outer(d, d))
        m[:2], m[3:5] = lin[0].tolist(), lin[1].tolist()
    m[2] = m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] = m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    m[2], m[5] = m[2] + pad, m[5] + pad     # the padded source starts PAD pixels earlier on both axes
    out = Image.fromarray(src).transform((w, h), Image.Transform.AFFINE, m, Image.Resampling.BILINEAR,
                                         fillcolor=fill_color)
    return np.asarray(out)


# ---------------------------------------------------------------- the registry

def _chain(*steps: Perturbation) -> Perturbation:
    def run(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for step in steps:
            img = step(img, rng)
        return img

    return run


def _any_angle(img: np.ndarray, rng: np.random.Generator, **kw) -> np.ndarray:
    return affine(img, angle=float(rng.uniform(0.0, 360.0)), **kw)


def _registry() -> dict[str, Perturbation]:
    P: dict[str, Perturbation] = {}
    for pct in (-25, -15, 15, 25):
        P[f"brightness{pct:+d}%"] = lambda im, _r, g=1 + pct / 100: brightness(im, g)
    for pct in (-30, 25):
        P[f"contrast{pct:+d}%"] = lambda im, _r, f=1 + pct / 100: contrast(im, f)
    for g in (0.7, 1.4):
        P[f"gamma{g:g}"] = lambda im, _r, g=g: gamma(im, g)
    for s in (0.75, 1.5):
        P[f"blur{s:g}"] = lambda im, _r, s=s: blur(im, s)
    for q in (50, 30):
        P[f"jpeg{q}"] = lambda im, _r, q=q: jpeg(im, q)
    for s in (4, 8):
        P[f"noise{s}"] = lambda im, r, s=s: noise(im, s, r)
    for a in (37, 90, 200):
        P[f"rotate{a}"] = lambda im, _r, a=a: affine(im, angle=a)
    P["rotate_any"] = _any_angle
    for s in (0.9, 1.1):
        P[f"scale{s:g}"] = lambda im, _r, s=s: affine(im, scale=s)
    P["shift_x+5%"] = lambda im, _r: affine(im, shift=(0.05, 0.0))
    P["shift_y-5%"] = lambda im, _r: affine(im, shift=(0.0, -0.05))
    P["shift_xy-3.5%"] = lambda im, _r: affine(im, shift=(-0.035, -0.035))
    # a few drifts that come together on a real line
    P["brightness+20%+noise6"] = _chain(lambda im, _r: brightness(im, 1.2), lambda im, r: noise(im, 6, r))
    P["brightness-20%+contrast-20%"] = _chain(lambda im, _r: brightness(im, 0.8), lambda im, _r: contrast(im, 0.8))
    P["gamma1.3+blur1+noise4"] = _chain(lambda im, _r: gamma(im, 1.3), lambda im, _r: blur(im, 1.0),
                                        lambda im, r: noise(im, 4, r))
    P["blur1+jpeg40"] = _chain(lambda im, _r: blur(im, 1.0), lambda im, _r: jpeg(im, 40))
    P["rotate_any+scale0.92+shift_x-3%"] = lambda im, r: _any_angle(im, r, scale=0.92, shift=(-0.03, 0.0))
    P["rotate_any+scale1.08+shift_y+3%"] = lambda im, r: _any_angle(im, r, scale=1.08, shift=(0.0, 0.03))
    return P


def _stronger() -> dict[str, Perturbation]:
    """Past the line's usual drift: a bad day's magnitudes, to see where a model breaks (opt-in group)."""
    return {
        "brightness-40%": lambda im, _r: brightness(im, 0.6),
        "brightness+40%": lambda im, _r: brightness(im, 1.4),
        "contrast-45%": lambda im, _r: contrast(im, 0.55),
        "gamma0.55": lambda im, _r: gamma(im, 0.55),
        "gamma1.7": lambda im, _r: gamma(im, 1.7),
        "blur2": lambda im, _r: blur(im, 2.0),
        "jpeg20": lambda im, _r: jpeg(im, 20),
        "noise12": lambda im, r: noise(im, 12, r),
        "scale0.85": lambda im, _r: affine(im, scale=0.85),
        "scale1.15": lambda im, _r: affine(im, scale=1.15),
        "shift_xy+7%": lambda im, _r: affine(im, shift=(0.07, 0.07)),
        "rot+scale0.88+shift5%": lambda im, r: _any_angle(im, r, scale=0.88, shift=(0.05, -0.03)),
    }


def _fills() -> dict[str, Perturbation]:
    """The line's pose changes with the fills other tools use for the uncovered corners (opt-in group):
    a model should judge the part, not the corners."""
    P: dict[str, Perturbation] = {}
    for fill in FILLS[1:]:
        P[f"rotate37_{fill}"] = lambda im, _r, f=fill: affine(im, angle=37, fill=f)
        P[f"scale0.9_{fill}"] = lambda im, _r, f=fill: affine(im, scale=0.9, fill=f)
        P[f"rotate_any+scale0.92+shift_x-3%_{fill}"] = \
            lambda im, r, f=fill: _any_angle(im, r, scale=0.92, shift=(-0.03, 0.0), fill=f)
    return P


def _slanted(img: np.ndarray, rng: np.random.Generator, squash: float, turn: bool = False, **kw) -> np.ndarray:
    """IMG squashed to SQUASH along a random direction (drawn first), with TURN also at a random angle."""
    kw["squash_angle"] = float(rng.uniform(0.0, 180.0))
    return _any_angle(img, rng, squash=squash, **kw) if turn else affine(img, squash=squash, **kw)


def _slants() -> dict[str, Perturbation]:
    """The camera off the part's axis (opt-in group): each photo squashed along a random direction, so a
    round part looks elliptical, as in a photo taken at an angle (affine: the near side is not enlarged)."""
    P: dict[str, Perturbation] = {f"slant{q:g}": lambda im, r, q=q: _slanted(im, r, q) for q in (0.9, 0.8, 0.65)}
    P["slant0.8+rotate_any+scale0.92"] = lambda im, r: _slanted(im, r, 0.8, turn=True, scale=0.92)
    return P


LINE: dict[str, Perturbation] = _registry()          # the default set: the drifts a line sees
STRONGER: dict[str, Perturbation] = _stronger()      # ``--perturb-names stronger``
FILLED: dict[str, Perturbation] = _fills()           # ``--perturb-names fills``
SLANTED: dict[str, Perturbation] = _slants()         # ``--perturb-names slant``
PERTURBATIONS: dict[str, Perturbation] = {**LINE, **STRONGER, **FILLED, **SLANTED}
GROUPS = {"line": list(LINE), "stronger": list(STRONGER), "fills": list(FILLED), "slant": list(SLANTED),
          "all": list(PERTURBATIONS)}


# ---------------------------------------------------------------- composed names

GRAMMAR = ("steps joined by '+': brightness+N% or -N%, contrast+N% or -N%, gammaG, blurS (sigma at 300 px), jpegQ, "
           "noiseS (8-bit levels), rotateA (degrees) or rotate_any, scaleS, shift_x/shift_y/shift_xy+N% or -N%, "
           "slantQ (0 < Q <= 1), then optionally _black, _white, _reflect or _edge for the corners a pose uncovers; "
           "e.g. blur2.5+jpeg25, rotate_any+scale0.8+shift_y+6%_black")
_NUM = r"\d+(?:\.\d+)?"
_STEP = re.compile(rf"(?P<light>brightness|contrast)(?P<pct>[+-]{_NUM})%|(?P<shift>shift_(?:xy|x|y))(?P<frac>[+-]{_NUM})%"
                   rf"|rotate(?P<angle>{_NUM}|_any)|(?P<kind>gamma|blur|jpeg|noise|scale|slant)(?P<val>{_NUM})")
_FILL_END = re.compile(r"_(black|white|reflect|edge)$")
_POSE = ("rotate", "scale", "shift", "slant")


def _photo_step(kind: str, v: float, step: str) -> Perturbation:
    """One photometric step, its magnitude checked."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise DefectclsError(f"perturbation step {step!r}: {what}")

    if kind == "brightness":
        need(v > -100, "the light cannot fall by 100% or more")
        return lambda im, _r: brightness(im, 1 + v / 100)
    if kind == "contrast":
        need(v >= -100, "contrast cannot fall by more than 100%")
        return lambda im, _r: contrast(im, 1 + v / 100)
    if kind == "gamma":
        need(v > 0, "gamma must be above 0")
        return lambda im, _r: gamma(im, v)
    if kind == "blur":
        need(v > 0, "blur sigma must be above 0")
        return lambda im, _r: blur(im, v)
    if kind == "jpeg":
        need(v == int(v) and 1 <= v <= 100, "JPEG quality is a whole number from 1 to 100")
        return lambda im, _r: jpeg(im, int(v))
    need(v > 0, "noise sigma must be above 0")
    return lambda im, r: noise(im, v, r)


def _pose_step(pose: dict, fill: str) -> Perturbation:
    """Turn, zoom, shift and slant of one pose as one resampling (the registry's combined poses do the same)."""
    angle, scale, squash = pose.get("rotate", 0.0), pose.get("scale", 1.0), pose.get("slant", 1.0)
    shift = pose.get("shift", (0.0, 0.0))

    def run(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        kw = {"scale": scale, "shift": shift, "fill": fill}
        if squash != 1.0:       # the squash direction is drawn first, then any turn (as ``_slanted``)
            kw.update(squash=squash, squash_angle=float(rng.uniform(0.0, 180.0)))
        return _any_angle(img, rng, **kw) if angle == "any" else affine(img, angle=angle, **kw)

    return run


@functools.lru_cache(maxsize=256)      # parsed once a name, not once a photo (``apply``)
def compose(name: str) -> Perturbation:
    """The perturbation a composed NAME describes (``GRAMMAR``): photometric steps in the order given, and
    neighbouring pose steps (rotate, scale, shift, slant) as one resampling, with the fill at the end of the name
    for every pose; a registered name composes to the same pixels. Raises DefectclsError naming what is wrong."""
    fill = "background"
    m = _FILL_END.search(name)
    body = name[:m.start()] if m else name
    if m:
        fill = m.group(1)
    steps: list[Perturbation | None] = []
    pose: dict | None = None        # the pose being read, built into steps[pose_at] when a photometric step ends it
    pose_at, posed = 0, False
    pos = 0
    while True:
        s = _STEP.match(body, pos)
        if not s:
            raise DefectclsError(f"unknown perturbation {name!r}: no step at {body[pos:]!r}; {GRAMMAR}")
        step = s.group(0)
        kind = s.group("light") or s.group("kind") or ("shift" if s.group("shift") else "rotate")
        if kind in _POSE:
            if pose is None:
                pose, pose_at, posed = {}, len(steps), True
                steps.append(None)
            if kind in pose:
                raise DefectclsError(f"perturbation {name!r}: {kind} given twice in one pose")
            if kind == "rotate":
                a = s.group("angle")
                pose[kind] = "any" if a == "_any" else float(a)
            elif kind == "shift":
                f = float(s.group("frac")) / 100
                if abs(f) >= 0.5:
                    raise DefectclsError(f"perturbation step {step!r}: a shift is under 50% of the side")
                axis = s.group("shift")[len("shift_"):]
                pose[kind] = (f if "x" in axis else 0.0, f if "y" in axis else 0.0)
            else:
                v = float(s.group("val"))
                if kind == "scale" and not 0.2 <= v <= 5:
                    raise DefectclsError(f"perturbation step {step!r}: scale from 0.2 to 5")
                if kind == "slant" and not 0 < v <= 1:
                    raise DefectclsError(f"perturbation step {step!r}: slant Q with 0 < Q <= 1")
                pose[kind] = v
        else:
            if pose is not None:
                steps[pose_at], pose = _pose_step(pose, fill), None
            steps.append(_photo_step(kind, float(s.group("pct") or s.group("val")), step))
        pos = s.end()
        if pos == len(body):
            break
        if body[pos] != "+" or pos + 1 == len(body):
            where = "a fill goes at the end of the name" if body[pos] == "_" else "steps are joined by '+'"
            raise DefectclsError(f"unknown perturbation {name!r}: {where}; {GRAMMAR}")
        pos += 1
    if pose is not None:
        steps[pose_at] = _pose_step(pose, fill)
    if m and not posed:
        raise DefectclsError(f"perturbation {name!r}: a fill ({fill}) needs a pose step (rotate, scale, shift, slant)")
    return steps[0] if len(steps) == 1 else _chain(*steps)


def get(name: str) -> Perturbation:
    """The registered perturbation NAME, or the one its steps compose (``compose``)."""
    return PERTURBATIONS.get(name) or compose(name)


def resolve_names(names: Sequence[str] | str | None) -> list[str]:
    """Perturbation names to run: the line's set when NAMES is None; a comma-separated string or a list
    otherwise, where a group name (``line``, ``stronger``, ``fills``, ``slant``, ``all``) stands for its members
    and any other name is registered or composed of steps (``GRAMMAR``)."""
    if names is None:
        return list(LINE)
    if isinstance(names, str):
        names = [n for n in (s.strip() for s in names.split(",")) if n]
    names = [m for n in names for m in GROUPS.get(n, [n])]
    unknown, errors = [], []
    for n in dict.fromkeys(names):
        if n in PERTURBATIONS:
            continue
        try:
            compose(n)
        except DefectclsError as exc:
            unknown.append(n)
            errors.append(str(exc))
    if unknown:
        raise DefectclsError(f"unknown perturbation(s) {', '.join(unknown)}: {' | '.join(errors)} "
                             f"(the registered names and groups: --perturb-names list)")
    if not names:
        raise DefectclsError("no perturbation named")
    return list(dict.fromkeys(names))


def perturbation_rng(seed: int, name: str, key: str) -> np.random.Generator:
    """The generator for perturbation NAME of image KEY: the same draw whatever else is evaluated."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(key.encode())])


def apply(name: str, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Perturbation NAME of a decoded uint8 image (``clean`` returns it unchanged)."""
    if name == CLEAN:
        return img
    return get(resolve_names([name])[0])(img, rng)


# ---------------------------------------------------------------- scoring

def evaluate_perturbed(model_dir: str | os.PathLike, data_root: str | os.PathLike, split: str = "auto",
                       names: Sequence[str] | str | None = None, seed: int = 0, threshold: float | None = None,
                       predictor=None, batch_size: int = 32, progress: bool = False) -> dict:
    """Metrics of MODEL_DIR on DATA_ROOT, clean and under each perturbation, at the card's threshold.

    The images are those ``scoring.select_split`` picks (with 'auto', the model's own held-out
    test part when DATA_ROOT is its training folder). Each image is decoded once; every
    perturbation works on that decoded array in memory and goes through the model's own
    preprocessing and photo check (held photos judged bad: ``data.photo_check``). Returns {model_id,
    split, threshold, seed, n, rows: [{name, fnr, fpr, fn, fp, n_bad, n_good, held_bad, held_good, auroc,
    ece, fpr_at_no_miss}], worst: {fnr, fpr}, skipped, seconds, scores}; rows[0] is ``clean``. On a part of a split
    that kept copies of one photo together, each row also counts shots (``evaluate.shot_counts``: bad_shots,
    missed_shots, good_shots, rejected_shots, rejected_shots_upper95).
    ``scores`` holds each photo's path, label, P(bad) and hold per perturbation (``write_report`` puts it
    in perturb_scores.csv: which parts flip, and under what).
    """
    from .evaluate import compute_metrics, shot_counts
    from .inference import Predictor
    from .scoring import select_split, split_copy_groups

    t0 = time.perf_counter()
    pred = predictor or Predictor(model_dir)
    cols = [CLEAN, *resolve_names(names)]
    fns = {name: get(name) for name in cols[1:]}     # looked up (or parsed) once, not once a photo
    samples, used = select_split(model_dir, data_root, D.scan_folder(data_root), split)
    probs: dict[str, list[np.ndarray]] = {n: [] for n in cols}
    holds: dict[str, list[np.ndarray]] = {n: [] for n in cols}
    ys: list[int] = []
    paths: list[str] = []
    skipped: list[dict] = []
    chunks = range(0, len(samples), batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="perturb", unit="batch", leave=False)
    for i in chunks:
        imgs, keys = [], []
        for s in samples[i:i + batch_size]:
            try:
                imgs.append(pred.load(s.path))
            except ImageLoadError as exc:
                skipped.append({"path": s.path, "error": str(exc)})
                continue
            keys.append(os.path.basename(s.path))
            ys.append(s.label)
            paths.append(s.path)
        if not imgs:
            continue
        for name in cols:
            ready = [pred.prep.prepare(img if name == CLEAN else fns[name](img, perturbation_rng(seed, name, k)))
                     for img, k in zip(imgs, keys, strict=True)]
            probs[name].append(pred.probs(np.stack([r.x for r in ready])))
            holds[name].append(np.array([r.held for r in ready], bool))
    if not ys:
        raise DefectclsError(f"no readable images in {data_root}")
    y = np.asarray(ys)
    thr = pred.threshold if threshold is None else float(threshold)
    rows, p_bad = [], {name: np.concatenate(probs[name]) for name in cols}
    held = {name: np.concatenate(holds[name]) for name in cols}
    groups = split_copy_groups(model_dir, data_root, paths) if used != "all" else None
    for name in cols:
        m = compute_metrics(y, p_bad[name], thr, held[name])
        shots = shot_counts(groups, y, p_bad[name], thr, held[name]) if groups is not None else {}
        rows.append({"name": name, **{k: m[k] for k in ROW_KEYS}, **shots})
    worst = {}
    for k in ("fnr", "fpr"):
        if len(rows) > 1:
            top = max(_nan_low(r[k]) for r in rows[1:])
            tied = [r["name"] for r in rows[1:] if _nan_low(r[k]) == top]
            worst[k] = {"name": tied[0], "value": rows[cols.index(tied[0])][k], "ties": len(tied) - 1}
    return {"model_id": pred.model_id, "model_dir": str(model_dir), "data": str(data_root), "split": used,
            "threshold": thr, "seed": seed, "n": int(len(y)), "rows": rows, "worst": worst,
            "skipped": skipped, "seconds": round(time.perf_counter() - t0, 1),
            "scores": {"path": paths, "label": ys, "p_bad": p_bad, "held": held}}


def _nan_low(v: float) -> float:
    return -1.0 if v is None or not math.isfinite(v) else v


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def worst_name(w: dict) -> str:
    """'rotate37', or 'rotate37 and 3 more' when several perturbations share the worst rate."""
    return w["name"] + (f" and {w['ties']} more" if w.get("ties") else "")


def format_table(res: dict) -> str:
    """The perturbation result as a markdown table (one row per perturbation, clean first)."""
    from .evaluate import count_text

    lines = [f"{res['model_id']} on {res['data']} ({res['split']}, n={res['n']}), threshold {res['threshold']:.4f}, "
             f"seed {res['seed']}", "",
             "| perturbation | FNR | missed bad | FPR | rejected good | held bad / good | AUROC | FPR at no miss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        missed = count_text(r["fn"], r["n_bad"], r.get("missed_shots"), r.get("bad_shots"))
        rejected = count_text(r["fp"], r["n_good"], r.get("rejected_shots"), r.get("good_shots"))
        lines.append(f"| {r['name']} | {_fmt(r['fnr'])} | {missed} | {_fmt(r['fpr'])} | {rejected} | "
                     f"{r.get('held_bad', 0)} / {r.get('held_good', 0)} | "
                     f"{_fmt(r['auroc'])} | {_fmt(r.get('fpr_at_no_miss'))} |")
    lines += ["", "FPR at no miss: that of the best threshold set on these photos themselves to miss none of their "
                  "bad parts; how well the scores rank under the variation, whatever the card's threshold."]
    if res["rows"] and "good_shots" in res["rows"][0]:
        lines += ["", "Shots: copies of one photo (turned, mirrored, zoomed, relit) counted once; a shot is missed or "
                      "rejected when any of its copies is. A part of a few dozen shots rejects good parts a shot at a "
                      "time."]
    w = res.get("worst") or {}
    if w:
        lines += ["", f"worst FNR {_fmt(w['fnr']['value'])} ({worst_name(w['fnr'])}), "
                      f"worst FPR {_fmt(w['fpr']['value'])} ({worst_name(w['fpr'])})"]
    if res.get("skipped"):
        lines.append(f"skipped {len(res['skipped'])} unreadable file(s)")
    return "\n".join(lines)


def summary(res: dict) -> dict:
    """RES without its per-photo ``scores``: what --json prints and perturb.json holds."""
    return {k: v for k, v in res.items() if k != "scores"}


def write_report(res: dict, report_dir: str | os.PathLike) -> list[str]:
    """perturb.md (table), perturb.json (the result), perturb_scores.csv (each photo's P(bad) under each
    perturbation) and perturb.png (FNR/FPR bars) in REPORT_DIR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import to_json, write_scores_csv

    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perturb.md").write_text("# Scores under perturbations\n\n" + format_table(res)
                                    + "\n\n![FNR and FPR per perturbation](perturb.png)\n", encoding="utf-8")
    (out / "perturb.json").write_text(to_json(summary(res)) + "\n", encoding="utf-8")
    names = [r["name"] for r in res["rows"]]
    sc = res["scores"]
    held = sc.get("held") or {}
    write_scores_csv(out / "perturb_scores.csv", sc["path"], sc["label"],
                     {**{n: sc["p_bad"][n] for n in names},
                      **{f"{n} held": ["yes" if v else "no" for v in held[n]] for n in names if np.any(held.get(n, []))}})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(names)), 4))
    xs = np.arange(len(names))
    for off, key, label in ((-0.2, "fnr", "FNR (bad parts missed)"), (0.2, "fpr", "FPR (good parts rejected)")):
        ax.bar(xs + off, [max(0.0, _nan_low(r[key])) for r in res["rows"]], width=0.4, label=label)
    ax.set_xticks(xs, names, rotation=75, ha="right", fontsize=7)
    ax.set(ylabel="rate", title=f"{res['model_id']} under perturbations")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perturb.png", dpi=100)
    plt.close(fig)
    return [str(out / f) for f in ("perturb.md", "perturb.json", "perturb_scores.csv", "perturb.png")]
