"""Fast one-pass Grad-CAM against pytorch-grad-cam, overlays and encoders."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from defectcls.bench import calibrate_bn
from defectcls.data import preprocess
from defectcls.explain import (
    CAM_METHODS,
    cam_fast,
    cam_library,
    cam_split,
    encode_jpeg,
    encode_png,
    explain,
    gradcam_torch,
    make_cam_graph,
    normalize_cam,
    overlay,
)
from defectcls.inference import Predictor
from defectcls.models import build_model, cam_target_layer
from defectcls.synth import render_part

SIZE = 96


def _parts(n: int = 3) -> torch.Tensor:
    """Synthetic parts through the one preprocessing path, at SIZE."""
    return torch.from_numpy(np.stack([preprocess(np.asarray(render_part(100 + i, i % 2 == 0, 2 * SIZE)[0]), SIZE, "gray",
                                                 [0.5], [0.25]) for i in range(n)]))


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "resnet50"])
def test_fast_gradcam_equals_pytorch_grad_cam(arch):
    """Untrained, seeded weights: the identity holds for any weights. Both logits are checked as targets,
    and all-zero maps (nothing to compare) must not be all there is. BatchNorm statistics come from the
    inputs, so that activations reach the non-linear range of the classifier head's Hardswish."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = build_model(arch)
    x = _parts()
    calibrate_bn(model, x)     # realistic activation scales (untrained MobileNetV3 activations vanish to ~1e-9)
    full = model(x).detach()
    informative = 0
    for target in (0, 1):
        logits, raw = gradcam_torch(cam_split(model, arch), x, target)
        fast = normalize_cam(raw.numpy(), SIZE)
        with GradCAM(model=model, target_layers=[cam_target_layer(model, arch)]) as cam:
            lib = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)] * len(x))
        assert fast.shape == lib.shape == (len(x), SIZE, SIZE)
        assert np.abs(fast - lib).max() <= 1e-4
        with torch.no_grad():
            g_logits, g_raw = make_cam_graph(model, arch, target)(x)     # the graph ONNX export writes
        assert np.abs(normalize_cam(g_raw.numpy(), SIZE) - lib).max() <= 1e-4
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)       # the verdict comes from the same pass
        torch.testing.assert_close(g_logits, full, atol=1e-5, rtol=0)
        informative += int(np.sum(lib.max(axis=(1, 2)) - lib.min(axis=(1, 2)) > 0.5))
    assert informative >= 3


def test_predictor_fast_cam_equals_library(tiny_model, tiny_data):
    """Through the Predictor (channels-last model, card preprocessing) on a trained model."""
    pred = Predictor(tiny_model, device="cpu", backend="torch")
    x = np.stack([pred.preprocess(f) for f in sorted((tiny_data / "bad").glob("*.png"))[:3]])
    logits, fast = cam_fast(pred, x)
    for i in range(len(x)):
        assert np.abs(fast[i] - cam_library(pred, x[i])).max() <= 1e-4
    np.testing.assert_allclose(logits, pred.logits(x), atol=1e-5)


def test_offset_draws_each_cell_over_the_pixels_it_looks_at():
    """A single hot cell (3, 2) of a 7x7 map at 224 px: the usual scaling peaks at its half-pixel centre
    (32 i + 15.5), the offset one on the pixel the cell is centred on (32 i, ``models.cam_offset``)."""
    raw = np.zeros((1, 7, 7), np.float32)
    raw[0, 3, 2] = 1.0

    def peak(cam):
        return np.unravel_index(int(np.argmax(cam[0])), cam.shape[1:])

    assert peak(normalize_cam(raw, 224)) == (111, 79)          # 111.5 and 79.5, first of the tied pair
    assert peak(normalize_cam(raw, 224, (15.5, 15.5))) == (96, 64)
    assert peak(normalize_cam(raw, (224, 160), (0.0, 15.5 * 160 / 224))) == (111, round(2 * 160 / 7))   # cell 2 at 2 S


@pytest.mark.parametrize("raw_hw,out_hw", [((7, 5), (70, 63)), ((14, 14), (448, 448)), ((10, 10), (320, 320))])
def test_normalize_cam_scales_like_the_library(raw_hw, out_hw):
    from pytorch_grad_cam.utils.image import scale_cam_image

    rng = np.random.default_rng(0)
    raw = rng.normal(size=(4, *raw_hw)).astype(np.float32)
    lib = scale_cam_image(scale_cam_image(np.maximum(raw, 0), out_hw[::-1]))   # (width, height) as the library takes it
    assert np.abs(normalize_cam(raw, out_hw) - lib).max() <= 1e-5


def test_explain_prediction_is_predict(tiny_model, tiny_data):
    pred = Predictor(tiny_model, device="cpu", backend="torch")
    files = sorted((tiny_data / "bad").glob("*.png"))[:2] + sorted((tiny_data / "good").glob("*.png"))[:2]
    for f in files:
        ex = explain(pred, f)
        ref = pred.predict(f)
        assert ex.prediction.label == ref.label
        assert abs(ex.prediction.prob_bad - ref.prob_bad) <= 1e-6
        assert ex.cam.shape == (pred.card.img_size,) * 2 and ex.cam.dtype == np.float32
        assert 0.0 <= ex.cam.min() and ex.cam.max() <= 1.0
        assert ex.image.shape == (96, 96)
        assert {"decode", "preprocess", "model_cam"} <= set(ex.timings_ms)


@pytest.mark.parametrize("method", [m for m in CAM_METHODS if m != "gradcam"])
def test_library_methods(tiny_model, tiny_data, method):
    pred = Predictor(tiny_model, device="cpu", backend="torch")
    f = sorted((tiny_data / "bad").glob("*.png"))[0]
    ex = explain(pred, f, method)
    assert ex.cam.shape == (pred.card.img_size,) * 2
    assert abs(ex.prediction.prob_bad - pred.predict(f).prob_bad) <= 1e-6


def test_unknown_method(tiny_model, tiny_data):
    with pytest.raises(ValueError, match="unknown CAM method"):
        explain(Predictor(tiny_model, device="cpu"), sorted((tiny_data / "bad").glob("*.png"))[0], "nope")


def test_overlay_shapes_and_geometry():
    gray = np.full((96, 96), 100, np.uint8)
    cam = np.zeros((64, 64), np.float32)
    assert overlay(gray, cam).shape == (96, 96, 3)
    assert overlay(gray, cam, size=48).shape == (48, 48, 3)
    assert overlay(np.zeros((60, 100, 3), np.uint8), cam, size=50).shape == (30, 50, 3)
    assert overlay(np.zeros((64, 40), np.uint8), cam, size=32).dtype == np.uint8
    # a wide image sits in the middle rows of the model's padded square: heat there lands on the image
    wide = np.zeros((50, 100), np.uint8)
    cam = np.zeros((100, 100), np.float32)
    cam[25:75, :50] = 1.0
    out = overlay(wide, cam, alpha=1.0).astype(int)
    left, right = out[:, :40], out[:, 60:]
    assert left[..., 0].mean() > 100 and right[..., 0].mean() < 10      # jet: hot = red, cold = dark blue
    assert right[..., 2].mean() > 100


def test_encoders_round_trip():
    arr = (np.random.default_rng(1).random((40, 30, 3)) * 255).astype(np.uint8)
    jpg, png = encode_jpeg(arr, quality=80), encode_png(arr)
    assert jpg[:2] == b"\xff\xd8" and png[:4] == b"\x89PNG"
    assert np.asarray(Image.open(io.BytesIO(jpg))).shape == (40, 30, 3)
    assert (np.asarray(Image.open(io.BytesIO(png))) == arr).all()


@pytest.mark.parametrize("arch,top", [("mobilenet_v3_large", 0), ("resnet50", 0), ("mobilenet_v3_large", 2)])
def test_fast_gradcam_with_views_is_the_mean_of_each_views_map_turned_upright(arch, top):
    """With test-time views the verdict is the mean of the views' logits (DihedralTTA; with TOP, of the TOP
    most suspicious views') and the map the mean of each view's own Grad-CAM, turned back upright; the ONNX
    graph computes the same."""
    from defectcls.models import DihedralTTA, dihedral_views, merge_view_maps

    torch.manual_seed(0)
    model = build_model(arch)
    x = _parts(2)
    calibrate_bn(model, x)
    views = 8
    logits, raw = gradcam_torch(cam_split(model, arch, views, top), x)
    per_logits, per_raw = gradcam_torch(cam_split(model, arch), dihedral_views(x, views))
    torch.testing.assert_close(raw, merge_view_maps(per_raw, views), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(logits, DihedralTTA(model, views, top)(x), atol=1e-5, rtol=0)
        if top:   # not the mean over all views: the TOP views' own
            assert float((logits - DihedralTTA(model, views)(x)).abs().max()) > 1e-4
        g_logits, g_raw = make_cam_graph(model, arch, views=views, top=top)(x)
    torch.testing.assert_close(g_logits, logits, atol=1e-5, rtol=0)
    assert np.abs(normalize_cam(g_raw.numpy(), SIZE) - normalize_cam(raw.numpy(), SIZE)).max() <= 1e-4
    # the views do not agree (else the test would not tell merging from taking the first view)
    assert float((per_raw[:2] - per_raw[2:4]).abs().max()) > 1e-3


def test_library_methods_with_views_give_the_models_verdict(tiny_model_tta, tiny_data):
    """pytorch-grad-cam draws the upright view's map; the verdict is the model's, over all its views."""
    pred = Predictor(tiny_model_tta, device="cpu", backend="torch")
    f = sorted((tiny_data / "bad").glob("*.png"))[0]
    ex = explain(pred, f, method="gradcam++")
    assert ex.prediction.prob_bad == pytest.approx(pred.predict(f).prob_bad, abs=1e-6)
    one = Predictor(tiny_model_tta, device="cpu", backend="torch", tta=1)
    assert abs(one.predict(f).prob_bad - ex.prediction.prob_bad) > 1e-6   # the views moved it


def test_an_oval_part_gets_a_note_wherever_a_verdict_is_given(tiny_model, tiny_data, tmp_path, capsys):
    from defectcls import data as D
    from defectcls import perturb as P
    from defectcls.cli import main

    pred = Predictor(tiny_model, device="cpu", backend="torch")
    straight = sorted((tiny_data / "good").glob("*.png"))[0]
    tilted = tmp_path / "tilted.png"
    Image.fromarray(P.affine(D.load_image(straight), squash=0.6, squash_angle=30)).save(tilted)
    assert pred.predict(straight).notes == [] and explain(pred, straight).prediction.notes == []
    batch = pred.predict_batch([straight, b"not an image", tilted])
    for r in (pred.predict(tilted), explain(pred, tilted).prediction, batch[2]):
        assert len(r.notes) == 1 and "oval" in r.notes[0] and r.to_dict()["notes"] == r.notes
    assert batch[0].notes == []
    assert main(["predict", str(straight), str(tilted), "--model", str(tiny_model)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{straight}: ") and out[1].startswith(f"{tilted}: ")
    assert out[2].startswith("  note: the part looks oval") and len(out) == 3


def test_a_photo_softer_than_the_training_photos_gets_a_note(tiny_model, tiny_data, tmp_path):
    """Training records what its photos look like on the card; every verdict compares the photo with it."""
    from defectcls import data as D
    from defectcls import perturb as P
    from defectcls.models import read_card

    card = read_card(tiny_model)
    measured = D.estimate_photo_range([s.path for s in D.scan_folder(tiny_data)], "gray", seed=0)
    assert card.photo_range == {**measured, "training_files": True, "zoom": 0.0}   # (trained without zoom)
    pred = Predictor(tiny_model, device="cpu", backend="torch")
    assert pred.prep.photo_range == card.photo_range
    sharp = sorted((tiny_data / "good").glob("*.png"))[1]
    soft = tmp_path / "soft.png"
    Image.fromarray(P.blur(D.load_image(sharp), 3.0)).save(soft)      # out of focus
    assert pred.predict(sharp).notes == [] and explain(pred, sharp).prediction.notes == []
    for r in (pred.predict(soft), explain(pred, soft).prediction, pred.predict_batch([sharp, soft])[1]):
        assert len(r.notes) == 1 and r.notes[0].startswith("the photo looks softer than in training")
    # and judged sharpened back (data.restore_focus), the sharp photo as it is
    assert card.focus_below == card.photo_range["sharpness"][0] and pred.prep.focus_below == card.focus_below
    def p_bad(path, focus_below):
        x = D.fit_frame(D.load_image(path), card.img_size, card.frame_ref, card.background, focus_below)
        return float(pred.probs(D.normalize(x, card.mean, card.std)[None])[0])

    assert abs(p_bad(soft, card.focus_below) - p_bad(soft, None)) > 1e-6
    assert pred.predict(soft).prob_bad == pytest.approx(p_bad(soft, card.focus_below), abs=1e-6)
    assert explain(pred, soft).prediction.prob_bad == pytest.approx(p_bad(soft, card.focus_below), abs=1e-5)
    assert pred.predict(sharp).prob_bad == pytest.approx(p_bad(sharp, None), abs=1e-6)
    pred.prep = D.Preprocessing.from_card({**card.to_dict(), "photo_range": None})   # a card from before it
    assert pred.predict(soft).notes == []
