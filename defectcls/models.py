"""Architecture registry, 1-channel stems, pretrained adaptation and the model directory.

A model directory holds ``model.safetensors`` (weights only) and ``card.json``;
loading reads everything from the card and never unpickles anything.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import shutil
import tempfile
import urllib.error
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .errors import ModelLoadError

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ArchSpec:
    name: str
    stem: Callable[[nn.Module], tuple[nn.Module, str]]      # (parent, attribute) of the first conv
    head: Callable[[nn.Module], tuple[nn.Module, str]]      # (parent, attribute) of the last layer
    cam_layer: Callable[[nn.Module], nn.Module]             # Grad-CAM target layer
    bn_momentum: float | None = None                        # set for from-scratch training


def _idx(parent_fn, attr):
    return lambda m: (parent_fn(m), attr)


ARCHS: dict[str, ArchSpec] = {
    "mobilenet_v3_large": ArchSpec("mobilenet_v3_large", _idx(lambda m: m.features[0], "0"),
                                   _idx(lambda m: m.classifier, "3"), lambda m: m.features[-1], 0.1),
    "mobilenet_v3_small": ArchSpec("mobilenet_v3_small", _idx(lambda m: m.features[0], "0"),
                                   _idx(lambda m: m.classifier, "3"), lambda m: m.features[-1], 0.1),
    "mobilenet_v2": ArchSpec("mobilenet_v2", _idx(lambda m: m.features[0], "0"),
                             _idx(lambda m: m.classifier, "1"), lambda m: m.features[-1]),
    "resnet18": ArchSpec("resnet18", _idx(lambda m: m, "conv1"), _idx(lambda m: m, "fc"), lambda m: m.layer4[-1]),
    "resnet50": ArchSpec("resnet50", _idx(lambda m: m, "conv1"), _idx(lambda m: m, "fc"), lambda m: m.layer4[-1]),
    "squeezenet1_1": ArchSpec("squeezenet1_1", _idx(lambda m: m, "features"), _idx(lambda m: m.classifier, "1"),
                              lambda m: m.features[-1]),
}


def arch_spec(arch: str) -> ArchSpec:
    try:
        return ARCHS[arch]
    except KeyError:
        raise ModelLoadError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}") from None


def _get(parent: nn.Module, attr: str) -> nn.Module:
    return parent[int(attr)] if attr.isdigit() else getattr(parent, attr)


def _set(parent: nn.Module, attr: str, module: nn.Module) -> None:
    if attr.isdigit():
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)


def _stem_conv(model: nn.Module, spec: ArchSpec) -> tuple[nn.Module, str, nn.Conv2d]:
    parent, attr = spec.stem(model)
    conv = _get(parent, attr)
    if isinstance(conv, nn.Sequential):  # squeezenet: features[0]
        parent, attr, conv = conv, "0", conv[0]
    return parent, attr, conv


def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """RGB stem weights to IN_CHANS inputs: 1 channel sums the RGB kernels (as timm does)."""
    if in_chans == weight.shape[1]:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // weight.shape[1])
    w = weight.repeat(1, reps, 1, 1)[:, :in_chans]
    return w * (weight.shape[1] / float(in_chans))


def _replace_stem(model: nn.Module, spec: ArchSpec, in_chans: int) -> None:
    parent, attr, conv = _stem_conv(model, spec)
    if conv.in_channels == in_chans:
        return
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_chans, conv.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _set(parent, attr, new)


def _replace_head(model: nn.Module, spec: ArchSpec, num_classes: int) -> None:
    parent, attr = spec.head(model)
    old = _get(parent, attr)
    if isinstance(old, nn.Linear):
        _set(parent, attr, nn.Linear(old.in_features, num_classes))
    else:
        _set(parent, attr, nn.Conv2d(old.in_channels, num_classes, kernel_size=1))


def pretrained_state_dict(arch: str, source: str | None = None) -> dict[str, torch.Tensor]:
    """ImageNet weights from torchvision (download or its cache), or from a local file SOURCE.

    A local file must be safetensors or a plain state dict (loaded with weights_only=True).
    """
    if source:
        return load_state_file(source)
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise ModelLoadError(
            f"cannot get ImageNet weights for {arch} ({exc.__class__.__name__}: {exc}); this machine looks "
            f"offline. Put the file in torch's cache ({torch.hub.get_dir()}/checkpoints/{os.path.basename(weights.url)}) "
            "or pass --pretrained-file PATH to a local state dict, or train without --pretrained."
        ) from exc


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or a plain state dict through torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"{path}: not a valid safetensors file ({exc})") from exc
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything that is more than tensors
        raise ModelLoadError(
            f"{path}: refused: not a plain weights file (pickled objects are never loaded; "
            f"save a state dict as safetensors). Detail: {str(exc).splitlines()[0]}") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"{path}: expected a state dict of tensors")
    return sd


INPUT_NORMS = ("image", "centre", "none")
POOLS = ("avg", "avgmax")   # global pooling before the classifier


class AvgMaxPool2d(nn.Module):
    """Global pooling as the mean of average and max pooling (timm's "avgmax").

    Average pooling alone dilutes a defect a few pixels wide over the whole feature map (one cell
    of 36 at 192 px): a pin mark on a part that is otherwise perfect hardly moves the pooled
    features. The max half keeps the strongest local response, so one small spot can decide.
    Shape (N, C, 1, 1) like ``nn.AdaptiveAvgPool2d(1)``; no weights.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1))


def _set_pool(model: nn.Module, arch: str, pool: str) -> None:
    if pool == "avg":
        return
    if isinstance(getattr(model, "avgpool", None), nn.AdaptiveAvgPool2d):
        model.avgpool = AvgMaxPool2d()
    elif arch.startswith("squeezenet") and isinstance(model.classifier[3], nn.AdaptiveAvgPool2d):
        model.classifier[3] = AvgMaxPool2d()
    else:
        raise ModelLoadError(f"--pool {pool} is not available for {arch} (its global pooling is not a module); "
                             f"use --pool avg")


class StandardizedInputConv2d(nn.Conv2d):
    """The stem convolution, applied to each image standardised to zero mean and unit variance.

    Part of the network, so every path that runs the model (training, Predictor, ONNX,
    int8, Grad-CAM) sees the same input: the verdict does not change when the whole photo
    gets brighter or darker or its contrast drifts (x -> a*x + b, a > 0), up to clipping.
    Same parameters as ``nn.Conv2d``: the state dict does not change.
    """

    eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - x.mean(dim=(1, 2, 3), keepdim=True)
        return super().forward(d * torch.rsqrt(d.mul(d).mean(dim=(1, 2, 3), keepdim=True) + self.eps))


class CentreStandardizedInputConv2d(StandardizedInputConv2d):
    """As ``StandardizedInputConv2d``, with mean and variance taken over the central disc only.

    The disc (radius ``radius`` of the side) holds the part; what a tool puts in the corners of
    a turned, shrunk or shifted photo (black, white, a mirror image) does not move the
    standardisation of the part itself.
    """

    radius = 0.4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        yy = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5 - h / 2) / min(h, w)
        xx = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5 - w / 2) / min(h, w)
        disc = ((yy[:, None] ** 2 + xx[None, :] ** 2) <= self.radius ** 2).to(x.dtype)
        wgt = disc / disc.sum()
        mean = (x * wgt).sum(dim=(2, 3), keepdim=True).mean(dim=1, keepdim=True)
        d = x - mean
        var = (d.mul(d) * wgt).sum(dim=(2, 3), keepdim=True).mean(dim=1, keepdim=True)
        return nn.Conv2d.forward(self, d * torch.rsqrt(var + self.eps))


def _standardize_stem(model: nn.Module, spec: ArchSpec, centre: bool = False) -> None:
    parent, attr, conv = _stem_conv(model, spec)
    cls = CentreStandardizedInputConv2d if centre else StandardizedInputConv2d
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
              conv.dilation, conv.groups, conv.bias is not None)
    new.load_state_dict(conv.state_dict())
    _set(parent, attr, new)


def build_model(arch: str, in_chans: int = 1, num_classes: int = 2, pretrained: bool = False,
                pretrained_file: str | None = None, input_norm: str = "none", pool: str = "avg") -> nn.Module:
    """A torchvision classifier with an IN_CHANS stem and NUM_CLASSES outputs.

    INPUT_NORM "image" standardises each image inside the network (``StandardizedInputConv2d``), "centre"
    with the statistics of its central disc (``CentreStandardizedInputConv2d``);
    POOL "avgmax" pools the last feature map by average and max (``AvgMaxPool2d``).
    """
    if input_norm not in INPUT_NORMS:
        raise ModelLoadError(f"unknown input normalisation {input_norm!r}; choose one of: {', '.join(INPUT_NORMS)}")
    if pool not in POOLS:
        raise ModelLoadError(f"unknown pooling {pool!r}; choose one of: {', '.join(POOLS)}")
    spec = arch_spec(arch)
    if pretrained or pretrained_file:
        model = torchvision.models.get_model(arch, weights=None)
        sd = pretrained_state_dict(arch, pretrained_file)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if len(missing) > 2 or unexpected:
            raise ModelLoadError(f"pretrained weights do not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        _replace_head(model, spec, num_classes)
    else:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        if spec.bn_momentum is not None:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = spec.bn_momentum
    _replace_stem(model, spec, in_chans)
    if arch.startswith("squeezenet"):
        # torchvision's SqueezeNet head is conv -> ReLU -> pool: logits can never be negative, and once
        # both are 0 for every input no gradient flows (seen: 8 epochs from scratch on the casting photos
        # at a constant 0.6931 loss, AUROC 0.5). Without the ReLU the head is linear, as in the other
        # architectures; it has no weights, so saved state dicts load unchanged.
        model.classifier[2] = nn.Identity()
    if input_norm in ("image", "centre"):
        _standardize_stem(model, spec, centre=input_norm == "centre")
    _set_pool(model, arch, pool)
    return model


ENSEMBLE_ARCH = "ensemble"


class Ensemble(nn.Module):
    """The mean of its members' logits: to Predictor, export and Grad-CAM an ensemble is one model.

    Members share the input (size, colour, normalisation); ARCHS names each member's
    architecture (kept for ``cam_target_layer``, not in the state dict).
    """

    def __init__(self, members: list[nn.Module], archs: list[str]):
        super().__init__()
        if not members or len(members) != len(archs):
            raise ModelLoadError("an ensemble needs at least one member and one architecture name per member")
        self.members = nn.ModuleList(members)
        self.archs = list(archs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


TTA_VIEWS = (1, 4, 8)   # test-time views: the image alone, its 4 rotations by 90 degrees, those and their mirror images


def check_tta(views: int) -> int:
    if views not in TTA_VIEWS:
        raise ModelLoadError(f"test-time views must be one of {', '.join(map(str, TTA_VIEWS))}, got {views!r}")
    return int(views)


def with_views(card: ModelCard, views: int, top: int | None = None) -> ModelCard:
    """CARD answering with VIEWS test-time views, TOP of them counted (``tta_top``; None: the card's where fewer
    than VIEWS, else all)."""
    views = check_tta(views)
    top = (card.tta_top if card.tta_top < views else 0) if top is None else check_tta_top(top, views)
    return replace(card, tta=views, tta_top=top)


def check_tta_top(top: int, views: int, what: str = "the test-time views that count (tta_top)") -> int:
    """TOP of VIEWS test-time views that score a part (``top_views``) as stored: 0 (all) when TOP >= VIEWS.
    WHAT names the setting in the error."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ModelLoadError(f"{what} must be a whole number >= 0 (0: every view counts), got {top!r}")
    return 0 if top >= views else top


def rot90(x: torch.Tensor, k: int) -> torch.Tensor:
    """``torch.rot90(x, k, dims=(-2, -1))`` from flips and a transpose, which every ONNX exporter writes."""
    k %= 4
    if k == 1:
        return x.flip(-1).transpose(-2, -1)
    if k == 2:
        return x.flip(-2).flip(-1)
    if k == 3:
        return x.transpose(-2, -1).flip(-1)
    return x


def dihedral_views(x: torch.Tensor, views: int) -> torch.Tensor:
    """(V*N, C, H, W): view v of every image, v-major. View v is the image rotated by (v % 4) * 90 degrees,
    mirrored left-right first when v >= 4. The transforms are exact (no resampling) and the part is round,
    so every view is a photo the line could have taken."""
    if views == 1:
        return x
    out = [rot90(x, k) for k in range(4)]
    if views == 8:
        m = x.flip(-1)
        out += [rot90(m, k) for k in range(4)]
    return torch.cat(out, dim=0)


def top_views(logits: torch.Tensor, views: int, top: int = 0) -> torch.Tensor | None:
    """Which views of per-view logits (V*N, 2) score each image: the TOP views with the highest bad margin
    (logit of bad minus good), as indices (TOP, N); None for all of them (TOP 0 or >= VIEWS)."""
    if not top or top >= views:
        return None
    z = logits.reshape(views, -1, logits.shape[-1])
    return (z[..., 1] - z[..., 0]).topk(top, dim=0).indices


def merge_view_logits(logits: torch.Tensor, views: int, top: int = 0) -> torch.Tensor:
    """Per-view logits (V*N, K) -> the image's (N, K): the mean over all views, or with TOP over the TOP views
    with the highest bad margin (``top_views``: what one view sees of a defect is not averaged away)."""
    if views == 1:
        return logits
    z = logits.reshape(views, -1, logits.shape[-1])
    idx = top_views(logits, views, top)
    return z.mean(dim=0) if idx is None else z.gather(0, idx[..., None].expand(-1, -1, z.shape[-1])).mean(dim=0)


def merge_view_maps(maps: torch.Tensor, views: int) -> torch.Tensor:
    """Mean over views of per-view maps (V*N, h, w), each turned back to the upright image first: (N, h, w)."""
    if views == 1:
        return maps
    m = maps.reshape(views, -1, *maps.shape[-2:])
    back = [rot90(m[v], -(v % 4)) for v in range(views)]
    back = [b.flip(-1) if v >= 4 else b for v, b in enumerate(back)]
    return torch.stack(back).mean(dim=0)


class DihedralTTA(nn.Module):
    """Test-time augmentation as part of the network: the mean of NET's logits over ``dihedral_views``, or with
    TOP over the TOP views with the highest bad margin (``merge_view_logits``).

    Wrapping the network (not the call sites) keeps torch, ONNX, int8 and the edge runtime
    on one definition. Training and fine-tuning use the bare network; ``ModelCard.tta`` says
    how many views a model directory answers with (cards before it: 1), ``ModelCard.tta_top`` how many count.
    """

    def __init__(self, net: nn.Module, views: int, top: int = 0):
        super().__init__()
        self.net = net
        self.views = check_tta(views)
        self.top = check_tta_top(top, self.views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return merge_view_logits(self.net(dihedral_views(x, self.views)), self.views, self.top)


EVAL_PIXELS = 64 * 224 * 224   # pixels one scoring batch pushes through a network: 64 photos at 224 px, one view


def eval_batch(img_size: int, views: int = 1, members: int = 1) -> int:
    """Photos per scoring batch: the views and members a photo expands to share EVAL_PIXELS, so that a large
    input with 8 views (448 px: 2 photos a batch) needs no more memory than 64 photos at 224 px."""
    return max(1, EVAL_PIXELS // (max(1, views) * max(1, members) * img_size * img_size))


def with_tta(model: nn.Module, views: int, top: int = 0) -> nn.Module:
    """MODEL answering over VIEWS test-time views, all of them or the TOP most suspicious (MODEL itself for 1)."""
    return model if check_tta(views) == 1 else DihedralTTA(model, views, top)


def unwrap_tta(model: nn.Module) -> nn.Module:
    return model.net if isinstance(model, DihedralTTA) else model


def cam_target_layer(model: nn.Module, arch: str) -> nn.Module:
    """The Grad-CAM layer; for an ensemble, its first member's.

    The gradient of the ensemble's mean logit at that layer is the first member's own gradient
    divided by the number of members, so after scaling the map is the first member's heat-map.
    """
    if arch == ENSEMBLE_ARCH:
        return arch_spec(model.archs[0]).cam_layer(model.members[0])
    return arch_spec(arch).cam_layer(model)


_PROBE_SIZE = 512


@functools.cache
def cam_offset(arch: str) -> tuple[float, float]:
    """(dy, dx): where the Grad-CAM layer's cells really look, against the usual way of scaling their map.

    Scaling a map of h cells to H pixels the usual way (half-pixel centres, pytorch-grad-cam's
    ``cv2.resize``) puts cell i's centre at pixel (i + 0.5) * H / h - 0.5. Strided convolutions
    padded on both sides centre cell i on pixel i * H / h instead, so every heat-map sits down and
    right of what the network saw: 15.5 pixels for MobileNets and ResNets whatever the input size,
    0.5 for SqueezeNet 1.1. This returns that distance in input pixels, measured on the
    architecture itself: a linear twin of the network (positive uniform convolution weights; no
    normalisation, activations or squeeze-excitation; average pooling in place of max pooling)
    whose CAM-layer cell at the middle of a 512 px input is differentiated with respect to the
    input; the centre of mass of that gradient is the cell's receptive-field centre.
    ``explain.normalize_cam(raw, size, offset)`` draws the map there. Cached per process.
    """
    with torch.inference_mode(False), torch.enable_grad():   # also when the caller runs under no-grad
        return _probe_cam_offset(arch)


def _probe_cam_offset(arch: str) -> tuple[float, float]:
    from torchvision.ops.misc import SqueezeExcitation

    with torch.random.fork_rng(devices=[]):   # the weights are set below: leave the caller's random draws alone
        model = build_model(arch, in_chans=1, num_classes=2)
    linear = nn.BatchNorm2d | nn.Dropout | nn.ReLU | nn.ReLU6 | nn.Hardswish | nn.Hardsigmoid | nn.SiLU | nn.Sigmoid
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, linear | SqueezeExcitation):   # SE: a per-channel scale, no geometry
                setattr(mod, child_name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(mod, child_name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                      ceil_mode=child.ceil_mode))
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.fill_(1.0 / (mod.weight[0].numel()))
                if mod.bias is not None:
                    mod.bias.zero_()
    model.eval()
    acts = []
    handle = cam_target_layer(model, arch).register_forward_hook(lambda _m, _i, out: acts.append(out))
    x = torch.ones(1, 1, _PROBE_SIZE, _PROBE_SIZE, requires_grad=True)
    try:
        model(x)
    finally:
        handle.remove()
    a = acts[0]
    h, w = a.shape[-2:]
    i, j = h // 2, w // 2
    (g,) = torch.autograd.grad(a[0, :, i, j].sum(), x)
    g = g[0, 0].abs().double()
    cy = float((g.sum(1) * torch.arange(_PROBE_SIZE, dtype=torch.float64)).sum() / g.sum())
    cx = float((g.sum(0) * torch.arange(_PROBE_SIZE, dtype=torch.float64)).sum() / g.sum())
    drawn_y = (i + 0.5) * _PROBE_SIZE / h - 0.5
    drawn_x = (j + 0.5) * _PROBE_SIZE / w - 0.5
    return round(drawn_y - cy, 2), round(drawn_x - cx, 2)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- the card

def library_versions() -> dict[str, str]:
    import numpy
    import PIL

    from . import __version__

    return {"defectcls": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "pillow": PIL.__version__, "python": platform.python_version()}


@dataclass
class ModelCard:
    """Everything needed to use a model; written as card.json beside the weights."""

    arch: str
    in_chans: int = 1
    color: str = "gray"
    img_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.25])
    labels: list[str] = field(default_factory=lambda: ["good", "bad"])
    positive_label: str = "bad"
    threshold: float = 0.5
    temperature: float = 1.0
    threshold_policy: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    name: str = ""
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    versions: dict = field(default_factory=library_versions)
    storage_dtype: str = "float32"
    members: list[str] = field(default_factory=list)  # ensembles: member directories, relative to this one
    input_norm: str = "none"  # "image": each image standardised inside the network (cards before it: none)
    tta: int = 1              # test-time views averaged per image (1, 4 or 8; ``DihedralTTA``; cards before it: 1)
    tta_top: int = 0          # of those, the views with the highest bad margin that are averaged (``top_views``);
                              # 0: all of them (cards before it)
    pool: str = "avg"         # global pooling before the classifier ("avg", "avgmax"; cards before it: avg)
    frame_ref: float | None = None  # framing on the part: its radius / the side of the square the model sees
                                    # (``data.fit_frame``); None: the whole photo (cards before it)
    background: list[float] | None = None  # the training photos' background, 0-255 per channel: black or white
                                           # fills unlike it are a tool's (``data.restore_fill``); None: cards before it
    photo_range: dict | None = None  # what the training photos look like (``data.estimate_photo_range``): the
                                     # photo note for softer photos; None: cards before it
    focus_below: float | None = None  # photos of ``data.sharpness`` under it are sharpened back before the model sees
                                      # them (``data.restore_focus``): the training photos' low end; None: never
    screen: dict | None = None  # one view first (``inference.Predictor``): one-view P(bad) below screen["below"] is
                                # good, above screen["above"] bad, without the other views; None: all views always

    def scoring_batch(self) -> int:
        """Photos per scoring batch for this card's size, views and members (``eval_batch``)."""
        return eval_batch(self.img_size, self.tta, len(self.members or []) or 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        known = {f for f in cls.__dataclass_fields__}
        missing = [k for k in ("arch",) if k not in d]
        if missing:
            raise ModelLoadError(f"card.json lacks required fields: {missing}")
        return cls(**{k: v for k, v in d.items() if k in known})


def read_card(model_dir: str | os.PathLike) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} is not a model directory: no {CARD_FILE}")
    try:
        card = ModelCard.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelLoadError(f"{path}: not a valid model card ({exc})") from exc
    if card.tta not in TTA_VIEWS:
        raise ModelLoadError(f"{path}: tta must be one of {', '.join(map(str, TTA_VIEWS))}, got {card.tta!r}")
    try:
        card.tta_top = check_tta_top(card.tta_top, card.tta)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    if not card.name:
        card.name = Path(model_dir).resolve().name
    return card


def write_card(card: ModelCard, model_dir: str | os.PathLike) -> None:
    """Write MODEL_DIR/card.json atomically (a reader sees the old card or the new one, never half)."""
    tmp = Path(model_dir) / f".{CARD_FILE}.tmp"
    tmp.write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, Path(model_dir) / CARD_FILE)


def save_model_dir(model: nn.Module, card: ModelCard, out: str | os.PathLike, fp16: bool = False) -> Path:
    """Write weights (safetensors; fp16 storage when asked) and the card atomically into OUT."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    card.name = out.name
    card.storage_dtype = "float16" if fp16 else "float32"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sd = {}
        for k, v in model.state_dict().items():
            v = v.detach().cpu().contiguous()
            sd[k] = v.half() if fp16 and v.is_floating_point() else v
        save_file(sd, str(tmp / WEIGHTS_FILE))
        write_card(card, tmp)
        if out.exists():
            for name in (WEIGHTS_FILE, CARD_FILE):
                os.replace(tmp / name, out / name)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def weights_sha256(model_dir: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_FILE, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def member_archs(model_dir: str | os.PathLike, card: ModelCard) -> list[str]:
    """Architectures of an ensemble's members: from its card (``train.member_archs``), else the members' cards."""
    archs = (card.train or {}).get("member_archs")
    if archs:
        if card.members and len(archs) != len(card.members):
            raise ModelLoadError(f"{model_dir}: card lists {len(card.members)} members but {len(archs)} architectures")
        return list(archs)
    if not card.members:
        raise ModelLoadError(f"{model_dir}: an ensemble card needs 'members' (member directories)")
    return [read_card(Path(model_dir) / m).arch for m in card.members]


def model_cam_offset(model_dir: str | os.PathLike, card: ModelCard) -> tuple[float, float]:
    """``cam_offset`` of the network that draws MODEL_DIR's heat-map (an ensemble's first member).

    (0, 0) with test-time views: each view's map, turned back upright, is off by the offset in
    its own direction, so their mean is centred where the usual scaling draws it.
    """
    if card.tta > 1:
        return 0.0, 0.0
    return cam_offset(member_archs(model_dir, card)[0] if card.arch == ENSEMBLE_ARCH else card.arch)


def load_model_dir(model_dir: str | os.PathLike) -> tuple[nn.Module, ModelCard]:
    """Build the card's architecture and load its safetensors weights (fp32, eval mode).

    An ensemble card (arch "ensemble") gives an ``Ensemble`` of its members, all weights read
    from the ensemble's own model.safetensors (keys ``members.<i>.``).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    card = read_card(model_dir)
    wpath = model_dir / WEIGHTS_FILE
    if not wpath.is_file():
        pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise ModelLoadError(f"{model_dir}: only pickled checkpoints found ({', '.join(pickles)}); they are refused "
                                 f"because unpickling can run code. Convert to {WEIGHTS_FILE}.")
        raise ModelLoadError(f"{model_dir}: no {WEIGHTS_FILE}")
    if card.arch == ENSEMBLE_ARCH:
        archs = member_archs(model_dir, card)
        model = Ensemble([build_model(a, card.in_chans, len(card.labels), input_norm=card.input_norm,
                                      pool=card.pool)
                          for a in archs], archs)
        what = f"an ensemble of {', '.join(archs)}"
    else:
        model = build_model(card.arch, card.in_chans, len(card.labels), input_norm=card.input_norm,
                            pool=card.pool)
        what = card.arch
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_state_file(wpath).items()}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{wpath}: weights do not match {what} with {card.in_chans} input channel(s): "
                             f"{str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, card


def model_id(model_dir: str | os.PathLike, card: ModelCard | None = None) -> str:
    """Name plus the first 12 hex digits of the weights' sha256: changes whenever weights change."""
    card = card or read_card(model_dir)
    return f"{card.name}@{weights_sha256(model_dir)[:12]}"
