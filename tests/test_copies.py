"""Copies of one photo: found across turns, mirror images, zoom and light, and kept in one part of the split."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from defectcls import copies
from defectcls import data as D
from defectcls.synth import render_part
from defectcls.train import TrainConfig, stratified_folds, train


def _turn(a: np.ndarray, deg: float) -> np.ndarray:
    fill = tuple(int(v) for v in a[0, 0])
    return np.asarray(Image.fromarray(a).rotate(deg, resample=Image.BILINEAR, fillcolor=fill))


def _zoom(a: np.ndarray, f: float) -> np.ndarray:
    n = a.shape[0]
    m = round(n * f)
    big = np.asarray(Image.fromarray(a).resize((m, m), Image.BILINEAR))
    o = (m - n) // 2
    return big[o:o + n, o:o + n]


def test_copies_of_a_photo_share_a_group_and_other_parts_do_not(tmp_path):
    paths, truth = [], []
    for part in range(4):
        a = np.asarray(render_part(part, bad=bool(part % 2), size=512)[0])
        variants = {"orig": a, "turned_mirrored": _turn(a, 200)[:, ::-1].copy(), "zoomed": _zoom(a, 1.06),
                    "relit": np.clip(a * 1.1 + 5, 0, 255).astype(np.uint8)}
        for name, v in variants.items():
            p = tmp_path / f"p{part}_{name}.png"
            Image.fromarray(v).save(p)
            paths.append(str(p))
            truth.append(part)
    blank = tmp_path / "blank.png"   # no part stands out: nobody's copy
    Image.fromarray(np.full((512, 512, 3), 90, np.uint8)).save(blank)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    paths += [str(blank), str(broken)]
    groups = copies.copy_groups(paths, workers=1)
    assert len(groups) == len(paths)
    truth = np.array(truth)
    for part in range(4):
        assert len(set(groups[:16][truth == part])) == 1, f"part {part}'s copies split: {groups[:16]}"
    assert len(set(groups[:16])) == 4, f"different parts joined: {groups[:16]}"
    assert len(set(groups)) == 6   # the blank and the unreadable file stand alone


def test_match_is_about_one_for_a_turned_mirror_image_and_lower_for_another_part():
    a = np.asarray(render_part(0, bad=False, size=512)[0])
    b = np.asarray(render_part(1, bad=True, size=512)[0])
    fa = copies.fingerprint(a)
    assert copies.match(fa, copies.fingerprint(_turn(a, 90)[:, ::-1].copy())) > 0.995
    assert copies.match(fa, copies.fingerprint(b)) < copies.LINK - 0.05
    assert copies.fingerprint(np.zeros((64, 64), np.uint8)) is None


def test_grouped_split_keeps_each_group_in_one_part_and_stays_stratified_and_seeded():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 400 + [1] * 200)
    groups = np.concatenate([rng.integers(0, 60, 400), 100 + rng.integers(0, 40, 200)])
    a = D.stratified_split(labels, (0.7, 0.15, 0.15), seed=1, groups=groups)
    assert a == D.stratified_split(labels, (0.7, 0.15, 0.15), seed=1, groups=groups)
    assert a != D.stratified_split(labels, (0.7, 0.15, 0.15), seed=2, groups=groups)
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(600))
    part_of = {i: k for k, idx in a.items() for i in idx}
    for g in np.unique(groups):
        assert len({part_of[i] for i in np.flatnonzero(groups == g)}) == 1, f"group {g} split across parts"
    for name, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        for cls, n in ((0, 400), (1, 200)):
            got = int((labels[a[name]] == cls).sum())
            biggest = np.bincount(groups[labels == cls]).max()
            assert abs(got - share * n) <= biggest, (name, cls, got)
    with pytest.raises(D.DefectclsError, match="group numbers"):
        D.stratified_split(labels, seed=0, groups=groups[:10])


def test_a_shot_filed_under_both_labels_goes_whole_to_the_part_of_its_more_numerous_class():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 400 + [1] * 200)
    groups = np.concatenate([rng.integers(0, 60, 400), 100 + rng.integers(0, 40, 200)])
    groups[:30] = 900                       # one shot of 30 good copies ...
    groups[400:404] = 900                   # ... and 4 bad ones
    groups[30:32] = 901
    groups[404:406] = 901                   # a tie: 2 good, 2 bad
    apart = groups.copy()
    apart[400:404] = 950                    # the same photos, the bad copies a shot of their own
    apart[404:406] = 951
    a = D.stratified_split(labels, (0.7, 0.15, 0.15), seed=4, groups=groups)
    b = D.stratified_split(labels, (0.7, 0.15, 0.15), seed=4, groups=apart)
    part_a = {i: k for k, idx in a.items() for i in idx}
    part_b = {i: k for k, idx in b.items() for i in idx}
    assert sorted(part_a) == list(range(600))
    for g in np.unique(groups):
        assert len({part_a[i] for i in np.flatnonzero(groups == g)}) == 1, f"group {g} split across parts"
    assert {part_a[i] for i in [*range(30), *range(400, 404)]} == {part_b[0]}   # the good copies' part
    assert part_a[30] == part_a[404] == part_b[404]                 # a tie follows the bad copies
    others = [i for i in range(600) if groups[i] not in (900, 901)]
    assert all(part_a[i] == part_b[i] for i in others)              # every other shot is dealt as before


def test_training_labels_keep_relabel_or_drop_the_shots_filed_under_both_labels():
    from defectcls.train import training_labels

    labels = np.array([0, 0, 1, 0, 1, 1])
    groups = np.array([7, 7, 7, 8, 9, 9])   # shot 7 is filed good twice and bad once
    idx, y = training_labels(labels, groups, [0, 2, 3, 4], "keep")
    assert idx == [0, 2, 3, 4] and y.tolist() == [0, 1, 0, 1]
    idx, y = training_labels(labels, groups, [0, 2, 3, 4], "bad")
    assert idx == [0, 2, 3, 4] and y.tolist() == [1, 1, 0, 1]
    assert labels.tolist() == [0, 0, 1, 0, 1, 1]                    # the folder's labels stay as filed
    idx, y = training_labels(labels, groups, [0, 2, 3, 4], "drop")
    assert idx == [3, 4] and y.tolist() == [0, 1]
    idx, y = training_labels(labels, None, [0, 1], "bad")           # no copies looked for: nothing to relabel
    assert idx == [0, 1] and y.tolist() == [0, 0]


def test_grouped_folds_keep_each_group_in_one_fold():
    labels = np.array([0] * 60 + [1] * 30)
    groups = np.concatenate([np.arange(60) // 3, 100 + np.arange(30) // 3])
    folds = stratified_folds(labels, 3, seed=0, groups=groups)
    fold_of = {int(i): k for k, f in enumerate(folds) for i in f}
    assert sorted(fold_of) == list(range(90))
    for g in np.unique(groups):
        assert len({fold_of[i] for i in np.flatnonzero(groups == g)}) == 1


def test_training_with_group_copies_keeps_copies_out_of_validation_and_test(tmp_path, tiny_data, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    copied = []
    for cls in ("good", "bad"):   # a mirror image of each of the first six photos of each class, beside it
        for p in sorted((data / cls).glob("*.png"))[:6]:
            twin = p.with_name(p.stem + "_mirror.png")
            Image.fromarray(np.asarray(Image.open(p))[:, ::-1].copy()).save(twin)
            copied.append((f"{cls}/{p.name}", f"{cls}/{twin.name}"))
    out = tmp_path / "m"
    train(TrainConfig(data=str(data), out=str(out), arch="mobilenet_v3_small", epochs=1, img_size=32, batch_size=16,
                      progress=False, workers=1, disk_cache=False, epoch_size=0, tta=1, group_copies=True))
    split = json.loads((out / "split.json").read_text())
    part_of = {rel: k for k in ("train", "val", "test") for rel, _ in split[k]}
    group_of = dict(split["copy_groups"])
    for a, b in copied:
        assert group_of[a] == group_of[b], (a, b)
        assert part_of[a] == part_of[b], (a, part_of[a], b, part_of[b])
    card = json.loads((out / "card.json").read_text())
    assert card["train"]["config"]["group_copies"] is True
    policy = card["threshold_policy"]   # validation's bad shots, each once
    n_shots = len({group_of[rel] for rel, lab in split["val"] if lab == 1})
    assert policy["n_bad_groups_val"] == n_shots < policy["n_bad_val"] + policy["held_bad_val"]
    from defectcls.scoring import recalibrate

    again = recalibrate(out, target_fnr=0.0, write=False)   # the threshold chosen anew counts the same shots
    assert again["threshold_policy"]["n_bad_groups_val"] == n_shots
    from defectcls.scoring import evaluate_model

    test_shots = {group_of[rel] for rel, lab in split["test"] if lab == 1}
    test_good_shots = {group_of[rel] for rel, lab in split["test"] if lab == 0}
    for part, m in card["metrics"].items():   # the card counts its parts by shot too, labels as filed
        shots = {lab: {group_of[rel] for rel, y in split[part] if y == lab} for lab in (0, 1)}
        assert (m["good_shots"], m["bad_shots"]) == (len(shots[0]), len(shots[1]))
        assert 0 <= m["rejected_shots"] <= min(m["good_shots"], m["fp"])
        assert 0 <= m["missed_shots"] <= min(m["bad_shots"], m["fn"])
    for thr in (0.0, 1.01):   # none missed; every bad shot with a photo not held (held photos are judged bad) missed
        res = evaluate_model(out, data, threshold=thr)
        m = res["metrics"]
        assert res["split"] == "test" and m["bad_shots"] == len(test_shots) < m["n_bad"]
        judged = {group_of[os.path.relpath(x, data)] for x, lab, h in zip(res["paths"], res["y_true"], res["held"],
                                                                        strict=True) if lab == 1 and not h}
        assert m["missed_shots"] == (0 if thr == 0.0 else len(judged)) and (thr == 0.0 or judged)
        # good shots: at 0 every one is rejected, at 1.01 only those with a held photo (held photos are rejected)
        rejected = {group_of[os.path.relpath(x, data)] for x, lab, h in zip(res["paths"], res["y_true"],
                                                                          res["held"], strict=True)
                    if lab == 0 and (h or thr == 0.0)}
        assert m["good_shots"] == len(test_good_shots) <= m["n_good"]
        assert m["rejected_shots"] == len(rejected) and (thr > 0.0 or rejected == test_good_shots)
        assert 0.0 < m["rejected_shots_upper95"] <= 1.0
        assert (m["rejected_shots_upper95"] == 1.0) == (m["rejected_shots"] == m["good_shots"])
    assert "bad_shots" not in evaluate_model(out, data, split="all")["metrics"]
    from defectcls.cli import main

    assert main(["evaluate", "--model", str(out), "--data", str(data), "--threshold", "0"]) == 0
    text = capsys.readouterr().out
    n = len(test_good_shots)
    assert f"0 of {len(test_shots)} missed; good shots: {n} of {n} with a copy rejected (95% bound" in text
    from defectcls.perturb import evaluate_perturbed, format_table

    res = evaluate_perturbed(out, data, names="blur1.5", threshold=0.0)   # the --perturb table counts shots too
    assert [r["name"] for r in res["rows"]] == ["clean", "blur1.5"]
    for r in res["rows"]:
        assert (r["rejected_shots"], r["good_shots"], r["missed_shots"], r["bad_shots"]) == (n, n, 0, len(test_shots))
    assert f"({n}/{n} shots)" in format_table(res)
    assert "good_shots" not in evaluate_perturbed(out, data, split="all", names="blur1.5")["rows"][0]


def test_copies_command_counts_held_out_photos_seen_in_training(tmp_path, capsys):
    from defectcls.cli import main

    data = tmp_path / "data"
    for cls, bad in (("good", False), ("bad", True)):
        (data / cls).mkdir(parents=True)
        for k in range(3):
            a = np.asarray(render_part(10 + k + 5 * bad, bad=bad, size=512)[0])
            Image.fromarray(a).save(data / cls / f"{k}.png")
            Image.fromarray(_turn(a, 90 * (k + 1))[:, ::-1].copy()).save(data / cls / f"{k}_copy.png")
    model = tmp_path / "model"
    model.mkdir()
    # good/0's copy and bad/1's copy were held out, their originals trained on; good/2_copy's original was not
    split = {"train": [["good/0.png", 0], ["good/1.png", 0], ["good/1_copy.png", 0], ["bad/0.png", 1], ["bad/1.png", 1]],
             "val": [["good/0_copy.png", 0], ["bad/0_copy.png", 1], ["bad/2.png", 1]],
             "test": [["good/2_copy.png", 0], ["bad/1_copy.png", 1], ["bad/2_copy.png", 1]]}
    (model / "split.json").write_text(json.dumps(split))
    out_csv = tmp_path / "groups.csv"
    assert main(["copies", "--data", str(data), "--model", str(model), "--csv", str(out_csv), "--json",
                 "--workers", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 12 and res["groups"] == 6 and res["with_copy"] == 12
    assert res["groups_by_class"] == {"good": 3, "bad": 3}
    assert res["seen_in_training"] == {"val": {"good": [1, 1], "bad": [1, 2]}, "test": {"good": [0, 1], "bad": [1, 2]}}
    rows = out_csv.read_text().splitlines()
    assert rows[0] == "path,label,group" and len(rows) == 13
    assert res["mixed"] == []
    # a new folder to score: a turned copy of good/1 (trained on), of good/2 and bad/2 (held out), and a new part
    new = tmp_path / "new"
    for cls in ("good", "bad"):
        (new / cls).mkdir(parents=True)
    for cls, k in (("good", 1), ("good", 2), ("bad", 2)):
        a = np.asarray(Image.open(data / cls / f"{k}.png"))
        Image.fromarray(_turn(a, 37)).save(new / cls / f"again_{k}.png")
    Image.fromarray(np.asarray(render_part(40, bad=True, size=512)[0])).save(new / "bad" / "fresh.png")
    assert main(["copies", "--data", str(data), "--model", str(model), "--against", str(new), "--json",
                 "--workers", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["against_seen"] == {"good": [1, 2], "bad": [0, 2]}   # only good/1's shot trained the model
    assert res["n"] == 12 and res["groups"] == 6                      # the counts of DATA stay DATA's
    assert main(["copies", "--data", str(data), "--against", str(new), "--workers", "1"]) == 0
    said = capsys.readouterr().out
    assert f"{new}: a copy in {data}: good 2 of 2; bad 1 of 2" in said  # without --model: any photo of DATA
    assert main(["copies", "--data", str(data), "--model", str(tmp_path)]) == 2
    assert "no split.json" in capsys.readouterr().err
    # one shot labelled both ways: good/0 mirrored, filed under bad/
    Image.fromarray(np.asarray(Image.open(data / "good" / "0.png"))[:, ::-1].copy()).save(data / "bad" / "odd.png")
    assert main(["copies", "--data", str(data), "--workers", "1"]) == 0
    said = capsys.readouterr().out
    assert "labelled both ways (check its labels): 2 good, e.g. " in said and "1 bad, e.g. " in said
    assert "odd.png" in said


def test_grouping_is_the_default_and_a_folder_without_copies_splits_as_before():
    from defectcls.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["train", "--data", "d", "--out", "o"]).group_copies is True
    assert parse(["train", "--data", "d", "--out", "o", "--no-group-copies"]).group_copies is False
    assert parse(["train", "--data", "d", "--out", "o"]).mixed == "bad"
    assert parse(["train", "--data", "d", "--out", "o", "--mixed", "keep"]).mixed == "keep"
    with pytest.raises(SystemExit):
        parse(["train", "--data", "d", "--out", "o", "--mixed", "good"])
    labels = [0] * 50 + [1] * 20
    assert D.stratified_split(labels, seed=3, groups=list(range(70))) == D.stratified_split(labels, seed=3)
