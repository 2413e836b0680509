"""Optional model download from a Hugging Face model repo (pinned revision, offline-safe) and the model registry."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import defectcls.hub as hub
from defectcls.errors import DefectclsError, ModelLoadError
from defectcls.models import load_model_dir

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def fake_hub(tiny_model, monkeypatch):
    """hf_hub_download stand-in serving tiny_model's files; records every call."""
    calls = []

    def fake(repo_id, filename, *, subfolder=None, revision=None, repo_type=None, **kw):
        calls.append({"repo_id": repo_id, "filename": filename, "subfolder": subfolder, "revision": revision,
                      "repo_type": repo_type})
        return str(Path(tiny_model) / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake)
    return calls


def test_download_pinned_revision_into_models_dir(fake_hub, tmp_path, tiny_model):
    out = hub.download_model("acme/defectcls-models", SHA, subfolder="resnet50_gray", models_root=tmp_path)
    assert out == tmp_path / "resnet50_gray"
    assert {c["filename"] for c in fake_hub} == {"card.json", "model.safetensors"}
    assert all(c["revision"] == SHA and c["repo_id"] == "acme/defectcls-models" and c["subfolder"] == "resnet50_gray"
               for c in fake_hub)
    marker = json.loads((out / "hub.json").read_text())
    assert marker["revision"] == SHA and len(marker["sha256"]["model.safetensors"]) == 64
    model, card = load_model_dir(out)
    assert card.arch == "mobilenet_v3_large"
    n = len(fake_hub)
    assert hub.download_model("acme/defectcls-models", SHA, subfolder="resnet50_gray", models_root=tmp_path) == out
    assert len(fake_hub) == n                                  # already fetched at this revision: no call


def test_env_settings(fake_hub, tmp_path, monkeypatch):
    monkeypatch.delenv(hub.ENV_REPO, raising=False)
    monkeypatch.delenv(hub.ENV_SUBFOLDER, raising=False)
    assert hub.model_from_env(tmp_path) is None                # off by default
    monkeypatch.setenv(hub.ENV_REPO, "acme/parts")
    monkeypatch.delenv(hub.ENV_REVISION, raising=False)
    with pytest.raises(DefectclsError, match="full commit sha"):
        hub.model_from_env(tmp_path)
    monkeypatch.setenv(hub.ENV_REVISION, "main")
    with pytest.raises(DefectclsError, match="40-digit"):
        hub.model_from_env(tmp_path)
    monkeypatch.setenv(hub.ENV_REVISION, SHA)
    monkeypatch.setenv(hub.ENV_NAME, "from_hub")
    assert hub.model_from_env(tmp_path) == tmp_path / "from_hub"
    assert fake_hub[-1]["subfolder"] is None and fake_hub[-1]["revision"] == SHA
    for bad in ("../evil", "a/b/c", ""):
        with pytest.raises(DefectclsError):
            hub.download_model(bad, SHA, models_root=tmp_path)
    with pytest.raises(DefectclsError, match="inside the repo"):
        hub.download_model("acme/parts", SHA, subfolder="../x", models_root=tmp_path)


def test_offline_uses_the_local_cache_or_says_why(tiny_model, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 (set for the whole test session): the real hf_hub_download answers from the cache."""
    import huggingface_hub.constants as C

    assert C.HF_HUB_OFFLINE
    cache = tmp_path / "hf_cache"
    snap = cache / "models--acme--parts" / "snapshots" / SHA
    snap.mkdir(parents=True)
    for f in ("card.json", "model.safetensors"):
        shutil.copy(Path(tiny_model) / f, snap / f)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    out = hub.download_model("acme/parts", SHA, models_root=tmp_path / "models")
    assert (out / "model.safetensors").read_bytes() == (Path(tiny_model) / "model.safetensors").read_bytes()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        hub.download_model("acme/parts", "f" * 40, name="other", models_root=tmp_path / "models")
    assert not (tmp_path / "models" / "other").exists()


def test_bad_download_is_refused_before_anything_is_replaced(tmp_path, tiny_model, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(Path(tiny_model) / "card.json", src / "card.json")
    torch.save({"w": torch.zeros(1)}, src / "model.safetensors")     # a pickle wearing a safetensors name
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda repo, fname, **kw: str(src / fname))
    with pytest.raises(ModelLoadError):
        hub.download_model("acme/parts", SHA, name="evil", models_root=tmp_path / "models")
    assert not (tmp_path / "models" / "evil").exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == []  # temp folder cleaned up


def test_registry_loads_once_and_is_thread_safe(tiny_model, tmp_path):
    (tmp_path / "not_a_model").mkdir()
    shutil.copytree(tiny_model, tmp_path / "m1")
    assert [p.name for p in hub.find_model_dirs(tmp_path)] == ["m1"]
    reg = hub.ModelRegistry([tmp_path / "m1"], device="cpu")
    assert reg.default == "m1" and reg.names() == ["m1"]
    assert reg.predictor() is reg.predictor("m1")
    assert reg.name_for_id(reg.model_id("m1")) == "m1" and reg.name_for_id("x@1") is None
    with pytest.raises(ModelLoadError, match="unknown model"):
        reg.predictor("nope")
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (48, 48), dtype=np.uint8) for _ in range(4)]
    methods = ("gradcam", "gradcam++")   # the one-pass path and pytorch-grad-cam's hooks, side by side
    solo = [[reg.explain("m1", im, m).cam for m in methods] for im in imgs]
    got: dict[int, np.ndarray] = {}

    def run(k: int) -> None:
        got[k] = reg.explain("m1", imgs[k % 4], methods[k % 2]).cam

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(8):
        np.testing.assert_allclose(got[k], solo[k % 4][k % 2], atol=1e-4)
    assert reg.bench_models() == {"m1": str(tmp_path / "m1"), "resnet50": None}
