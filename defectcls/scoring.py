"""Scoring a model directory on a labelled folder, without leaking its training images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import data as D
from .errors import DefectclsError
from .evaluate import compute_metrics
from .inference import Predictor
from .train import SPLIT_FILE


def select_split(model_dir: str | os.PathLike, data_root: str | os.PathLike, samples: list[D.Sample],
                 split: str) -> tuple[list[D.Sample], str]:
    """The samples to score: with split 'auto', the model's own test part when DATA is its training folder."""
    split_path = Path(model_dir) / SPLIT_FILE
    saved = json.loads(split_path.read_text()) if split_path.is_file() else None
    # the same folder, wherever it lives now: same path, or same file names, sizes and labels
    same = saved is not None and (os.path.realpath(saved["data_root"]) == os.path.realpath(data_root)
                                  or saved.get("data_fingerprint") == D.fingerprint(samples))
    if split == "all" or (split == "auto" and not same):
        return samples, "all"
    if saved is None or not same:
        raise DefectclsError(f"--split {split} needs the model's training folder; {model_dir} was trained on "
                             f"{saved['data_root'] if saved else 'an unknown folder'}")
    name = "test" if split == "auto" else split
    root = Path(data_root)
    chosen = [D.Sample(str(root / rel), int(lab)) for rel, lab in saved[name]]
    return chosen, name


def evaluate_model(model_dir: str | os.PathLike, data_root: str | os.PathLike, split: str = "auto",
                   threshold: float | None = None, predictor: Predictor | None = None) -> dict:
    """Metrics of MODEL_DIR on DATA_ROOT at the card's threshold (or THRESHOLD)."""
    pred = predictor or Predictor(model_dir)
    samples, used = select_split(model_dir, data_root, D.scan_folder(data_root), split)
    images, ok, failed = D.decode_all(samples, pred.card.img_size, pred.card.color, use_disk_cache=False)
    if not ok:
        raise DefectclsError(f"no readable images in {data_root}")
    y = np.array([samples[i].label for i in ok])
    p = pred.probs_cached(images)
    thr = pred.threshold if threshold is None else threshold
    return {"metrics": compute_metrics(y, p, thr), "y_true": y.tolist(), "prob_bad": p.tolist(),
            "paths": [samples[i].path for i in ok], "model_id": pred.model_id, "split": used,
            "skipped": [{"path": path, "error": err} for path, err in failed]}
