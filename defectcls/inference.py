"""Predictor: one model directory, the shared preprocessing, single and batched prediction."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data as D
from .config import resolve_device
from .errors import ImageLoadError
from .evaluate import prob_bad_from_logits
from .models import ModelCard, load_model_dir, model_id

ImageSource = str | os.PathLike | bytes | np.ndarray


@dataclass
class Prediction:
    label: str
    prob_bad: float
    threshold: float
    model_id: str
    latency_ms: float = 0.0
    timings_ms: dict = field(default_factory=dict)

    @property
    def confidences(self) -> dict[str, float]:
        return {"bad": self.prob_bad, "good": 1.0 - self.prob_bad}

    def to_dict(self) -> dict:
        return asdict(self)


class Predictor:
    """Loads a model directory once; thread-safe prediction (no shared mutable state per call)."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "auto", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.model_dir = Path(model_dir)
        self.model, self.card = load_model_dir(model_dir)
        self.card: ModelCard
        self.model_id = model_id(model_dir, self.card)
        self.device = resolve_device(device)
        self.model = self.model.to(self.device).to(memory_format=torch.channels_last).eval()
        self._lock = threading.Lock()

    @property
    def threshold(self) -> float:
        return float(self.card.threshold)

    def load(self, src: ImageSource) -> np.ndarray:
        """Decode to uint8 in the model's colour mode (arrays are converted, not copied when possible)."""
        if isinstance(src, np.ndarray):
            return D.as_color(src, self.card.color)
        return D.load_image(src, self.card.color)

    def preprocess(self, src: ImageSource) -> np.ndarray:
        """File/bytes/array -> float32 CxHxW; the same function training and export use."""
        c = self.card
        return D.preprocess(self.load(src) if not isinstance(src, np.ndarray) else D.as_color(src, c.color),
                            c.img_size, c.color, c.mean, c.std)

    @torch.inference_mode()
    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw logits for a float32 NxCxHxW batch."""
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device).contiguous(memory_format=torch.channels_last)
        return self.model(t).float().cpu().numpy()

    def probs(self, x: np.ndarray) -> np.ndarray:
        """Calibrated P(bad) for a float32 NxCxHxW batch."""
        return prob_bad_from_logits(self.logits(x), self.card.temperature)

    def _verdict(self, p: float, latency_ms: float, timings: dict) -> Prediction:
        return Prediction(label="bad" if p >= self.threshold else "good", prob_bad=float(p),
                          threshold=self.threshold, model_id=self.model_id, latency_ms=round(latency_ms, 3),
                          timings_ms={k: round(v, 3) for k, v in timings.items()})

    def predict(self, src: ImageSource) -> Prediction:
        """Verdict for one image; raises ImageLoadError for unusable input."""
        t0 = time.perf_counter()
        x = self.preprocess(src)
        t1 = time.perf_counter()
        p = float(self.probs(x[None])[0])
        t2 = time.perf_counter()
        return self._verdict(p, (t2 - t0) * 1e3, {"preprocess": (t1 - t0) * 1e3, "model": (t2 - t1) * 1e3})

    def predict_batch(self, srcs: Sequence[ImageSource], batch_size: int = 16) -> list[Prediction | ImageLoadError]:
        """Verdicts for many images; an unusable one yields its ImageLoadError in its place."""
        results: list[Prediction | ImageLoadError] = []
        for i in range(0, len(srcs), batch_size):
            t0 = time.perf_counter()
            xs, slots = [], []
            chunk = srcs[i:i + batch_size]
            for j, s in enumerate(chunk):
                try:
                    xs.append(self.preprocess(s))
                    slots.append(j)
                except ImageLoadError as exc:
                    results.append(exc)
                    continue
                results.append(None)  # placeholder
            ps = self.probs(np.stack(xs)) if xs else []
            per = (time.perf_counter() - t0) * 1e3 / max(1, len(chunk))
            base = len(results) - len(chunk)
            for j, p in zip(slots, ps, strict=True):
                results[base + j] = self._verdict(float(p), per, {})
        return results

    def probs_cached(self, images_u8: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Calibrated P(bad) for already decoded uint8 NxCxSxS images at the card's size."""
        c = self.card
        out = [self.probs(D.normalize(images_u8[i:i + batch_size], c.mean, c.std))
               for i in range(0, len(images_u8), batch_size)]
        return np.concatenate(out) if out else np.zeros(0)
