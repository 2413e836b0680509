"""The one-view screen of a model with test-time views: verdicts, heat-maps, calibration and export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from defectcls.data import scan_folder
from defectcls.edge import session_meta
from defectcls.errors import DefectclsError
from defectcls.evaluate import at_temperature, prob_bad_from_logits
from defectcls.explain import SCREEN_GRID, normalize_cam, regrid_cam
from defectcls.inference import Predictor
from defectcls.models import read_card, write_card
from defectcls.scoring import SCREEN_MARGIN, evaluate_model, recalibrate


@pytest.fixture(scope="module")
def inputs(tiny_model_tta, tiny_data):
    pred = Predictor(tiny_model_tta, device="cpu", backend="torch")
    paths = [s.path for s in scan_folder(tiny_data)][::3]
    return np.stack([pred.preprocess(p) for p in paths])


def _screened(src, dst, below: float, above: float | None = None):
    shutil.copytree(src, dst)
    card = read_card(dst)
    card.screen = {"views": 1, "below": float(below)} | ({} if above is None else {"above": float(above)})
    write_card(card, dst)
    return dst


def test_screen_decides_clear_parts_with_one_view_and_gives_the_rest_all_views(tiny_model_tta, inputs, tmp_path):
    one = Predictor(tiny_model_tta, device="cpu", backend="torch", tta=1)
    full = Predictor(tiny_model_tta, device="cpu", backend="torch")
    z1, z8 = one.logits(inputs), full.logits(inputs)
    p1 = prob_bad_from_logits(z1, full.card.temperature)
    below, above = (float(q) for q in np.quantile(p1, [0.3, 0.7]))
    d = _screened(tiny_model_tta, tmp_path / "m", below, above)
    pred = Predictor(d, device="cpu", backend="torch")
    assert (pred.screen_below, pred.screen_above) == (below, above) and pred._screen.card.tta == 1
    at_once = (p1 < below) | (p1 > above)
    assert (p1 < below).any() and (p1 > above).any() and not at_once.all()
    z = pred.logits(inputs)
    np.testing.assert_allclose(z[at_once], z1[at_once], atol=1e-5)
    np.testing.assert_allclose(z[~at_once], z8[~at_once], atol=1e-5)
    assert not np.allclose(z1[~at_once], z8[~at_once], atol=1e-4)     # the views do change these answers
    # a card with only "below" gives every part from it up all views
    only_below = Predictor(_screened(tiny_model_tta, tmp_path / "b", below), device="cpu", backend="torch")
    np.testing.assert_allclose(only_below.logits(inputs)[p1 >= below], z8[p1 >= below], atol=1e-5)
    # screen=False, or other views asked for: the full model, no screen
    np.testing.assert_allclose(Predictor(d, device="cpu", backend="torch", screen=False).logits(inputs), z8, atol=1e-5)
    assert Predictor(d, device="cpu", backend="torch", tta=4)._screen is None


def test_screened_heat_maps_are_drawn_like_each_parts_own(tiny_model_tta, inputs, tmp_path):
    one = Predictor(tiny_model_tta, device="cpu", backend="torch", tta=1)
    full = Predictor(tiny_model_tta, device="cpu", backend="torch")
    (z1, c1), (z8, c8) = one.forward_cam(inputs), full.forward_cam(inputs)
    p1 = prob_bad_from_logits(z1, full.card.temperature)
    d = _screened(tiny_model_tta, tmp_path / "m", float(np.median(p1)))
    pred = Predictor(d, device="cpu", backend="torch")
    z, maps = pred.forward_cam(inputs)
    cleared = p1 < pred.screen_below
    assert maps.shape == (len(inputs), SCREEN_GRID * c1.shape[-2], SCREEN_GRID * c1.shape[-1])
    np.testing.assert_allclose(z[cleared], z1[cleared], atol=1e-5)
    np.testing.assert_allclose(z[~cleared], z8[~cleared], atol=1e-5)
    size = inputs.shape[-2:]
    got = normalize_cam(maps, size, pred.cam_offset)
    own = np.where(cleared[:, None, None], normalize_cam(c1, size, one.cam_offset), normalize_cam(c8, size, full.cam_offset))
    assert one.cam_offset != full.cam_offset              # the one-view map is drawn elsewhere: the regrid moves it
    for g, o in zip(got, own, strict=True):
        if o.max() - o.min() < 1e-3:                      # a flat map has no shape to compare
            continue
        assert np.corrcoef(g.ravel(), o.ravel())[0, 1] > 0.97
        gy, gx = np.unravel_index(g.argmax(), g.shape)
        oy, ox = np.unravel_index(o.argmax(), o.shape)
        assert abs(gy - oy) <= size[0] / 8 and abs(gx - ox) <= size[1] / 8


def test_calibrate_with_screen_records_it_and_scores_the_screened_model(tiny_model_tta, tiny_data, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_tta, d)
    res = recalibrate(d, 0.0, data_root=tiny_data, screen=True)
    sc = read_card(d).screen
    assert sc == res["screen"] and sc["views"] == 1
    t, t_pol = res["temperature"], res["threshold_policy"]["chosen_at_temperature"]   # the margin is the policy's

    def at_policy(p):
        return at_temperature(p, t, t_pol)

    assert at_policy(sc["below"]) == pytest.approx(min(SCREEN_MARGIN * at_policy(sc["lowest_flagged_bad"]),
                                                       at_policy(res["threshold"])))
    assert sc["above"] == pytest.approx(max(sc["highest_good"], res["threshold"])) and sc["above"] > sc["below"]
    assert sc["clear_miss_bound"] == pytest.approx(1 / (sc["n_flagged_bad_val"] + 1))
    # the recorded test metrics are those of the screened Predictor on the test part
    pred = Predictor(d, device="cpu", backend="torch")
    assert pred.screen_below == sc["below"]
    test = evaluate_model(d, tiny_data, split="test", predictor=pred)["metrics"]
    for k in ("tp", "fp", "tn", "fn"):
        assert test[k] == res["metrics"]["test"][k]
    assert test["auroc"] == pytest.approx(res["metrics"]["test"]["auroc"])
    # no flagged validation bad part is cleared by the screen it was chosen from
    val = evaluate_model(d, tiny_data, split="val", predictor=pred)
    full = evaluate_model(d, tiny_data, split="val", predictor=Predictor(d, device="cpu", backend="torch", screen=False))
    y, p_full, p = (np.array(val["y_true"]), np.array(full["prob_bad"]), np.array(val["prob_bad"]))
    flagged = (y == 1) & (p_full >= res["threshold"])
    assert flagged.any() and (p[flagged] >= res["threshold"]).all()
    # and no validation good part is called bad that all views call good: on its own validation part
    # the screen misses no more and rejects no more than the full model
    assert not ((y == 0) & (p >= res["threshold"]) & (p_full < res["threshold"])).any()
    # calibrating again without --screen removes it (it belongs to the threshold it was chosen with)
    again = recalibrate(d, 0.0, data_root=tiny_data)
    assert again["screen"] is None and read_card(d).screen is None and again["before"]["screen"] == sc


def test_screen_needs_views(tiny_model, tiny_data, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    before = (d / "card.json").read_text()
    with pytest.raises(DefectclsError, match="--screen needs test-time views"):
        recalibrate(d, 0.0, data_root=tiny_data, screen=True)
    assert (d / "card.json").read_text() == before


def test_screen_on_onnxruntime_runs_a_one_view_graph_beside_the_full_one(tiny_model_tta, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("DEFECTCLS_AUTO_EXPORT", "1")
    monkeypatch.setenv("DEFECTCLS_CACHE_DIR", str(tmp_path / "cache"))
    torch_pred = Predictor(tiny_model_tta, device="cpu", backend="torch", tta=1)
    p1 = prob_bad_from_logits(torch_pred.logits(inputs), torch_pred.card.temperature)
    d = _screened(tiny_model_tta, tmp_path / "m", float(np.median(p1)))
    pred = Predictor(d, device="cpu")
    assert pred.backend == "onnx" and pred._screen.backend == "onnx"
    metas = [json.loads(session_meta(p.session)["card"])["tta"] for p in (pred, pred._screen)]
    assert metas == [8, 1]
    ref = Predictor(d, device="cpu", backend="torch")
    np.testing.assert_allclose(pred.logits(inputs), ref.logits(inputs), atol=2e-3)
    np.testing.assert_allclose(pred.forward_cam(inputs)[1].shape, ref.forward_cam(inputs)[1].shape)


def test_regrid_draws_a_one_view_cell_where_its_own_offset_does():
    """One hot cell of a 7x7 map at 224 px: resampled to the shared grid and drawn at the full model's
    offset, its peak lands where the one-view drawing puts it (31 px from where the opposite shift would)."""
    raw = np.zeros((1, 7, 7), np.float32)
    raw[0, 2, 4] = 1.0
    for offset in [(15.5, 15.5), (0.5, 0.5)]:
        want = normalize_cam(raw, 224, offset)[0]
        got = normalize_cam(regrid_cam(raw, (224, 224), offset, (0.0, 0.0)), 224, (0.0, 0.0))[0]
        assert got.shape == want.shape
        wy, wx = np.unravel_index(want.argmax(), want.shape)
        gy, gx = np.unravel_index(got.argmax(), got.shape)
        assert abs(gy - wy) <= 4 and abs(gx - wx) <= 4, (offset, (gy, gx), (wy, wx))
        assert np.abs(got - want).mean() < 0.02


def test_bench_reports_both_paths_of_a_screened_model(tiny_model_tta, tmp_path):
    from defectcls.bench import benchmark, format_table

    d = _screened(tiny_model_tta, tmp_path / "m", 0.5)
    res = benchmark({"screened": str(d)}, device="cpu", iters=2, warmup=1, batch=2, request_size=96, naive=False,
                    threads=1)
    sc = res["models"]["screened"]["screen"]
    assert sc["below"] == 0.5 and {sc["request_part"], sc["good_part"]} <= {"one view", "all views"}
    assert sc["one_view_forward_ms"]["p50"] > 0 and sc["e2e_good_ms"]["p95"] >= sc["e2e_good_ms"]["p50"] > 0
    assert "after a one-view screen" in format_table(res)
    assert "screen" not in benchmark({"plain": str(tiny_model_tta)}, device="cpu", iters=1, warmup=0, batch=1,
                                     request_size=96, naive=False, threads=1)["models"]["plain"]


def test_export_writes_the_screen_graph_and_the_edge_runtime_screens(tiny_model_tta, inputs, tmp_path, monkeypatch):
    from defectcls.edge import SCREEN_ONNX_FILE, EdgePredictor, make_session
    from defectcls.errors import ModelLoadError
    from defectcls.export import _set_metadata, export_onnx

    one = Predictor(tiny_model_tta, device="cpu", backend="torch", tta=1)
    p1 = prob_bad_from_logits(one.logits(inputs), one.card.temperature)
    below, above = (float(q) for q in np.quantile(p1, [0.3, 0.7]))
    d = _screened(tiny_model_tta, tmp_path / "m", below, above)
    rep = export_onnx(d, n_check=8)
    assert rep["ok"] and rep["parity"]["screen"]["ok"] and (d / SCREEN_ONNX_FILE).is_file() and "screen" in rep["files"]
    ref = Predictor(d, device="cpu", backend="torch")
    edge = EdgePredictor(d / "model.onnx")
    assert edge.screen_session is not None and (edge.screen_below, edge.screen_above) == (below, above)
    (z_e, cam_e), (z_t, cam_t) = edge.run(inputs, cam=True), ref.forward_cam(inputs)
    np.testing.assert_allclose(z_e, z_t, atol=1e-3)
    size = inputs.shape[-2:]
    np.testing.assert_allclose(normalize_cam(cam_e, size, edge.cam_offset), normalize_cam(cam_t, size, ref.cam_offset),
                               atol=1e-2)
    # onnxruntime in a full install takes the exported one-view graph too (no second export into the cache)
    monkeypatch.setenv("DEFECTCLS_AUTO_EXPORT", "1")
    monkeypatch.setenv("DEFECTCLS_CACHE_DIR", str(tmp_path / "cache"))
    auto = Predictor(d, device="cpu")
    assert auto.backend == "onnx" and auto._screen.onnx_path == d / SCREEN_ONNX_FILE
    # without the one-view graph the edge box gives every part all views
    (d / SCREEN_ONNX_FILE).rename(tmp_path / "screen.onnx")
    bare = EdgePredictor(d / "model.onnx")
    full = Predictor(d, device="cpu", backend="torch", screen=False)
    assert bare.screen_session is None
    np.testing.assert_allclose(bare.run(inputs)[0], full.logits(inputs), atol=1e-3)
    # a one-view graph of other weights is refused, not mixed in
    meta = {k: v for k, v in session_meta(make_session(tmp_path / "screen.onnx")).items()}
    _set_metadata(tmp_path / "screen.onnx", {**meta, "weights_sha256": "0" * 64})
    (tmp_path / "screen.onnx").rename(d / SCREEN_ONNX_FILE)
    with pytest.raises(ModelLoadError, match="other weights"):
        EdgePredictor(d / "model.onnx")
