import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from defectcls import experiment as X
from defectcls.errors import DefectclsError

ARCHS = ["mobilenet_v3_small", "resnet18"]
FAST = dict(epochs=1, img_size=32, seed=0)


@pytest.fixture(scope="module")
def masked_data(tmp_path_factory):
    """Synthetic parts with defect masks (masks/bad_*.png), small enough for one-epoch runs."""
    from defectcls.synth import generate

    os.environ.setdefault("DEFECTCLS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("masked")
    generate(out, n_good=30, n_bad=16, seed=11, size=64, masks=True)
    return out


@pytest.fixture
def one_pass_epochs(monkeypatch):
    """The recipe with one pass an epoch: the tiny sets here would otherwise be repeated to 4096 samples."""
    train_model = X.train_model
    monkeypatch.setattr(X, "train_model", lambda *a, **kw: train_model(*a, **{"epoch_size": 0, **kw}))


def _table_rows(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("|---")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


def test_rgb_vs_gray(masked_data, tmp_path, one_pass_epochs):
    res = X.run_rgb_vs_gray(masked_data, tmp_path, arch="mobilenet_v3_small", n_cam=3, **FAST)
    for f in ("report.md", "results.json", "cams.png"):
        assert (tmp_path / f).is_file()
    assert [r[0] for r in _table_rows((tmp_path / "report.md").read_text())] == ["rgb", "gray"]
    cards = [json.loads((tmp_path / "models" / f"mobilenet_v3_small_{c}" / "card.json").read_text()) for c in ("rgb", "gray")]
    assert [c["in_chans"] for c in cards] == [3, 1] and [c["color"] for c in cards] == ["rgb", "gray"]
    assert len(res["cam_samples"]) == 3 and all(0 <= s[c]["prob_bad"] <= 1 for s in res["cam_samples"] for c in ("rgb", "gray"))
    assert json.loads((tmp_path / "results.json").read_text())["experiment"] == "rgb-vs-gray"


def test_archs_sorted_by_metric_priority_with_robustness_size_and_latency(masked_data, tmp_path, one_pass_epochs):
    res = X.run_archs(masked_data, tmp_path, archs=ARCHS, perturb_names="rotate90,noise8", latency_iters=2,
                      arch_epochs={"resnet18": 2}, **FAST)
    rows = res["rows"]
    assert sorted(r["arch"] for r in rows) == sorted(ARCHS)
    assert [X._sort_key(r) for r in rows] == sorted(X._sort_key(r) for r in rows)
    for r in rows:
        assert r["size_mb"] > 0 and r["cpu"]["p50_ms"] > 0 and r["worst_fnr_under"].split()[0] in ("rotate90", "noise8")
        assert (tmp_path / "perturb" / r["arch"] / "perturb.md").is_file()
    assert {r["arch"]: r["epochs"] for r in rows} == {"mobilenet_v3_small": 1, "resnet18": 2}
    table = _table_rows((tmp_path / "report.md").read_text())
    assert [t[1] for t in table] == [r["arch"] for r in rows]
    assert (tmp_path / "archs.png").is_file()
    partial = json.loads((tmp_path / "rows.partial.json").read_text())     # written after each architecture
    assert sorted(r["arch"] for r in partial) == sorted(ARCHS) and all(r["cpu"]["p50_ms"] > 0 for r in partial)


def test_cam_localization_pointing_game(masked_data, tmp_path, one_pass_epochs):
    res = X.run_cam_localization(masked_data, tmp_path, archs=ARCHS, **FAST)
    methods = ("gradcam", "gradcam++", "eigencam")
    assert [(r["arch"], r["method"]) for r in res["rows"]] == [(a, m) for a in ARCHS for m in methods]
    for r in res["rows"]:
        assert r["n"] >= 1 and 0 <= r["rate"] <= 1 and 0 < r["chance"] < 1 and r["split"] == "test"
    assert len(_table_rows((tmp_path / "report.md").read_text())) == 6
    assert (tmp_path / "pointing.png").is_file() and (tmp_path / "samples.png").is_file()
    with pytest.raises(DefectclsError, match="masks"):
        X.run_cam_localization(masked_data / "good", tmp_path / "x", archs=ARCHS[:1], **FAST)


def test_cam_localization_scores_given_models_without_training(masked_data, tiny_model, tmp_path):
    twin = tmp_path / "twin"                       # a second model of the same architecture
    shutil.copytree(tiny_model, twin)
    out = tmp_path / "r"
    res = X.run_cam_localization(masked_data, out, models=[tiny_model, twin], methods=["gradcam"])
    n_bad = len(list((masked_data / "bad").glob("*.png")))
    assert [(r["model"], r["arch"], r["method"], r["split"], r["n"]) for r in res["rows"]] == \
        [(str(m), "mobilenet_v3_large", "gradcam", "all", n_bad) for m in (tiny_model, twin)]   # every bad part
    assert res["rows"][0]["hits"] == res["rows"][1]["hits"]          # same weights, same heat-maps
    assert res["models"] == [str(tiny_model), str(twin)] and not (out / "models").exists()
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | arch |")      # the table tells the two models apart
    assert [line.split(" | ")[0].lstrip("| ") for line in table[1:]] == [str(tiny_model), str(twin)]
    with pytest.raises(DefectclsError, match="not a model directory"):
        X.run_cam_localization(masked_data, tmp_path / "y", models=[tmp_path])


def test_pointing_hit_and_dilated_mask(tmp_path):
    from PIL import Image

    cam = np.zeros((8, 8), np.float32)
    cam[2, 5] = 1
    mask = np.zeros((8, 8), bool)
    mask[2, 5] = True
    assert X.pointing_hit(cam, mask) and not X.pointing_hit(cam, ~mask)
    assert not X.pointing_hit(np.ones((8, 8), np.float32), np.ones((8, 8), bool))   # a flat map points nowhere
    m = np.zeros((64, 64), np.uint8)
    m[30:34, 30:34] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    assert X.mask_at(tmp_path / "m.png", 64, 0.05).sum() > X.mask_at(tmp_path / "m.png", 64, 0.0).sum() >= 16


def test_data_size_curve_and_cli_reuse(masked_data, tmp_path, capsys):
    from defectcls.cli import main

    res = X.run_data_size(masked_data, tmp_path, sizes="8,16,full", arch="mobilenet_v3_small", **FAST)
    rows = res["rows"]
    assert [r["size"] for r in rows] == ["8", "16", "full"]
    assert (rows[0]["n_good"], rows[0]["n_bad"]) == X.caps_for("8") and rows[1]["n_train"] == 16
    assert rows[0]["n_train"] < rows[1]["n_train"] < rows[2]["n_train"]
    assert [t[0] for t in _table_rows((tmp_path / "report.md").read_text())] == ["8", "16", "full"]
    assert (tmp_path / "data_size.png").is_file()
    for r in rows:                                  # what a 1% target would cost, from each card's trade-off
        tradeoff = json.loads((Path(r["model_dir"]) / "card.json").read_text())["threshold_policy"]["tradeoff"]
        assert r["val_fpr_at_fnr_1pct"] == [t["val_fpr"] for t in tradeoff if t["target_fnr"] == 0.01][0]
    weights = tmp_path / "models" / "n8" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    capsys.readouterr()
    rc = main(["experiment", "data-size", "--data", str(masked_data), "--out", str(tmp_path), "--sizes", "8",
               "--archs", "mobilenet_v3_small", "--epochs", "1", "--img-size", "32", "--reuse", "--json"])
    assert rc == 0 and weights.stat().st_mtime_ns == before                 # same settings: not trained again
    assert json.loads(capsys.readouterr().out)["rows"][0]["size"] == "8"
    card_path = tmp_path / "models" / "n8" / "card.json"
    card = json.loads(card_path.read_text())
    assert card["tta"] == 8
    card["tta"] = 1                                                          # a model from before the views
    card_path.write_text(json.dumps(card))
    res = X.run_data_size(masked_data, tmp_path, sizes="8", arch="mobilenet_v3_small", reuse=True, **FAST)
    assert weights.stat().st_mtime_ns == before and json.loads(card_path.read_text())["tta"] == 8  # recalibrated
    assert res["rows"][0]["test_fpr"] == json.loads(card_path.read_text())["metrics"]["test"]["fpr"]
    card = json.loads(card_path.read_text())
    n_train = card["train"]["n"]["train"]
    del card["train"]["config"]["epoch_size"]           # a model from before --epoch-size (one pass an epoch) ...
    card["train"]["n"]["train"] = 5000                  # ... on a set larger than an epoch: the same training
    card_path.write_text(json.dumps(card))
    X.run_data_size(masked_data, tmp_path, sizes="8", arch="mobilenet_v3_small", reuse=True, **FAST)
    assert weights.stat().st_mtime_ns == before
    card["train"]["n"]["train"] = n_train               # ... on a small set: the recipe now repeats it, train again
    card_path.write_text(json.dumps(card))
    X.run_data_size(masked_data, tmp_path, sizes="8", arch="mobilenet_v3_small", reuse=True, **FAST)
    assert weights.stat().st_mtime_ns != before
    assert json.loads(card_path.read_text())["train"]["epoch_samples"] == 4096
    before = weights.stat().st_mtime_ns
    card = json.loads(card_path.read_text())
    card["train"]["stopped"] = "interrupted"            # a run ended by Ctrl-C is not the run asked for: train again
    card_path.write_text(json.dumps(card))
    X.run_data_size(masked_data, tmp_path, sizes="8", arch="mobilenet_v3_small", reuse=True, **FAST)
    assert weights.stat().st_mtime_ns != before and json.loads(card_path.read_text())["train"]["stopped"] == "completed"
    before = weights.stat().st_mtime_ns
    card = json.loads(card_path.read_text())
    for key in ("frame", "masks", "mask_weight", "extra_labels", "init", "rank_weight", "rank_k"):
        del card["train"]["config"][key]                # a model from before these options, trained as they are off
    card_path.write_text(json.dumps(card))
    X.run_data_size(masked_data, tmp_path, sizes="8", arch="mobilenet_v3_small", reuse=True, **FAST)
    assert weights.stat().st_mtime_ns == before
    del card["train"]["config"]["focus_restore"]        # ... and from before the focus restore: not today's recipe
    card_path.write_text(json.dumps(card))
    X.run_data_size(masked_data, tmp_path, sizes="8", arch="mobilenet_v3_small", reuse=True, **FAST)
    assert weights.stat().st_mtime_ns != before and json.loads(card_path.read_text())["train"]["config"]["focus_restore"]
    before = weights.stat().st_mtime_ns
    card = json.loads(card_path.read_text())
    assert "held_bad_val" in card["threshold_policy"]
    del card["threshold_policy"]["held_bad_val"]        # a model from before held photos: its epoch and threshold
    card_path.write_text(json.dumps(card))              # counted them, so it is not today's recipe either
    X.run_data_size(masked_data, tmp_path, sizes="8", arch="mobilenet_v3_small", reuse=True, **FAST)
    assert weights.stat().st_mtime_ns != before and "held_bad_val" in json.loads(card_path.read_text())["threshold_policy"]


def test_sizes_and_caps():
    assert X.caps_for("1350") == (1000, 350) and X.caps_for("full") is None
    assert sum(X.caps_for("100")) == 100
    with pytest.raises(DefectclsError, match="--sizes"):
        X.parse_sizes("100,lots")
