"""Grad-CAM heat-maps, overlays and fast image encoding.

``explain`` gives the verdict and the heat-map from ONE forward pass: the network
runs up to the CAM layer without autograd, and the gradient of the "bad" logit is
taken only through the tail (global pooling + classifier), which is all Grad-CAM
needs. An exported ONNX model carries the same map as a second output (see
``CamGraph``). Other methods (GradCAM++, EigenCAM) go through pytorch-grad-cam.

Importing this module does not import torch: the rendering half (``normalize_cam``,
``overlay``, ``encode_jpeg``) is shared with the torch-free edge runtime.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from . import data as D

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .inference import ImageSource, Prediction, Predictor

CAM_METHODS = ("gradcam", "gradcam++", "eigencam")
CAM_TARGET = 1          # index of the "bad" logit: heat-maps show evidence for a defect
DISPLAY_SIZE = 512      # longer side of overlays rendered for screens


# ---------------------------------------------------------------- rendering (numpy + Pillow only)

@functools.lru_cache(maxsize=64)
def _linear_taps(n_out: int, n_in: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices i0, i1 and float32 weight of i1 of a half-pixel-centred linear resize
    (cv2.INTER_LINEAR's rule), read OFFSET output pixels further on (the drawing moves by -OFFSET).
    Cached (read-only arrays): a server asks for the same few sizes on every request."""
    src = np.clip((np.arange(n_out, dtype=np.float64) + 0.5 + offset) * (n_in / n_out) - 0.5, 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    taps = (i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32))
    for t in taps:
        t.flags.writeable = False
    return taps


def _resize_linear(a: np.ndarray, H: int, W: int, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Separable linear resize of float32 maps ((N,)h,w) to ((N,)H,W) by gathers and lerps, drawn
    OFFSET (dy, dx) output pixels up and left of the usual half-pixel alignment.

    Columns first, on the small map; then whole rows, so the big passes copy contiguous rows.
    No matrix products: BLAS would start its own threads, which keep spinning after the call
    and slow the next model call on a small CPU (seen: 17 ms -> 61 ms per 448 px heat-map).
    """
    r0, r1, fr = _linear_taps(H, a.shape[-2], float(offset[0]))
    c0, c1, fc = _linear_taps(W, a.shape[-1], float(offset[1]))
    cols = a[..., c0] + (a[..., c1] - a[..., c0]) * fc           # (..., h, W)
    out = cols[..., r0, :]                                       # (..., H, W), a copy
    step = cols[..., r1, :]
    step -= out
    step *= fr[:, None]
    out += step
    return out


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a - a.min(axis=(-2, -1), keepdims=True)
    a /= 1e-7 + a.max(axis=(-2, -1), keepdims=True)
    return a


def normalize_cam(raw: np.ndarray, size: int | tuple[int, int], offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Raw Grad-CAM maps ((N,)h,w) -> float32 ((N,)H,W) in [0, 1], the way pytorch-grad-cam scales them.

    ReLU, min-max scaling, linear upsampling to SIZE (an int or (H, W)), min-max again. OFFSET
    (dy, dx, input pixels; ``models.cam_offset``) draws each cell over the pixels it looks at
    instead (the library's drawing is OFFSET down and right of them); (0, 0) is the library's.
    Float32 throughout (the upsampled values are blends of values in [0, 1], so they stay >= 0).
    """
    H, W = (size, size) if isinstance(size, int) else size
    cam = _minmax(np.maximum(np.asarray(raw, np.float32), np.float32(0.0)))
    return _minmax(_resize_linear(cam, H, W, offset))


SCREEN_GRID = 4   # a screened model's heat-maps: 4x the CAM layer's cells (one-view and full maps, one drawing)


def regrid_cam(raw: np.ndarray, size: tuple[int, int], offset: tuple[float, float],
               to: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Raw maps (N,h,w) drawn at OFFSET -> (N, k h, k w), k = SCREEN_GRID, drawn at TO when scaled to SIZE
    (``normalize_cam(..., TO)``): ReLU, then linear resampling (``normalize_cam`` applies ReLU first too,
    and min-max commutes with it). So maps of a screen's one view and of all views share a batch."""
    h, w = raw.shape[-2:]
    gh, gw = SCREEN_GRID * h, SCREEN_GRID * w
    dy, dx = (offset[0] - to[0]) * gh / size[0], (offset[1] - to[1]) * gw / size[1]
    return _resize_linear(np.maximum(np.asarray(raw, np.float32), np.float32(0.0)), gh, gw, (dy, dx))


def screen_bounds(screen: dict | None, views: int) -> tuple[float, float] | None:
    """(below, above) of a card's one-view screen (``card.screen``), or None where there is none to apply
    (no screen, or a model answering with one view; cards before ``above``: no upper bound)."""
    if not screen or int(views) <= 1:
        return None
    return float(screen["below"]), float(screen.get("above", float("inf")))


def screen_all_views(p1: np.ndarray, below: float, above: float = float("inf")) -> np.ndarray:
    """Which parts a one-view screen leaves to all views (bool N): one-view P(bad) P1 from BELOW up to ABOVE."""
    return (p1 >= below) & ~(p1 > above)


def screened(one: Callable, full: Callable, x: np.ndarray, temperature: float, below: float, above: float,
             size: tuple[int, int], one_offset: tuple[float, float] | None = None,
             full_offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, raw maps or None) of a screened model for batch X: ONE(x) -> (logits, maps or None) of one
    view; FULL the same with all views, run only on the parts the screen leaves (``screen_all_views``).
    With maps (ONE_OFFSET given), every map is regridded to FULL_OFFSET's drawing (``regrid_cam``)."""
    from .evaluate import prob_bad_from_logits

    z, cam = one(x)
    z = np.array(z, np.float32)
    maps = regrid_cam(cam, size, one_offset, full_offset) if cam is not None and one_offset is not None else None
    up = screen_all_views(prob_bad_from_logits(z, temperature), below, above)
    if up.any():
        z_up, cam_up = full(x[up])
        z[up] = z_up
        if maps is not None:
            maps[up] = regrid_cam(cam_up, size, full_offset, full_offset)
    return z, maps


def _jet_lut() -> np.ndarray:
    """256x3 uint8 'jet' colour table (matplotlib's segment data), without needing matplotlib."""
    x = np.linspace(0.0, 1.0, 256)
    r = np.interp(x, [0, 0.35, 0.66, 0.89, 1], [0, 0, 1, 1, 0.5])
    g = np.interp(x, [0, 0.125, 0.375, 0.64, 0.91, 1], [0, 0, 1, 1, 0, 0])
    b = np.interp(x, [0, 0.11, 0.34, 0.65, 1], [0.5, 1, 1, 0, 0])
    return np.round(np.stack([r, g, b], 1) * 255).astype(np.uint8)


_JET = _jet_lut()


def overlay(img: np.ndarray, cam: np.ndarray, size: int | None = None, alpha: float = 0.45,
            box: tuple[int, int, int] | None = None) -> np.ndarray:
    """RGB uint8 overlay of a heat-map on the (gray or RGB) image.

    SIZE is the longer side of the result (default: the image's own size, the full-resolution
    overlay); the aspect ratio is kept. The map covers the model's square input: BOX
    ``(x0, y0, side)`` in image pixels, the part's square of a model that frames on the part
    (``Preprocessing.box``); None, the centred square ``fit_square`` pads a non-square image to.
    Only the part of that square over the image is drawn; image outside it gets no heat.
    """
    h, w = img.shape[:2]
    side = max(h, w)
    scale = (size / side) if size else 1.0
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    base = Image.fromarray(img)
    if (out_w, out_h) != (w, h):
        k = w // out_w
        if k > 1 and w == out_w * k and h == out_h * k:
            base = base.reduce(k)            # exact integer factor: box average, several times faster
        else:
            base = base.resize((out_w, out_h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    base = base.convert("RGB")
    s_h, s_w = cam.shape[-2:]
    x0, y0, bs = box if box is not None else (-((side - w) // 2), -((side - h) // 2), side)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + bs, w), min(y0 + bs, h)   # image pixels under the map
    ox0, oy0 = round(ix0 * out_w / w), round(iy0 * out_h / h)
    ox1, oy1 = round(ix1 * out_w / w), round(iy1 * out_h / h)
    heat = Image.new("L", (out_w, out_h), 0)
    if ox1 > ox0 and oy1 > oy0:
        src = ((ix0 - x0) * s_w / bs, (iy0 - y0) * s_h / bs, (ix1 - x0) * s_w / bs, (iy1 - y0) * s_h / bs)
        part = Image.fromarray(np.round(np.clip(cam, 0, 1) * 255).astype(np.uint8))
        part = part.resize((ox1 - ox0, oy1 - oy0), Image.Resampling.BILINEAR, box=src)
        if (ox0, oy0, ox1, oy1) == (0, 0, out_w, out_h):
            heat = part
        else:
            heat.paste(part, (ox0, oy0))
    colored = Image.frombytes("P", heat.size, heat.tobytes())   # colour table applied in C
    colored.putpalette(_JET.tobytes())
    return np.asarray(Image.blend(base, colored.convert("RGB"), float(alpha)))


def encode_image(arr: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """Encode a uint8 image as JPEG (fast, for screens), PNG (lossless, fast zlib level) or WebP."""
    fmt = fmt.lower()
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    if fmt in ("jpeg", "jpg"):
        im.save(buf, "JPEG", quality=quality)
    elif fmt == "png":
        im.save(buf, "PNG", compress_level=1)
    elif fmt == "webp":
        im.save(buf, "WEBP", quality=quality, method=0)
    else:
        raise ValueError(f"unknown image format {fmt!r}; choose jpeg, png or webp")
    return buf.getvalue()


def encode_jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a uint8 image (a 512 px overlay encodes in about a millisecond)."""
    return encode_image(arr, "jpeg", quality)


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless PNG bytes (zlib level 1: several times faster than Pillow's default level)."""
    return encode_image(arr, "png")


# ---------------------------------------------------------------- one-pass Grad-CAM in torch

@dataclass(frozen=True)
class CamSplit:
    """A classifier cut at its Grad-CAM layer: ``tail(body(x)) == model(x)``."""

    body: nn.Module                       # input -> activation A of the CAM layer (N, C, h, w)
    tail: Callable[[torch.Tensor], torch.Tensor]   # A -> logits
    mlp: tuple | None                     # the layers after global average pooling, when the tail is pool + MLP
    views: int = 1                        # test-time views (``models.dihedral_views``): logits and maps are
                                          # the mean over the views, each map turned back upright
    top: int = 0                          # the logits over the TOP views with the highest bad margin
                                          # (``models.top_views``); 0: all; the maps always over all


def cam_split(model: nn.Module, arch: str, views: int = 1, top: int = 0) -> CamSplit | None:
    """Cut MODEL (the bare network) at ``models.cam_target_layer``; None for architectures without a known cut."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    if arch.startswith("mobilenet_v3"):
        return CamSplit(model.features, lambda a: model.classifier(torch.flatten(model.avgpool(a), 1)),
                        tuple(model.classifier), views, top)
    if arch == "mobilenet_v2":
        return CamSplit(model.features, lambda a: model.classifier(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1)),
                        tuple(model.classifier), views, top)
    if arch.startswith("resnet"):
        body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                             model.layer1, model.layer2, model.layer3, model.layer4)
        return CamSplit(body, lambda a: model.fc(torch.flatten(model.avgpool(a), 1)), (model.fc,), views, top)
    if arch.startswith("squeezenet"):
        return CamSplit(model.features, lambda a: torch.flatten(model.classifier(a), 1), None, views, top)
    return None


def merge_views(logits: torch.Tensor, cam: torch.Tensor, views: int, top: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view logits (V*N, K) and raw maps (V*N, h, w) -> the image's (N, K) and (N, h, w). The logits over all
    views or the TOP with the highest bad margin (``models.merge_view_logits``); the map over all views, turned
    back upright, whose drawing offsets (``models.model_cam_offset``) cancel only as a whole."""
    from .models import merge_view_logits, merge_view_maps

    if views == 1:
        return logits, cam
    return merge_view_logits(logits, views, top), merge_view_maps(cam, views)


def gradcam_torch(split: CamSplit, x: torch.Tensor, target: int = CAM_TARGET,
                  autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, raw Grad-CAM maps (N, h, w)) from one forward pass.

    The body runs under inference mode; only the tail (pooling + classifier) is
    differentiated, from the detached CAM-layer activation to the TARGET logit.
    Thread-safe: no hooks, no module state. With test-time views, each view's map is that
    view's own Grad-CAM; the maps are turned back upright and averaged, the logits averaged.
    """
    import torch

    from .models import dihedral_views

    with torch.inference_mode(), torch.autocast(x.device.type, enabled=autocast):
        a = split.body(dihedral_views(x, split.views))
    a = a.float().clone().requires_grad_(True)   # a normal tensor again, outside inference mode
    with torch.enable_grad():
        logits = split.tail(a)
        (grad,) = torch.autograd.grad(logits[:, target].sum(), a)
    with torch.no_grad():
        w = grad.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((w * a).sum(dim=1))
        return merge_views(logits.detach().float(), cam, split.views, split.top)


def _act_grad(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Derivative of an element-wise activation at its input X (torch's own backward rules)."""
    import torch
    from torch import nn

    if isinstance(layer, nn.Hardswish):
        return torch.where(x < -3, torch.zeros_like(x), torch.where(x <= 3, x / 3 + 0.5, torch.ones_like(x)))
    if isinstance(layer, nn.ReLU):
        return (x > 0).to(x.dtype)
    if isinstance(layer, nn.ReLU6):
        return ((x > 0) & (x < 6)).to(x.dtype)
    return None


def _mlp_supported(mlp: tuple | None) -> bool:
    from torch import nn

    if not mlp:
        return False
    ok = (nn.Linear, nn.Dropout, nn.Identity, nn.Hardswish, nn.ReLU, nn.ReLU6)
    core = [m for m in mlp if not isinstance(m, nn.Dropout | nn.Identity)]
    return all(isinstance(m, ok) for m in mlp) and bool(core) and isinstance(core[-1], nn.Linear)


def make_cam_graph(model: nn.Module, arch: str, target: int = CAM_TARGET, views: int = 1,
                   top: int = 0) -> nn.Module | None:
    """A module whose forward returns (logits, raw Grad-CAM maps) with no autograd, for ONNX export.

    Works where the tail is global pooling + an MLP of Linear / ReLU / Hardswish / Dropout
    layers (MobileNetV2/V3, ResNets): the gradient of the TARGET logit with respect to the
    pooled features is written out by the chain rule, and the Grad-CAM channel weights are that
    gradient divided by h*w. That holds for average pooling and for ``models.AvgMaxPool2d`` alike:
    the max half sends half the gradient to one cell, whose spatial mean is again half of it / h*w.
    VIEWS test-time views (the TOP most suspicious, with TOP) are merged as in ``gradcam_torch``. None for other
    architectures.
    """
    from torch import nn

    from .models import dihedral_views

    split = cam_split(model, arch, views, top)
    if split is None or not _mlp_supported(split.mlp):
        return None

    class CamGraph(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = split.body
            self.pool = getattr(model, "avgpool", None) or nn.AdaptiveAvgPool2d(1)   # the network's own pooling
            self.mlp = nn.ModuleList(split.mlp)

        def forward(self, x):
            a = self.body(dihedral_views(x, views))
            h = self.pool(a).flatten(1)
            slopes = []
            for layer in self.mlp:
                # the activation's slope is taken before the layer runs: torchvision's are in-place
                slopes.append(_act_grad(layer, h))
                h = layer(h)
            g = None
            for layer, slope in zip(reversed(self.mlp), reversed(slopes), strict=True):
                if isinstance(layer, nn.Linear):
                    g = layer.weight[target:target + 1] if g is None else g @ layer.weight
                elif g is not None and slope is not None:
                    g = g * slope
            w = g / (a.shape[2] * a.shape[3])
            cam = (a * w[:, :, None, None]).sum(dim=1).relu()
            return merge_views(h, cam, views, top)

    return CamGraph().eval()


# ---------------------------------------------------------------- the pytorch-grad-cam family

def _cam_class(method: str):
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus

    try:
        return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}[method]
    except KeyError:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}") from None


def _library_cam(predictor: Predictor, x: np.ndarray, method: str, target: int) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N,H,W), logits) from pytorch-grad-cam on the predictor's private hook-safe model copy."""
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from .models import cam_target_layer

    cls = _cam_class(method)
    model, lock = predictor.hookable_model()
    t = torch.from_numpy(np.ascontiguousarray(x)).to(predictor.device)
    with lock, cls(model=model, target_layers=[cam_target_layer(model, predictor.card.arch)]) as cam:
        # maps at the CAM layer's own resolution (the library's resize becomes a no-op), scaled below like ours
        cam.get_target_width_height = lambda _t: tuple(cam.activations_and_grads.activations[0].shape[:-3:-1])
        maps = cam(input_tensor=t, targets=[ClassifierOutputTarget(target)] * len(t))
        logits = cam.outputs.detach().float().cpu().numpy()
    if predictor.card.tta > 1:
        # the library's map is the upright view's; the verdict is the model's own, over all its views
        logits = predictor.logits(x)
    return normalize_cam(maps, x.shape[-2:], predictor.upright_cam_offset), logits


def cam_library(predictor: Predictor, x: np.ndarray, method: str = "gradcam", target: int = CAM_TARGET) -> np.ndarray:
    """Heat-map (HxW in [0,1], model input size) from pytorch-grad-cam for the class TARGET; X is CxHxW."""
    return _library_cam(predictor, x[None], method, target)[0][0]


def cam_fast(predictor: Predictor, x: np.ndarray, target: int = CAM_TARGET) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N,2), Grad-CAM maps (N,H,W) in [0,1]) for a float32 NxCxHxW batch, from one forward pass."""
    logits, raw = predictor.forward_cam(x, target)
    return logits, normalize_cam(raw, x.shape[-2:], predictor.cam_offset)


# ---------------------------------------------------------------- explain

@dataclass
class Explanation:
    prediction: Prediction
    cam: np.ndarray          # HxW float32 in [0, 1] at the model's input size
    image: np.ndarray        # the decoded uint8 image (model colour mode, original size)
    timings_ms: dict = field(default_factory=dict)
    cam_offset: tuple[float, float] = (0.0, 0.0)   # where the map was drawn (``models.cam_offset``)
    box: tuple[int, int, int] | None = None         # the image square the map covers (``overlay``'s BOX)


def explain(predictor: Predictor, src: ImageSource, method: str = "gradcam") -> Explanation:
    """Verdict and heat-map for one image; the verdict comes from the same forward pass as the map."""
    from .evaluate import prob_bad_from_logits

    if method not in CAM_METHODS:
        _cam_class(method)
    t0 = time.perf_counter()
    img = predictor.load(src)
    t1 = time.perf_counter()
    prep = getattr(predictor, "prep", None)
    if prep is not None:
        ready = prep.prepare(img)
        x, box, notes, held, check_ms = ready.x, ready.box, ready.notes, ready.held, ready.check_ms
    else:   # a predictor without a card's preprocessing: the photo checked on its own
        x, box, notes, held, check_ms = predictor.preprocess(img), None, None, False, 0.0
    x = x[None]
    t2 = time.perf_counter()
    if method == "gradcam" and predictor.has_fast_cam:
        logits, raw = predictor.forward_cam(x, CAM_TARGET)
        t3 = time.perf_counter()
        offset = predictor.cam_offset
        cam = normalize_cam(raw, x.shape[-2:], offset)[0]
    else:
        maps, logits = _library_cam(predictor, x, method, CAM_TARGET)
        t3 = time.perf_counter()
        offset = predictor.upright_cam_offset
        cam = maps[0].astype(np.float32)
    t4 = time.perf_counter()
    p = float(prob_bad_from_logits(logits, predictor.card.temperature)[0])
    ms = {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3 - check_ms, "model_cam": (t3 - t2) * 1e3,
          "cam_scale": (t4 - t3) * 1e3}
    if notes is None:
        t5 = time.perf_counter()
        notes, held = D.photo_check(img)
        check_ms = (time.perf_counter() - t5) * 1e3
    ms["photo_check"] = check_ms
    pred = predictor.verdict(p, ms["preprocess"] + ms["model_cam"] + ms["cam_scale"],
                             {"preprocess": ms["preprocess"], "model": ms["model_cam"]}, notes, held)
    return Explanation(pred, cam, img, {k: round(v, 3) for k, v in ms.items()}, offset, box)
