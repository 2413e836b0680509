"""Predictor: one model directory, the shared preprocessing, a torch or onnxruntime backend.

Backends:
- ``torch``: CPU or CUDA, channels-last; float16 autocast on CUDA.
- ``onnx``: onnxruntime on CPU, from ``model.onnx`` written by ``defectcls export``
  (its metadata must name the same weights, else it is stale and refused).
- ``auto``: onnxruntime on CPU (1.6x faster than eager torch for ResNet50 and 2.4x for
  MobileNetV3 at one thread, see docs/benchmarks-speed.md), torch on CUDA. The graph is the
  directory's ``model.onnx`` when it matches the weights, else one that ``export.ensure_onnx``
  exports once into a cache (~10 s for MobileNetV3; ``export_missing=False`` or
  DEFECTCLS_AUTO_EXPORT=0 turns that off); torch when neither works (with a warning).

A Predictor is safe to share between threads: no call mutates it (the lazily loaded
torch model and the hook-safe model copy are created once, under a lock).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import data as D
from .config import resolve_device
from .edge import CAM_NAME, INPUT_NAME, LOGITS_NAME, make_session, session_meta, session_outputs
from .errors import DefectclsError, ImageLoadError, ModelLoadError
from .evaluate import prob_bad_from_logits
from .explain import CAM_TARGET, cam_split, gradcam_torch, screen_all_views, screen_bounds, screened
from .models import (
    ModelCard,
    load_model_dir,
    model_cam_offset,
    read_card,
    unwrap_tta,
    weights_sha256,
    with_tta,
    with_views,
)

ImageSource = str | os.PathLike | bytes | np.ndarray
BACKENDS = ("auto", "torch", "onnx")
ENV_AUTO_EXPORT = "DEFECTCLS_AUTO_EXPORT"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"


@dataclass
class Prediction:
    label: str
    prob_bad: float
    threshold: float
    model_id: str
    latency_ms: float = 0.0
    timings_ms: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # what makes this photo's verdict less sure (``data.photo_check``)
    held: bool = False   # the photo is one the model cannot judge (``data.photo_check``): bad whatever prob_bad says

    @property
    def confidences(self) -> dict[str, float]:
        return {"bad": self.prob_bad, "good": 1.0 - self.prob_bad}

    def to_dict(self) -> dict:
        return asdict(self)


def onnx_mismatch(meta: dict[str, str], sha: str, tta: int = 1, top: int = 0) -> str | None:
    """Why an exported graph (its defectcls.* metadata) does not belong to weights SHA answering with TTA
    test-time views, TOP of them counted (``ModelCard.tta_top``), or None."""
    have = meta.get("weights_sha256")
    if have != sha:
        return f"exported from other weights ({(have or 'unknown')[:12]} != {sha[:12]}); export again"
    try:
        card = json.loads(meta.get("card") or "{}")
        views, counted = int(card.get("tta", 1)), int(card.get("tta_top", 0))
    except (ValueError, TypeError, AttributeError):
        views, counted = 1, 0
    if views != tta:
        return f"exported with {views} test-time view(s) but the card says {tta}; export again"
    if counted != top:
        return (f"exported counting {counted or 'all'} of its views but the card says {top or 'all'} (tta_top); "
                f"export again")
    return None


class Predictor:
    """Loads a model directory once; thread-safe single and batched prediction."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 backend: str = "auto", onnx_path: str | os.PathLike | None = None, fp16: bool | None = None,
                 tta: int | None = None, export_missing: bool | None = None, screen: bool | None = None,
                 tta_top: int | None = None):
        """TTA: answer with that many test-time views instead of the card's (1, 4 or 8; ``models.DihedralTTA``);
        TTA_TOP: count that many of them, the most suspicious (0: all; None: the card's, ``models.with_views``).

        SCREEN (None: when the card has one and TTA is the card's; False: never): look at one view
        first; a part whose one-view P(bad) is below the card's ``screen["below"]`` is good and
        one above ``screen["above"]`` is bad on that view alone, answered with its one-view P(bad);
        only the parts between get all views (``scoring.recalibrate`` puts ``below`` under every
        validation bad part the full model flags and ``above`` over every validation good part
        and the threshold).

        EXPORT_MISSING (backend auto, CPU): with no matching model.onnx in the directory, export
        one into the cache (``export.ensure_onnx``) and run on onnxruntime; None reads
        DEFECTCLS_AUTO_EXPORT (default on; "0" turns it off)."""
        if backend not in BACKENDS:
            raise DefectclsError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ModelLoadError(f"model directory {model_dir} does not exist")
        self.card: ModelCard = read_card(model_dir)
        own_views = ((tta is None or tta == self.card.tta)    # the exported graph carries the card's views
                     and (tta_top is None or tta_top == self.card.tta_top))
        if not own_views:
            self.card = with_views(self.card, self.card.tta if tta is None else tta, tta_top)
        self.prep = D.Preprocessing.from_card(self.card)
        if not (self.model_dir / "model.safetensors").is_file():
            load_model_dir(model_dir)   # raises the precise reason (pickles, missing weights)
        self.weights_sha256 = weights_sha256(model_dir)
        self.model_id = f"{self.card.name}@{self.weights_sha256[:12]}"
        self.device = resolve_device(device)
        self.threads = threads
        if threads:
            torch.set_num_threads(threads)
        self.fp16 = self.device.type == "cuda" if fp16 is None else bool(fp16) and self.device.type == "cuda"
        self._model: torch.nn.Module | None = None
        self._split = None
        self._hookable: torch.nn.Module | None = None
        self._lock = threading.Lock()
        self._hook_lock = threading.Lock()
        self.session = None
        self.onnx_path: Path | None = None
        if export_missing is None:
            export_missing = os.environ.get(ENV_AUTO_EXPORT, "1").strip() != "0"
        if backend == "auto" and onnx_path is None and export_missing and self.device.type == "cpu":
            onnx_path = self._exported_graph()
        self.backend = self._choose_backend(backend, onnx_path)
        if self.backend == "torch":
            self.model  # noqa: B018 - load now: fail early, first request fast
        self.screen_below: float | None = None
        self.screen_above: float | None = None
        self._screen: Predictor | None = None
        bounds = screen_bounds(self.card.screen, self.card.tta) if screen is not False and own_views else None
        if bounds is not None:
            self.screen_below, self.screen_above = bounds
            self._screen = Predictor(model_dir, device=device, threads=threads, fp16=fp16,
                                     backend="auto" if self.backend == "onnx" else self.backend,
                                     tta=1, export_missing=True if self.backend == "onnx" else export_missing,
                                     screen=False)

    # ------------------------------------------------------------ backend setup

    def _exported_graph(self) -> Path | None:
        """The directory's current model.onnx, else one exported into the cache; None (and a
        warning) when exporting fails, e.g. a read-only cache: the model then runs on torch."""
        from .export import ensure_onnx

        try:
            return ensure_onnx(self.model_dir, sha256=self.weights_sha256, views=self.card.tta, top=self.card.tta_top)
        except Exception as exc:  # export touches torch.onnx, onnxruntime and the disk: any failure -> torch
            first = (str(exc).splitlines() or [""])[0][:200]
            warnings.warn(f"{self.model_dir}: no ONNX graph for onnxruntime ({type(exc).__name__}: {first}); "
                          f"running on torch", stacklevel=3)
            return None

    def _choose_backend(self, backend: str, onnx_path) -> str:
        if backend == "torch" or (backend == "auto" and self.device.type != "cpu"):
            return "torch"
        if self.device.type != "cpu":
            raise DefectclsError(f"the onnx backend runs on CPU; use backend='torch' for {self.device}")
        path = Path(onnx_path) if onnx_path else self.model_dir / ONNX_FILE
        if not path.is_file():
            if backend == "onnx":
                raise ModelLoadError(f"{path} does not exist (write it with `defectcls export --model {self.model_dir}`)")
            return "torch"
        session = make_session(path, self.threads)
        why = onnx_mismatch(session_meta(session), self.weights_sha256, self.card.tta, self.card.tta_top)
        size = session.get_inputs()[0].shape[-1]
        if why is None and isinstance(size, int) and size != self.card.img_size:
            why = f"takes {size} px inputs but the card says {self.card.img_size}; export again"
        if why:
            if backend == "onnx":
                raise ModelLoadError(f"{path}: {why}")
            warnings.warn(f"{path}: {why}; using torch", stacklevel=3)
            return "torch"
        self.session, self.onnx_path = session, path
        return "onnx"

    @property
    def model(self) -> torch.nn.Module:
        """The torch model (eval, channels-last, on the device); loaded on first use."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    m, _ = load_model_dir(self.model_dir)
                    m = m.to(self.device).to(memory_format=torch.channels_last).eval()
                    self._split = cam_split(m, self.card.arch, self.card.tta, self.card.tta_top)
                    self._model = with_tta(m, self.card.tta, self.card.tta_top)
        return self._model

    def hookable_model(self) -> tuple[torch.nn.Module, threading.Lock]:
        """A private copy of the torch model and its lock, for code that registers hooks (pytorch-grad-cam).

        Hooks on the shared model would see other threads' forward passes. With test-time views
        (``card.tta``) it is the bare network: hooked libraries see one image per input.
        """
        if self._hookable is None:
            model = unwrap_tta(self.model)
            with self._lock:
                if self._hookable is None:
                    self._hookable = copy.deepcopy(model)
        return self._hookable, self._hook_lock

    @functools.cached_property
    def cam_offset(self) -> tuple[float, float]:
        """Where this model's one-pass heat-maps are drawn (``models.model_cam_offset``; ``explain.normalize_cam``);
        with a screen, ``forward_cam``'s maps are resampled to the full model's drawing."""
        return model_cam_offset(self.model_dir, self.card)

    @functools.cached_property
    def upright_cam_offset(self) -> tuple[float, float]:
        """The same for the bare network's map of the upright photo (the hooked library methods)."""
        return model_cam_offset(self.model_dir, replace(self.card, tta=1))

    @property
    def threshold(self) -> float:
        return float(self.card.threshold)

    @property
    def has_fast_cam(self) -> bool:
        """True when forward_cam works (an ONNX graph with a heat-map output, or a known torch cut)."""
        if self.backend == "onnx":
            return CAM_NAME in session_outputs(self.session)
        self.model  # noqa: B018
        return self._split is not None

    def describe(self) -> dict:
        """Backend, device, threads and files: reported with every benchmark number."""
        return {"backend": self.backend, "device": str(self.device), "fp16": self.fp16,
                "threads": self.threads or (torch.get_num_threads() if self.backend == "torch" else os.cpu_count()),
                "onnx": str(self.onnx_path) if self.onnx_path else None, "model_id": self.model_id,
                "views": self.card.tta, "screen_below": self.screen_below, "screen_above": self.screen_above}

    # ------------------------------------------------------------ preprocessing

    def load(self, src: ImageSource, fast_png: bool = True) -> np.ndarray:
        """Decode to uint8 in the model's colour mode (arrays are converted, not copied when possible)."""
        return self.prep.load(src, fast_png)

    def preprocess(self, src: ImageSource) -> np.ndarray:
        """File/bytes/array -> float32 CxHxW; the same function training and export use."""
        return self.prep.preprocess(src)

    # ------------------------------------------------------------ model

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device, non_blocking=True)
        return t.contiguous(memory_format=torch.channels_last)

    def _escalated(self, z1: np.ndarray) -> np.ndarray:
        """Which rows of one-view logits Z1 the screen leaves to all views (bool N)."""
        return screen_all_views(prob_bad_from_logits(z1, self.card.temperature), self.screen_below, self.screen_above)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw logits (float32 Nx2) for a float32 NxCxHxW batch (with a screen: one view's for the parts it decides)."""
        if self._screen is None:
            return self._logits(x)
        return screened(lambda v: (self._screen._logits(v), None), lambda v: (self._logits(v), None), x,
                        self.card.temperature, self.screen_below, self.screen_above, x.shape[-2:])[0]

    def _logits(self, x: np.ndarray) -> np.ndarray:
        if self.session is not None:
            return self.session.run([LOGITS_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]
        model = self.model
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.fp16):
            return model(self._tensor(x)).float().cpu().numpy()

    def forward_cam(self, x: np.ndarray, target: int = CAM_TARGET) -> tuple[np.ndarray, np.ndarray]:
        """(logits Nx2, raw Grad-CAM maps Nxhxw of class TARGET) from one forward pass.

        The maps are at the CAM layer's resolution; ``explain.normalize_cam`` scales them. With a
        screen, every map is at SCREEN_GRID times it, drawn where the full model's are
        (``cam_offset``), so that maps of cleared and escalated parts share a batch.
        """
        if self._screen is None:
            return self._forward_cam(x, target)
        return screened(lambda v: self._screen._forward_cam(v, target), lambda v: self._forward_cam(v, target), x,
                        self.card.temperature, self.screen_below, self.screen_above, x.shape[-2:],
                        self._screen.cam_offset, self.cam_offset)

    def _forward_cam(self, x: np.ndarray, target: int = CAM_TARGET) -> tuple[np.ndarray, np.ndarray]:
        if not self.has_fast_cam:
            raise DefectclsError(f"no one-pass Grad-CAM for {self.card.arch} on the {self.backend} backend")
        if self.session is not None:
            if target != CAM_TARGET:
                raise DefectclsError(f"the exported heat-map is for class {CAM_TARGET} only")
            logits, cam = self.session.run([LOGITS_NAME, CAM_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
            return logits, cam
        logits, cam = gradcam_torch(self._split, self._tensor(x), target, autocast=self.fp16)
        return logits.cpu().numpy(), cam.float().cpu().numpy()

    def probs(self, x: np.ndarray) -> np.ndarray:
        """Calibrated P(bad) for a float32 NxCxHxW batch."""
        return prob_bad_from_logits(self.logits(x), self.card.temperature)

    def verdict(self, p: float, latency_ms: float, timings: dict, notes: list[str] | None = None,
                held: bool = False) -> Prediction:
        """A Prediction for calibrated P(bad) P at the card's threshold; NOTES and HELD: ``data.photo_check``
        of the photo."""
        return Prediction(label=D.verdict(p, self.threshold, held), prob_bad=float(p),
                          threshold=self.threshold, model_id=self.model_id, latency_ms=round(latency_ms, 3),
                          timings_ms={k: round(v, 3) for k, v in timings.items()}, notes=list(notes or []),
                          held=bool(held))

    _verdict = verdict

    def predict(self, src: ImageSource) -> Prediction:
        """Verdict for one image; raises ImageLoadError for unusable input."""
        t0 = time.perf_counter()
        img = self.load(src)
        t1 = time.perf_counter()
        ready = self.prep.prepare(img)
        t2 = time.perf_counter()
        p = float(self.probs(ready.x[None])[0])
        t3 = time.perf_counter()
        return self.verdict(p, (t3 - t0) * 1e3, {"preprocess": (t1 - t0) * 1e3 + ready.preprocess_ms,
                                                 "model": (t3 - t2) * 1e3, "photo_check": ready.check_ms}, ready.notes,
                            ready.held)

    def predict_batch(self, srcs: Sequence[ImageSource], batch_size: int = 16) -> list[Prediction | ImageLoadError]:
        """Verdicts for many images, BATCH_SIZE per model call; an unusable one yields its ImageLoadError in its place."""
        results: list[Prediction | ImageLoadError | None] = [None] * len(srcs)
        for i in range(0, len(srcs), batch_size):
            t0 = time.perf_counter()
            xs, slots, checks = [], [], []
            for j in range(i, min(i + batch_size, len(srcs))):
                try:
                    ready = self.prep.prepare(self.load(srcs[j]))
                    xs.append(ready.x)
                    slots.append(j)
                    checks.append((ready.notes, ready.held))
                except ImageLoadError as exc:
                    results[j] = exc
            ps = self.probs(np.stack(xs)) if xs else []
            per = (time.perf_counter() - t0) * 1e3 / max(1, min(batch_size, len(srcs) - i))
            for j, p, (n, h) in zip(slots, ps, checks, strict=True):
                results[j] = self.verdict(float(p), per, {}, n, h)
        return results

    def logits_cached(self, images_u8: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Raw logits (Nx2) for already decoded uint8 NxCxSxS images at the card's size (BATCH_SIZE None:
        ``ModelCard.scoring_batch``)."""
        c = self.card
        batch_size = batch_size or c.scoring_batch()
        out = [self.logits(D.normalize(images_u8[i:i + batch_size], c.mean, c.std))
               for i in range(0, len(images_u8), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(c.labels)), np.float32)
