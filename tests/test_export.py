"""ONNX export (fp32 + int8) parity, the torch-free edge runtime, and the export command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from defectcls import data as D
from defectcls import perturb as P
from defectcls.edge import EdgePredictor
from defectcls.explain import explain
from defectcls.inference import Predictor


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    from defectcls.evaluate import prob_bad_from_logits
    from defectcls.export import _torch_reference, export_onnx, synthetic_inputs
    from defectcls.models import read_card

    d = tmp_path_factory.mktemp("exp") / "tiny"
    shutil.copytree(tiny_model, d)
    # A 3-epoch 64 px model scores every check part between ~0.35 and ~0.6 and its int8 copy moves
    # probabilities by up to ~0.26, so verdicts at its own threshold flip at random. The threshold goes
    # 0.3 above its highest check score: the test then checks the export's files, metadata and fp32
    # parity, and that int8 stays within that margin. Verdict parity on real models: docs/benchmarks-speed.md.
    card = read_card(d)
    logits, _ = _torch_reference(d, synthetic_inputs(card, 40, 12345, None)[0])  # export_onnx's check set
    top = float(prob_bad_from_logits(logits, card.temperature).max())
    raw = json.loads((d / "card.json").read_text())
    raw["threshold"] = min(top + 0.3, 0.999)
    (d / "card.json").write_text(json.dumps(raw))
    return d, export_onnx(d, int8=True, n_check=40, n_calib=8)


def test_export_report_and_files(exported):
    d, rep = exported
    assert rep["ok"] and rep["heatmap_output"] and rep["outputs"] == ["logits", "cam"]
    fp32, int8 = rep["parity"]["fp32"], rep["parity"]["int8"]
    assert fp32["n"] == 40 and fp32["max_prob_diff"] <= 1e-4
    assert int8["verdict_agreement"] >= 0.99 and int8["missed_bad"] == 0
    for kind, name in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        assert (d / name).is_file() and rep["files"][kind]["size_mb"] == pytest.approx((d / name).stat().st_size / 1e6, abs=1e-3)
    assert rep["files"]["int8"]["size_mb"] < rep["files"]["fp32"]["size_mb"] / 2
    assert not list(d.glob(".export*")), "temporary files left behind"


def test_onnx_metadata_carries_the_card(exported):
    import onnx

    d, rep = exported
    props = {p.key: p.value for p in onnx.load(str(d / "model.onnx")).metadata_props}
    card = json.loads(props["defectcls.card"])
    assert card["img_size"] == 64 and props["defectcls.model_id"] == rep["model_id"]
    # the edge runtime preprocesses as the card says, the photos' background (``restore_fill``) included
    assert card["background"] and EdgePredictor(d / "model.onnx").prep.background == tuple(card["background"])


@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx"])
def test_edge_matches_predictor(exported, tiny_data, name):
    """The torch-free runtime gives what the Predictor gives on the same file; fp32 also matches torch."""
    d, _ = exported
    edge = EdgePredictor(d / name)
    same = Predictor(d, device="cpu", backend="onnx", onnx_path=d / name)
    ref = Predictor(d, device="cpu", backend="torch")
    files = sorted((tiny_data / "bad").glob("*.png"))[:3] + sorted((tiny_data / "good").glob("*.png"))[:3]
    for f in files:
        r, s = edge.predict(f), same.predict(f)
        assert r["label"] == s.label and abs(r["prob_bad"] - s.prob_bad) <= 1e-9 and r["model_id"] == s.model_id
        assert r["notes"] == s.notes == []
        if name == "model.onnx":
            p = ref.predict(f)
            assert r["label"] == p.label and abs(r["prob_bad"] - p.prob_bad) <= 1e-4
    res, cam, img = edge.explain(files[0])
    assert edge.cam_offset == same.cam_offset == (15.5, 15.5)   # from the export's metadata / the architecture
    assert np.abs(cam - explain(same, files[0]).cam).max() <= 1e-6
    if name == "model.onnx":
        assert np.abs(cam - explain(ref, files[0]).cam).max() <= 1e-4
    assert cam.shape == (64, 64) and img.shape == (96, 96)
    batch = edge.predict_batch([files[0], b"not an image", files[1]])
    assert "error" in batch[1] and batch[0]["label"] == edge.predict(files[0])["label"]
    tilted = P.affine(D.load_image(files[0]), squash=0.6, squash_angle=30)      # a camera off the part's axis
    for row in (edge.predict(tilted), edge.explain(tilted)[0], edge.predict_batch([tilted])[0]):
        assert row["notes"] == same.predict(tilted).notes and "oval" in row["notes"][0]
        assert row["held"] is True and row["label"] == same.predict(tilted).label == "bad"   # not judged: held
    assert edge.predict(files[3])["held"] is False
    soft = P.blur(D.load_image(files[0]), 3.0)             # out of focus: the export's card carries the training look
    assert edge.card["photo_range"] == same.card.photo_range
    assert edge.predict(soft)["notes"] == same.predict(soft).notes and "softer" in same.predict(soft).notes[0]


def test_edge_runs_without_torch(exported, tiny_data, tmp_path):
    d, _ = exported
    img = sorted((tiny_data / "bad").glob("*.png"))[0]
    code = ("import sys, json\n"
            "sys.modules['torch'] = None  # any torch import now fails\n"
            "from defectcls.edge import main\n"
            f"rc = main([{str(d / 'model.int8.onnx')!r}, {str(img)!r}, '--json', '--cam-dir', {str(tmp_path)!r}])\n"
            "sys.exit(rc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["label"] in ("good", "bad") and (tmp_path / f"{img.stem}_{row['label']}.jpg").is_file()


def test_edge_cli_says_when_a_part_is_held(exported, tmp_path, capsys):
    from PIL import Image

    from defectcls.edge import main

    d, _ = exported
    dark = tmp_path / "lamp_off.png"                 # no part in sight: bad whatever the model says
    Image.new("L", (96, 96), 3).save(dark)
    assert main([str(d / "model.onnx"), str(dark), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["held"] is True and row["label"] == "bad" and row["notes"][0].startswith("no round part")
    assert main([str(d / "model.onnx"), str(dark)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{dark}: bad (held) (P(bad)") and "note: no round part" in text


def test_export_cli(tiny_model, tmp_path, capsys):
    from defectcls.cli import main

    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    assert main(["export", "--model", str(d), "--out", str(tmp_path / "out"), "--n-check", "6", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and (tmp_path / "out" / "model.onnx").is_file() and not (d / "model.onnx").exists()
    assert main(["export", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ensure_onnx_exports_once_into_a_cache(tiny_model, tmp_path):
    from defectcls.export import ensure_onnx

    path = ensure_onnx(tiny_model, cache_dir=tmp_path)
    assert path.parent.parent == tmp_path / "onnx" and not (tiny_model / "model.onnx").exists()
    stamp = path.stat().st_mtime_ns
    assert ensure_onnx(tiny_model, cache_dir=tmp_path) == path and path.stat().st_mtime_ns == stamp
    assert Predictor(tiny_model, device="cpu", onnx_path=path).backend == "onnx"


def test_export_with_views_matches_torch_and_the_edge_runtime(tiny_model_tta, tiny_data, tmp_path):
    """A card with 8 test-time views exports them into the graph: onnxruntime (and so the edge box) answers
    as torch does, heat-map included; the cache keeps graphs with and without views apart."""
    from defectcls.explain import cam_fast
    from defectcls.export import ensure_onnx, export_onnx

    d = tmp_path / "m"
    shutil.copytree(tiny_model_tta, d)
    rep = export_onnx(d, n_check=8)
    assert rep["ok"] and rep["heatmap_output"] and rep["parity"]["fp32"]["cam_max_diff"] <= 1e-4
    files = sorted((tiny_data / "bad").glob("*.png"))[:3]
    torch_p = Predictor(d, device="cpu", backend="torch")
    onnx_p = Predictor(d, device="cpu", backend="onnx")
    x = np.stack([torch_p.preprocess(f) for f in files])
    np.testing.assert_allclose(onnx_p.logits(x), torch_p.logits(x), atol=1e-4)
    np.testing.assert_allclose(cam_fast(onnx_p, x)[1], cam_fast(torch_p, x)[1], atol=1e-3)
    edge = EdgePredictor(d / "model.onnx")
    for f in files:
        assert edge.predict(str(f))["prob_bad"] == pytest.approx(torch_p.predict(f).prob_bad, abs=1e-4)
    one = Predictor(d, device="cpu", backend="torch", tta=1)
    assert np.abs(one.logits(x) - torch_p.logits(x)).max() > 1e-4          # the views are really in the graph
    cache = tmp_path / "cache"
    assert ensure_onnx(tiny_model_tta, cache_dir=cache).parent.name.endswith("-tta8")


def test_export_counting_the_most_suspicious_views_matches_torch(tiny_model_tta, tiny_data, tmp_path):
    """A card that counts its 2 most suspicious of 8 views (tta_top) exports that choice into the graph; a graph
    exported counting all views no longer answers for it, and the cache keeps the two apart."""
    from defectcls.errors import ModelLoadError
    from defectcls.explain import cam_fast
    from defectcls.export import ensure_onnx, export_onnx

    d = tmp_path / "m"
    shutil.copytree(tiny_model_tta, d)
    assert export_onnx(d, n_check=4)["ok"]                    # all 8 views counted
    card = json.loads((d / "card.json").read_text())
    (d / "card.json").write_text(json.dumps({**card, "tta_top": 2}))
    with pytest.raises(ModelLoadError, match="counting all of its views but the card says 2"):
        Predictor(d, device="cpu", backend="onnx")
    rep = export_onnx(d, n_check=8)
    assert rep["ok"] and rep["heatmap_output"]
    files = sorted((tiny_data / "bad").glob("*.png"))[:3] + sorted((tiny_data / "good").glob("*.png"))[:3]
    torch_p, onnx_p = Predictor(d, device="cpu", backend="torch"), Predictor(d, device="cpu", backend="onnx")
    x = np.stack([torch_p.preprocess(f) for f in files])
    np.testing.assert_allclose(onnx_p.logits(x), torch_p.logits(x), atol=1e-4)
    np.testing.assert_allclose(cam_fast(onnx_p, x)[1], cam_fast(torch_p, x)[1], atol=1e-3)
    every = Predictor(d, device="cpu", backend="torch", tta_top=0)
    assert np.abs(every.logits(x) - torch_p.logits(x)).max() > 1e-4      # the choice is really in the graph
    assert ensure_onnx(d, cache_dir=tmp_path / "cache") == d / "model.onnx"
    assert ensure_onnx(d, cache_dir=tmp_path / "cache", views=4).parent.name.endswith("-tta4-top2")


def test_cam_agreement_scores_only_the_selected_parts():
    from defectcls.export import _cam_agreement

    rng = np.random.default_rng(0)
    a = rng.random((4, 7, 7)).astype(np.float32)
    b = a.copy()
    b[3] = np.roll(a[3], 3, axis=1)          # a different map on part 3
    b[0] = rng.random((7, 7))                # and on part 0, which is not selected
    where = np.array([False, True, True, True])
    rep = _cam_agreement(a, b, 56, where)
    assert rep["cam_bad_n"] == 3
    assert rep["cam_bad_peak_agreement"] == pytest.approx(2 / 3)
    assert rep["cam_bad_mean_abs_diff_p50"] < 1e-6 < rep["cam_bad_mean_abs_diff_max"]
    same = _cam_agreement(a, a.copy(), 56, where)
    assert same["cam_bad_peak_agreement"] == 1.0 and same["cam_bad_mean_abs_diff_max"] < 1e-6
    assert _cam_agreement(a, b, 56, np.zeros(4, bool)) == {}


def test_export_of_an_avgmax_pooled_model_matches_torch(tiny_data, tmp_path):
    """The max half of --pool avgmax exports as a global max pool: fp32 ONNX gives torch's scores and maps."""
    from defectcls.export import export_onnx
    from defectcls.train import TrainConfig, train

    d = tmp_path / "avgmax"
    train(TrainConfig(data=str(tiny_data), out=str(d), arch="mobilenet_v3_large", epochs=1, img_size=64,
                      batch_size=16, progress=False, workers=1, disk_cache=False, epoch_size=0, pool="avgmax", tta=1))
    rep = export_onnx(d, n_check=16)
    assert rep["ok"] and rep["parity"]["fp32"]["max_prob_diff"] <= 1e-4
    img = sorted((tiny_data / "bad").glob("*.png"))[0]
    edge, ref = EdgePredictor(d / "model.onnx"), Predictor(d, device="cpu", backend="torch")
    r, p = edge.predict(img), ref.predict(img)
    assert r["label"] == p.label and abs(r["prob_bad"] - p.prob_bad) <= 1e-4
    _, cam, _ = edge.explain(img)   # the exported Grad-CAM graph pools as the network does
    assert cam.max() > 0 and np.abs(cam - explain(ref, img).cam).max() <= 1e-4


@pytest.mark.parametrize("how", ["probability", "verdict"])
def test_export_refuses_a_graph_that_moves_a_score_or_flips_a_verdict(tiny_model, tmp_path, monkeypatch, how):
    import defectcls.export as E
    from defectcls.errors import DefectclsError
    from defectcls.evaluate import prob_bad_from_logits
    from defectcls.models import read_card

    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    card = read_card(d)
    ref, _ = E._torch_reference(d, E.synthetic_inputs(card, 6, 12345, None)[0])   # export_onnx's check set
    p0 = float(prob_bad_from_logits(ref, card.temperature)[0])
    raw = json.loads((d / "card.json").read_text())
    if how == "probability":             # P(bad) of part 0 moves by ~0.1, beyond the tolerance; no verdict changes
        raw["threshold"], shift = 0.999, 0.5
    else:                                # P(bad) of part 0 moves by 5e-5, within the tolerance, across the threshold
        raw["threshold"], shift = p0 + 1e-5, 5e-5 * card.temperature / (p0 * (1 - p0))
    (d / "card.json").write_text(json.dumps(raw))
    real = E._run

    def nudged(session, x, batch):
        logits, cam = real(session, x, batch)
        logits = logits.copy()
        logits[0, -1] += shift
        return logits, cam

    monkeypatch.setattr(E, "_run", nudged)
    with pytest.raises(DefectclsError, match="disagrees") as err:
        E.export_onnx(d, n_check=6)
    assert ("verdicts agree on 83.3%" in str(err.value)) == (how == "verdict")
    assert not (d / "model.onnx").exists() and not list(d.glob(".export*"))
    rep = E.export_onnx(d, n_check=6, check=False)           # reported, not raised, without the check
    assert not rep["ok"] and rep["parity"]["fp32"]["verdict_agreement"] == (5 / 6 if how == "verdict" else 1.0)
