import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from defectcls import experiment as X
from defectcls.errors import DefectclsError
from tests.helpers import share_threshold

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
    for r in rows:                                  # from each card: what a 1% target costs, the ranking's floor
        card = json.loads((Path(r["model_dir"]) / "card.json").read_text())
        tradeoff, test = card["threshold_policy"]["tradeoff"], card["metrics"]["test"]
        assert r["val_fpr_at_fnr_1pct"] == [t["val_fpr"] for t in tradeoff if t["target_fnr"] == 0.01][0]
        assert r["test_fpr_at_no_miss"] == test["fpr_at_no_miss"] and 0 <= r["test_fpr_at_no_miss"] <= 1
        if r["test_fn"] == 0:                       # the card misses none: the best no-miss threshold rejects no more
            assert r["test_fpr_at_no_miss"] <= r["test_fpr"]
        for k in ("missed_shots", "bad_shots", "rejected_shots", "good_shots"):   # counted by shot, from the card
            assert r[f"test_{k}"] == test[k]
        assert r["test_bad_shots"] <= r["test_n_bad"] and r["test_missed_shots"] <= r["test_fn"]
        assert r["test_good_shots"] <= r["test_n_good"] and r["test_rejected_shots"] <= r["test_fp"]
    report = (tmp_path / "report.md").read_text()
    assert "FPR at no miss" in report
    assert f"{rows[0]['test_fp']}/{rows[0]['test_n_good']} ({rows[0]['test_rejected_shots']}/" in report
    weights = tmp_path / "models" / "n8" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    capsys.readouterr()
    rc = main(["experiment", "data-size", "--data", str(masked_data), "--out", str(tmp_path), "--sizes", "8",
               "--archs", "mobilenet_v3_small", "--epochs", "1", "--img-size", "32", "--reuse", "--json"])
    assert rc == 0 and weights.stat().st_mtime_ns == before                 # same settings: not trained again
    assert json.loads(capsys.readouterr().out)["rows"][0]["size"] == "8"
    card_path = tmp_path / "models" / "n8" / "card.json"
    card = json.loads(card_path.read_text())
    assert (card["tta"], card["tta_top"]) == (8, 0)
    card["tta"] = 1                                                          # a model from before the views
    card_path.write_text(json.dumps(card))
    res = X.run_data_size(masked_data, tmp_path, sizes="8", arch="mobilenet_v3_small", reuse=True, **FAST)
    assert weights.stat().st_mtime_ns == before and json.loads(card_path.read_text())["tta"] == 8  # recalibrated
    card = json.loads(card_path.read_text())
    card["tta_top"] = 2                                                      # a model counting 2 of its views
    card_path.write_text(json.dumps(card))
    X.run_data_size(masked_data, tmp_path, sizes="8", arch="mobilenet_v3_small", reuse=True, **FAST)
    assert weights.stat().st_mtime_ns == before and json.loads(card_path.read_text())["tta_top"] == 0
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
    for key in ("frame", "masks", "mask_weight", "extra_labels", "init", "rank_weight", "rank_k", "split_seed"):
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
    for key, other in (("mixed", "keep"), ("group_copies", False), ("mixed", None)):
        before = weights.stat().st_mtime_ns
        card = json.loads(card_path.read_text())
        if other is None:
            del card["train"]["config"][key]            # a model from before --mixed: its split dealt a shot apart
        else:
            card["train"]["config"][key] = other        # another split or other training labels: not the recipe
        card_path.write_text(json.dumps(card))
        X.run_data_size(masked_data, tmp_path, sizes="8", arch="mobilenet_v3_small", reuse=True, **FAST)
        config = json.loads(card_path.read_text())["train"]["config"]
        assert weights.stat().st_mtime_ns != before, key
        assert (config["mixed"], config["group_copies"]) == (_recipe().mixed, _recipe().group_copies)
    for split_seed, same in ((0, True), (5, False)):    # the seed's own split named is the same run; another is not
        before = weights.stat().st_mtime_ns
        card = json.loads(card_path.read_text())
        card["train"]["config"]["split_seed"] = split_seed
        card_path.write_text(json.dumps(card))
        X.run_data_size(masked_data, tmp_path, sizes="8", arch="mobilenet_v3_small", reuse=True, **FAST)
        assert (weights.stat().st_mtime_ns == before) == same, split_seed
    assert json.loads(card_path.read_text())["train"]["config"]["split_seed"] is None
    before = weights.stat().st_mtime_ns
    card = json.loads(card_path.read_text())
    pol = card["threshold_policy"]
    assert pol["no_miss_min_fpr"] == _recipe().no_miss_min_fpr and pol["no_miss_share"] == _recipe().no_miss_share
    del pol["no_miss_min_fpr"]                          # a threshold chosen before the floor of good parts ...
    pol["no_miss_share"], pol["threshold"] = 0.5, 0.9   # ... at half: chosen again, not trained again
    card_path.write_text(json.dumps(card))
    res = X.run_data_size(masked_data, tmp_path, sizes="8", arch="mobilenet_v3_small", reuse=True, **FAST)
    again = json.loads(card_path.read_text())
    assert weights.stat().st_mtime_ns == before and again["threshold_policy"]["no_miss_min_fpr"] == _recipe().no_miss_min_fpr
    assert again["threshold"] == pytest.approx(_no_miss_threshold(again))
    assert res["rows"][0]["test_threshold"] == again["threshold"]


def _recipe():
    """train's defaults"""
    from defectcls.config import TrainConfig

    return TrainConfig(data="", out="")


def _no_miss_threshold(card: dict) -> float:
    """The threshold today's no-miss policy gives on the card's own record of it."""
    pol = card["threshold_policy"]
    return pol["floor_by"]["prob_bad"] if "floor_by" in pol else share_threshold(card)


def test_sizes_and_caps():
    assert X.caps_for("1350") == (1000, 350) and X.caps_for("full") is None
    assert sum(X.caps_for("100")) == 100
    with pytest.raises(DefectclsError, match="--sizes"):
        X.parse_sizes("100,lots")


def test_resplit_policy_counts_the_splits_whose_validation_drew_none_of_the_low_bad_parts():
    """Two bad parts score among the good ones' range, the rest far above. A share of the lowest validation bad score
    misses both exactly when both fall in the test half (P = 50/100 x 49/99); a floor of good parts under them never."""
    good = np.linspace(0.0, 0.05, 100)
    bad = np.concatenate([np.linspace(0.9, 1.0, 98), [0.06, 0.06]])
    y = np.array([0] * 100 + [1] * 100)
    p = np.concatenate([good, bad])
    held = np.zeros(200, bool)
    part = np.array([0, 1] * 50 + [0] * 49 + [1] * 49 + [1, 1])       # the model's own split: both low ones in test
    share = X.resplit_policy(y, p, held, part, 0.25, 0.0, reps=2000, seed=1)
    assert share["own_missed"] == 2 and share["p_miss"] == pytest.approx(50 / 100 * 49 / 99, abs=0.03)
    assert share["mean_missed"] == pytest.approx(2 * share["p_miss"])    # both or none
    floor = X.resplit_policy(y, p, held, part, 0.25, 0.08, reps=2000, seed=1)
    assert floor["own_missed"] == 0 and floor["p_miss"] == 0.0
    assert floor["own_fpr"] >= 0.08 and floor["mean_fpr"] >= 0.08
    held[-2:] = True                                                    # held photos are caught whatever the policy
    assert X.resplit_policy(y, p, held, part, 0.25, 0.0, reps=50)["p_miss"] == 0.0
    # the two low ones as copies of one photo: re-splits keep them together, so a miss takes both or none, about
    # half the time (which half gets the group); as separate photos, 1/4 of the time both land in test
    held[-2:] = False
    groups = np.arange(200)
    groups[-1] = groups[-2]
    copies = X.resplit_policy(y, p, held, part, 0.25, 0.0, reps=2000, seed=1, groups=groups)
    assert copies["p_miss"] == pytest.approx(0.5, abs=0.05) and copies["mean_missed"] == pytest.approx(2 * copies["p_miss"])
    assert X.parse_policies("0.5:0, 0.25:0.08,0.35") == [(0.5, 0.0), (0.25, 0.08), (0.35, 0.0)]
    for bad_item in ("x:1", "0:0.1", "0.5:1", ""):
        with pytest.raises(DefectclsError, match="--policies"):
            X.parse_policies(bad_item)


def test_threshold_experiment_on_a_trained_model_matches_its_card_and_reuses_scores(tiny_model, tiny_model_tta,
                                                                                     tiny_data, tmp_path, capsys):
    from defectcls.cli import main

    out = tmp_path / "thr"
    assert main(["experiment", "threshold", "--data", str(tiny_data), "--out", str(out), "--models", str(tiny_model),
                 "--policies", "0.5:0,0.25:0.08", "--reps", "30", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {p.name for p in out.iterdir()} >= {"report.md", "results.json", "threshold.png", "scores"}
    own = [r for r in res["rows"] if (r["share"], r["least_fpr"]) == (0.25, 0.08)][0]
    card = json.loads((tiny_model / "card.json").read_text())      # trained with the defaults: 0.25 and 0.08
    assert (card["threshold_policy"]["no_miss_share"], card["threshold_policy"]["no_miss_min_fpr"]) == (0.25, 0.08)
    test = card["metrics"]["test"]
    assert own["own_missed"] == test["fn"] and own["own_fpr"] == pytest.approx(test["fp"] / (test["fp"] + test["tn"]))
    assert 0.0 <= own["p_miss"] <= 1.0 and len(res["rows"]) == 2 and res["reps"] == 30
    assert "0.25 / 0.08" in (out / "report.md").read_text()
    kept = out / "scores" / f"{tiny_model.name}.csv"
    scores = kept.read_text().splitlines()
    assert scores[0] == "path,label,p_bad,held,part,scored_by"
    assert len(scores) == 1 + test["n"] + card["metrics"]["val"]["n"]
    again = X.run_threshold(tiny_data, out, models=[tiny_model], policies="0.5:0,0.25:0.08", reps=30, reuse=True)
    assert again["rows"] == res["rows"]                                  # the kept scores, the same splits
    other = tmp_path / "other" / tiny_model.name                         # the same name, another temperature
    shutil.copytree(tiny_model, other)
    card["temperature"] *= 3
    (other / "card.json").write_text(json.dumps(card))
    redone = X.run_threshold(tiny_data, out, models=[other], policies="0.5:0", reps=0, reuse=True)
    assert redone["rows"][0]["p_miss"] is None                           # no re-splits asked: the own split only
    assert f"T {card['temperature']!r}" in kept.read_text()              # scored again, not read back
    for argv, why in ((["--policies", "2:0"], "--policies"), (["--epochs", "2"], "trains nothing")):
        assert main(["experiment", "threshold", "--data", str(tiny_data), "--out", str(out), "--models",
                     str(tiny_model), *argv]) == 2
        assert why in capsys.readouterr().err
    assert main(["experiment", "threshold", "--data", str(tiny_data), "--out", str(out)]) == 2
    assert "needs --models" in capsys.readouterr().err
    # --tta-top: each model scored with that many of its views counted, kept apart from the card's own scores
    from defectcls.inference import Predictor
    from defectcls.scoring import evaluate_model

    assert main(["experiment", "threshold", "--data", str(tiny_data), "--out", str(out), "--models",
                 str(tiny_model_tta), "--reps", "0", "--tta-top", "2", "--json"]) == 0
    capsys.readouterr()
    with open(out / "scores" / f"{tiny_model_tta.name}.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["scored_by"].endswith("views 8 top 2")
    val = [float(r["p_bad"]) for r in rows if r["part"] == "0"]
    top2, every = (evaluate_model(tiny_model_tta, tiny_data, split="val",
                                  predictor=Predictor(tiny_model_tta, backend="torch", tta_top=k))["prob_bad"]
                   for k in (2, 0))
    np.testing.assert_allclose(val, top2, atol=1e-4)
    assert np.abs(np.array(val) - np.array(every)).max() > 1e-4
