import json
import shutil

import numpy as np
import pytest

from defectcls.errors import DefectclsError
from defectcls.train import TrainConfig, stratified_folds, train


@pytest.fixture(scope="module")
def folds_model(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("folds") / "ens"
    summary = train(TrainConfig(data=str(tiny_data), out=str(out), arch="mobilenet_v3_small", epochs=1, img_size=32,
                                batch_size=16, folds=2, progress=False, workers=1, disk_cache=False, epoch_size=0))
    return out, summary


def test_folds_write_member_dirs_and_an_ensemble_dir(folds_model):
    out, summary = folds_model
    for k in (0, 1):
        d = out / f"fold_{k}"
        assert (d / "model.safetensors").is_file() and (d / "split.json").is_file()
        card = json.loads((d / "card.json").read_text())
        assert card["arch"] == "mobilenet_v3_small" and card["train"]["fold"] == k
        assert set(card["metrics"]) == {"val", "test"}
    card = json.loads((out / "card.json").read_text())
    assert card["arch"] == "ensemble" and card["members"] == ["fold_0", "fold_1"]
    assert card["train"]["member_archs"] == ["mobilenet_v3_small"] * 2 and card["train"]["folds"] == 2
    assert set(card["metrics"]) == {"oof", "test"}
    assert "out-of-fold" in card["threshold_policy"]["chosen_on"]
    assert card["threshold_policy"]["tradeoff"][0]["threshold"] == card["threshold"]   # target 0, the default
    assert card["threshold"] == summary["threshold"] and card["temperature"] > 0


def test_folds_partition_train_and_val_and_keep_the_test_part_out(folds_model):
    out, _ = folds_model
    ens = json.loads((out / "split.json").read_text())
    pool = {p for p, _ in ens["train"]}
    test = {p for p, _ in ens["test"]}
    assert pool and test and not pool & test
    vals = []
    for k in (0, 1):
        s = json.loads((out / f"fold_{k}" / "split.json").read_text())
        tr, va = {p for p, _ in s["train"]}, {p for p, _ in s["val"]}
        assert tr | va == pool and not tr & va and {p for p, _ in s["test"]} == test
        assert {p for p, _, f in ens["folds"] if f == k} == va
        vals.append(va)
    assert not vals[0] & vals[1]
    card = json.loads((out / "card.json").read_text())
    assert card["metrics"]["oof"]["n"] == len(pool)      # every pool image scored out of fold exactly once
    labels = [lab for _, lab in ens["train"]]
    for va in vals:                                        # stratified
        share = np.mean([lab for p, lab in ens["train"] if p in va])
        assert share == pytest.approx(np.mean(labels), abs=0.1)


def test_predictor_loads_the_ensemble_and_its_logits_are_the_members_mean(folds_model, tiny_data):
    import torch

    from defectcls.inference import Predictor
    from defectcls.models import dihedral_views, merge_view_logits

    out, _ = folds_model
    ens = Predictor(out, backend="torch")
    members = [Predictor(out / f"fold_{k}", backend="torch") for k in (0, 1)]
    paths = sorted((tiny_data / "bad").glob("*.png"))[:3] + sorted((tiny_data / "good").glob("*.png"))[:3]
    x = np.stack([ens.preprocess(p) for p in paths])
    for m in members:
        assert np.array_equal(m.preprocess(paths[0]), x[0])   # the members share the ensemble's input
    mean = np.mean([m.logits(x) for m in members], axis=0)
    assert np.allclose(ens.logits(x), mean, atol=1e-5)
    assert ens.predict(paths[0]).model_id.startswith("ens@")
    # counting its two most suspicious views, the ensemble picks them on the members' mean, view by view
    top = Predictor(out, backend="torch", tta_top=2)
    assert (top.card.tta, top.card.tta_top) == (8, 2)
    views = dihedral_views(torch.from_numpy(x), 8).numpy()
    per_view = np.mean([Predictor(out / f"fold_{k}", backend="torch", tta=1).logits(views) for k in (0, 1)], axis=0)
    assert np.allclose(top.logits(x), merge_view_logits(torch.from_numpy(per_view), 8, 2).numpy(), atol=1e-5)


def test_ensemble_works_for_evaluate_explain_and_predict_cli(folds_model, tiny_data, capsys):
    from defectcls.cli import main
    from defectcls.explain import explain
    from defectcls.inference import Predictor
    from defectcls.scoring import evaluate_model

    out, summary = folds_model
    res = evaluate_model(out, tiny_data)
    assert res["split"] == "test" and res["metrics"]["fn"] == summary["metrics"]["test"]["fn"]
    pred = Predictor(out, backend="torch")
    img = sorted((tiny_data / "bad").glob("*.png"))[0]
    ex = explain(pred, img, "gradcam")
    assert ex.cam.shape == (32, 32) and 0 <= ex.cam.min() and ex.cam.max() <= 1
    assert ex.prediction.prob_bad == pytest.approx(pred.predict(img).prob_bad, abs=1e-5)
    assert main(["predict", str(img), "--model", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model_id"].startswith("ens@")


def test_ensemble_dir_loads_without_its_member_dirs(folds_model, tmp_path):
    from defectcls.models import load_model_dir

    out, _ = folds_model
    alone = tmp_path / "alone"
    alone.mkdir()
    for f in ("card.json", "model.safetensors"):
        shutil.copy(out / f, alone / f)
    model, card = load_model_dir(alone)
    assert card.arch == "ensemble" and len(model.members) == 2


def test_too_many_folds_for_the_data_is_a_clear_error(tiny_data, tmp_path):
    with pytest.raises(DefectclsError, match="--folds"):
        stratified_folds(np.array([0] * 10 + [1] * 3), 4, 0)
    with pytest.raises(DefectclsError, match="--folds"):
        train(TrainConfig(data=str(tiny_data), out=str(tmp_path / "m"), arch="mobilenet_v3_small", epochs=1, img_size=32,
                          folds=40, progress=False, workers=1, disk_cache=False))
