"""Predictor backends (torch, onnxruntime, auto), batch = single, concurrent threads."""

from __future__ import annotations

import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from defectcls.errors import DefectclsError, ImageLoadError, ModelLoadError
from defectcls.explain import explain, normalize_cam
from defectcls.inference import Predictor


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """Seeded untrained weights, BatchNorm statistics from synthetic parts and a widened last layer: clearly
    different outputs per image. Exported to ONNX in place."""
    import torch

    from defectcls.data import preprocess
    from defectcls.export import export_onnx
    from defectcls.models import ModelCard, build_model, save_model_dir
    from defectcls.synth import render_part

    torch.manual_seed(0)
    model = build_model("mobilenet_v3_large").train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None       # running statistics = the average over the pass below
    x = np.stack([preprocess(np.asarray(render_part(i, i % 2 == 1, 128)[0]), 64, "gray", [0.5], [0.25]) for i in range(16)])
    with torch.no_grad():
        model(torch.from_numpy(x))
        model.classifier[-1].weight.mul_(300.0)
    model.eval()
    d = save_model_dir(model, ModelCard(arch="mobilenet_v3_large", img_size=64), tmp_path_factory.mktemp("var") / "m")
    export_onnx(d, n_check=4)
    return d


@pytest.fixture(scope="module")
def files(tiny_data):
    return sorted((tiny_data / "bad").glob("*.png"))[:6] + sorted((tiny_data / "good").glob("*.png"))[:6]


def test_auto_picks_onnx_on_cpu_when_exported(varied, tiny_model):
    assert Predictor(varied, device="cpu").backend == "onnx"
    assert Predictor(tiny_model, device="cpu").backend == "torch"        # no model.onnx there
    assert Predictor(varied, device="cpu", backend="torch").backend == "torch"


def test_auto_exports_once_into_the_cache(tiny_model, files, tmp_path, monkeypatch):
    """Out of the box (no model.onnx in the directory) the CPU default still runs on onnxruntime: one export
    into the cache, reused by the next Predictor, answering as torch does."""
    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    monkeypatch.setenv("DEFECTCLS_AUTO_EXPORT", "1")
    monkeypatch.setenv("DEFECTCLS_CACHE_DIR", str(tmp_path / "cache"))
    first = Predictor(d, device="cpu")
    assert first.backend == "onnx" and first.onnx_path.is_relative_to(tmp_path / "cache")
    assert not (d / "model.onnx").exists(), "the model directory stays as it was"
    stamp = first.onnx_path.stat().st_mtime_ns
    second = Predictor(d, device="cpu")
    assert second.onnx_path == first.onnx_path and second.onnx_path.stat().st_mtime_ns == stamp
    x = np.stack([first.preprocess(f) for f in files])
    np.testing.assert_allclose(second.probs(x), Predictor(d, device="cpu", backend="torch").probs(x), atol=1e-5)
    assert Predictor(d, device="cpu", export_missing=False).backend == "torch"
    monkeypatch.setenv("DEFECTCLS_AUTO_EXPORT", "0")
    assert Predictor(d, device="cpu").backend == "torch"


def test_auto_export_failure_runs_on_torch_with_a_warning(tiny_model, tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("DEFECTCLS_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="no ONNX graph for onnxruntime"):
        pred = Predictor(tiny_model, device="cpu", export_missing=True)
    assert pred.backend == "torch" and pred.probs(np.zeros((1, 1, 64, 64), np.float32)).shape == (1,)


def test_backends_agree(varied, files):
    t, o = Predictor(varied, device="cpu", backend="torch"), Predictor(varied, device="cpu", backend="onnx")
    x = np.stack([t.preprocess(f) for f in files])
    np.testing.assert_allclose(o.probs(x), t.probs(x), atol=1e-5)
    lt, ct = t.forward_cam(x)
    lo, co = o.forward_cam(x)
    # the heat-map graph's logits: onnxruntime's kernels sum in another order than torch's; on an AMD EPYC a
    # logit of 0.91 came out 2.3e-4 apart (1e-3 moves P(bad) by at most 2.5e-4, under export's FP32_TOL)
    np.testing.assert_allclose(lo, lt, atol=1e-3, rtol=1e-4)
    assert np.abs(normalize_cam(co, 64) - normalize_cam(ct, 64)).max() <= 1e-4
    for f in files[:3]:
        a, b = t.predict(f), o.predict(f)
        assert a.label == b.label and abs(a.prob_bad - b.prob_bad) <= 1e-5 and a.model_id == b.model_id


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_batch_equals_single(varied, files, tmp_path, backend):
    pred = Predictor(varied, device="cpu", backend=backend)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    srcs = [*files[:5], broken, *files[5:]]
    out = pred.predict_batch(srcs, batch_size=4)
    assert len(out) == len(srcs)
    assert isinstance(out[5], ImageLoadError)
    for src, r in zip(srcs, out, strict=True):
        if src == broken:
            continue
        single = pred.predict(src)
        assert r.label == single.label and abs(r.prob_bad - single.prob_bad) <= 1e-5


def test_scoring_batches_share_a_pixel_budget(varied, files, monkeypatch):
    """Views and members count against one batch's pixels (64 photos at 224 px), so a 448 px model with 8 views
    scores 2 photos a batch instead of 512 views at once; the answers do not depend on the batch."""
    from defectcls import data as D
    from defectcls.models import eval_batch

    assert (eval_batch(224), eval_batch(448, 8), eval_batch(160, 8, 5), eval_batch(4096, 8)) == (64, 2, 3, 1)
    pred = Predictor(varied, device="cpu", backend="torch")
    images, ok, _ = D.decode_all([D.Sample(str(f), 0) for f in files], 64, "gray", workers=1, use_disk_cache=False)
    images = images[ok]
    sizes = []
    real = pred.logits

    def logits(x):
        sizes.append(len(x))
        return real(x)

    monkeypatch.setattr(pred, "logits", logits)
    monkeypatch.setattr(pred.card, "tta", 8)         # as if the card said 448 px and 8 views (the photos
    monkeypatch.setattr(pred.card, "img_size", 448)  # themselves stay at 64 px): 2 photos a batch
    whole = pred.logits_cached(images, batch_size=len(images))
    sizes.clear()
    parts = pred.logits_cached(images)
    assert len(images) == 12 and sizes == [2] * 6 and np.allclose(parts, whole, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_threads_get_their_own_answers(varied, files, backend):
    pred = Predictor(varied, device="cpu", backend=backend)
    ref = {str(f): pred.predict(f).prob_bad for f in files}
    ref_cam = {str(f): explain(pred, f).cam for f in files[:4]}
    work = [f for _ in range(3) for f in files]

    def job(f):
        return str(f), pred.predict(f).prob_bad

    def cam_job(f):
        return str(f), explain(pred, f).cam

    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(job, work))
        cams = list(pool.map(cam_job, [f for _ in range(2) for f in files[:4]]))
    assert len({round(p, 4) for p in ref.values()}) >= len(files) // 2, "answers must differ for this test to mean anything"
    for name, p in got:
        assert abs(p - ref[name]) <= 1e-6
    for name, cam in cams:
        np.testing.assert_allclose(cam, ref_cam[name], atol=1e-6)


def test_stale_onnx_is_not_used(varied, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(varied, d)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    k = next(k for k, v in sd.items() if v.is_floating_point())
    sd[k] = sd[k] + 0.01
    save_file(sd, str(d / "model.safetensors"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert Predictor(d, device="cpu").backend == "torch"
    assert any("other weights" in str(x.message) for x in w)
    with pytest.raises(ModelLoadError, match="other weights"):
        Predictor(d, device="cpu", backend="onnx")


def test_bad_backend_arguments(tiny_model):
    with pytest.raises(DefectclsError, match="backend must be"):
        Predictor(tiny_model, backend="tensorrt")
    with pytest.raises(ModelLoadError, match="does not exist"):
        Predictor(tiny_model, device="cpu", backend="onnx")
