"""Seeding and device selection shared by every command."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator for augmentation."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import DefectclsError

        raise DefectclsError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def env_path(name: str, default: str) -> str:
    """A directory setting from the environment (DEFECTCLS_MODELS_DIR, DEFECTCLS_REVIEW_DIR)."""
    return os.environ.get(name) or default


def models_dir() -> str:
    return env_path("DEFECTCLS_MODELS_DIR", "models")


def review_dir() -> str:
    return env_path("DEFECTCLS_REVIEW_DIR", "review_queue")
