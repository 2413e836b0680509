"""Grad-CAM heat-maps and overlays."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .inference import ImageSource, Prediction, Predictor
from .models import cam_target_layer

CAM_METHODS = ("gradcam", "gradcam++", "eigencam")


def _cam_class(method: str):
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus

    try:
        return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}[method]
    except KeyError:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}") from None


def cam_library(predictor: Predictor, x: np.ndarray, method: str = "gradcam", target: int = 1) -> np.ndarray:
    """Heat-map (HxW in [0,1], model input size) from pytorch-grad-cam for the class TARGET."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = predictor.model
    layer = cam_target_layer(model, predictor.card.arch)
    t = torch.from_numpy(np.ascontiguousarray(x[None])).to(predictor.device)
    with _cam_class(method)(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=t, targets=[ClassifierOutputTarget(target)])[0]


@dataclass
class Explanation:
    prediction: Prediction
    cam: np.ndarray          # HxW float32 in [0, 1] at the model's input size
    image: np.ndarray        # the decoded uint8 image (model colour mode, original size)
    timings_ms: dict = field(default_factory=dict)


def explain(predictor: Predictor, src: ImageSource, method: str = "gradcam") -> Explanation:
    """Verdict and heat-map for one image."""
    t0 = time.perf_counter()
    img = predictor.load(src)
    t1 = time.perf_counter()
    pred = predictor.predict(img)
    x = predictor.preprocess(img)
    t2 = time.perf_counter()
    cam = cam_library(predictor, x, method)
    t3 = time.perf_counter()
    return Explanation(pred, cam, img, {"decode": (t1 - t0) * 1e3, "predict": (t2 - t1) * 1e3, "cam": (t3 - t2) * 1e3})


def overlay(img: np.ndarray, cam: np.ndarray, size: int | None = None, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 overlay of a heat-map on the (gray or RGB) image, at SIZE (default: the image's size)."""
    import matplotlib

    base = Image.fromarray(img).convert("RGB")
    if size:
        base = base.resize((size, size), Image.Resampling.BILINEAR)
    w, h = base.size
    heat = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    colored = matplotlib.colormaps["jet"](np.asarray(heat))[..., :3]
    out = (1 - alpha) * np.asarray(base, np.float32) / 255.0 + alpha * colored
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)
