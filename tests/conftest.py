"""Shared fixtures: tiny synthetic data and a tiny trained model, made once per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Predictor(backend="auto") would export every tiny model to ONNX on CPU (seconds each); the tests that
# are about that path turn it back on for themselves (tests/test_inference.py).
os.environ["DEFECTCLS_AUTO_EXPORT"] = "0"

TINY_SIZE = 96       # synthetic image side for tests
TINY_IMG = 64        # model input side for tests


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread for the whole session: deterministic, and fast on a small shared CPU where
    multi-threaded ops spend their time waiting for a slice."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic good/bad folder (36 good, 18 bad, 96 px)."""
    from defectcls.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, n_good=36, n_bad=18, seed=3, size=TINY_SIZE)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_data, tmp_path_factory) -> Path:
    """A MobileNetV3-Large trained for a few epochs on tiny_data at 64 px (a real model directory)."""
    from defectcls.train import TrainConfig, train

    out = tmp_path_factory.mktemp("models") / "tiny_mnv3"
    os.environ["DEFECTCLS_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    from defectcls.config import AugConfig

    # no augmentation: 3 epochs at 64 px learn the most this way; the recipe's ramp is tested on its own.
    # One test-time view: tests that need views use tiny_model_tta.
    train(TrainConfig(data=str(tiny_data), out=str(out), arch="mobilenet_v3_large", epochs=3, img_size=TINY_IMG,
                      batch_size=16, seed=0, progress=False, workers=1, aug=AugConfig.none(), tta=1, epoch_size=0))
    return out


@pytest.fixture(scope="session")
def tiny_model_tta(tiny_model, tmp_path_factory) -> Path:
    """tiny_model answering with 8 test-time views (its card changed; the weights are the same)."""
    import shutil

    out = tmp_path_factory.mktemp("models") / "tiny_mnv3_tta8"
    shutil.copytree(tiny_model, out)
    card = json.loads((out / "card.json").read_text())
    card["tta"] = 8
    (out / "card.json").write_text(json.dumps(card))
    return out


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The shipped default model."""
    path = Path(__file__).resolve().parents[1] / "models" / "mobilenet_v3_large_gray"
    if not (path / "model.safetensors").is_file():
        pytest.fail(f"shipped default model missing at {path}")
    return path
