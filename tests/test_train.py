import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from defectcls.config import AugConfig
from defectcls.train import TrainConfig, train
from tests.helpers import share_threshold


def _tiny_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), arch="mobilenet_v3_small", epochs=1, img_size=32, batch_size=16,
                progress=False, workers=1, disk_cache=False, epoch_size=0)
    base.update(kw)
    return TrainConfig(**base)


def test_tiny_model_card_is_complete(tiny_model):
    card = json.loads((tiny_model / "card.json").read_text())
    assert card["arch"] == "mobilenet_v3_large" and card["in_chans"] == 1 and card["img_size"] == 64
    assert 0 < card["threshold"] <= 1 and card["temperature"] > 0
    assert card["threshold_policy"]["method"] == "conformal"
    assert set(card["metrics"]) == {"val", "test"}
    t = card["train"]
    assert t["data_fingerprint"] and t["seed"] == 0 and t["duration_s"] > 0 and t["history"]
    assert t["config"]["target_fnr"] == 0.0  # default: no missed defect
    assert card["threshold_policy"]["guaranteed_fnr"] == pytest.approx(1 / (card["threshold_policy"]["n_bad_val"] + 1))
    assert [r["target_fnr"] for r in card["threshold_policy"]["tradeoff"]] == [0.0, 0.005, 0.01, 0.02, 0.05]
    assert card["threshold_policy"]["tradeoff"][0]["threshold"] == card["threshold"]
    share = card["threshold_policy"]["no_miss_share"]          # target 0: a share of the lowest validation bad score
    assert share == t["config"]["no_miss_share"] == TrainConfig.no_miss_share
    pol = card["threshold_policy"]                              # ... or lower, to reject the least FPR of good parts
    assert pol["no_miss_min_fpr"] == t["config"]["no_miss_min_fpr"] == TrainConfig.no_miss_min_fpr
    by_share = share_threshold(card)
    if "floor_by" in pol:
        assert card["threshold"] == pytest.approx(pol["floor_by"]["prob_bad"]) and card["threshold"] < by_share
    else:
        assert card["threshold"] == pytest.approx(by_share)
    assert pol["val_fpr"] >= pol["no_miss_min_fpr"]
    assert all(h["aug_strength"] == 1.0 for h in t["history"])  # the light preset has no ramp
    split = json.loads((tiny_model / "split.json").read_text())
    parts = [set(map(tuple, split[k])) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])


def _clear_defect_set(root: Path, seed: int, n: int, size: int = 96) -> Path:
    """n good parts and the n bad parts (of 3n generated) with the largest defect masks."""
    import numpy as np
    from PIL import Image

    from defectcls.synth import generate

    raw = root.with_name(root.name + "_raw")
    generate(raw, n_good=n, n_bad=3 * n, seed=seed, size=size, masks=True)
    areas = sorted(((np.asarray(Image.open(m)) > 0).mean(), m.name) for m in (raw / "masks").glob("*.png"))
    (root / "bad").mkdir(parents=True)
    shutil.copytree(raw / "good", root / "good")
    for _, name in areas[-n:]:
        shutil.copy(raw / "bad" / name, root / "bad" / name)
    return root


@pytest.mark.slow
def test_short_training_beats_chance(tmp_path):
    """A real run on small synthetic images learns the task, scored on parts it never saw.

    Small images keep it short; the clearest half of the defects keeps it learnable in 10 epochs.
    """
    from defectcls.scoring import evaluate_model

    data = _clear_defect_set(tmp_path / "train", seed=21, n=120)
    new = _clear_defect_set(tmp_path / "new", seed=4242, n=50)
    out = tmp_path / "m"
    train(_tiny_cfg(data, out, arch="resnet18", img_size=96, epochs=10, batch_size=32, patience=10,
                    split=(0.8, 0.2, 0.0), aug=AugConfig.light()))
    m = evaluate_model(out, new)["metrics"]
    assert m["auroc"] >= 0.8, m


def test_unreadable_files_are_skipped_by_name(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "bad" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (data / "good" / "empty.png").write_bytes(b"")
    out = tmp_path / "m"
    train(_tiny_cfg(data, out))
    card = json.loads((out / "card.json").read_text())
    assert sorted(Path(p).name for p in card["train"]["skipped"]) == ["corrupt.png", "empty.png"]


def test_extra_labels_override_and_add(tmp_path, tiny_data):
    relabel = sorted((tiny_data / "good").glob("*.png"))[0]
    extra = tmp_path / "extra.png"
    shutil.copy(sorted((tiny_data / "bad").glob("*.png"))[0], extra)
    csv = tmp_path / "labels.csv"
    csv.write_text(f"path,label\n{relabel},bad\n{extra.name},bad\n")
    out = tmp_path / "m"
    train(_tiny_cfg(tiny_data, out, extra_labels=str(csv)))
    split = json.loads((out / "split.json").read_text())
    labels = {os.path.basename(p): lab for part in ("train", "val", "test") for p, lab in split[part]}
    assert labels[relabel.name] == 1 and labels["extra.png"] == 1
    assert len(labels) == 36 + 18 + 1


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, masked_data):
    """The same loop under torchrun: 2 processes, gloo, one model directory written by rank 0 (the mask
    head's gradients shared like the network's)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEFECTCLS_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "defectcls", "train", "--data", str(masked_data), "--out", str(out),
                        "--masks", str(masked_data / "masks"),
                        "--arch", "mobilenet_v3_small", "--epochs", "2", "--img-size", "32", "--batch-size", "8",
                        "--epoch-size", "128", "--hard-share", "0.3",
                        "--device", "cpu", "--json"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((out / "card.json").read_text())
    assert card["train"]["world_size"] == 2 and len(card["train"]["history"]) == 2
    assert card["train"]["config"]["masks"] == str(masked_data / "masks")
    # 128 samples an epoch over 2 ranks of 8: the small training part repeated, 8 steps on each rank
    assert card["train"]["epoch_samples"] == 128 and [h["steps"] for h in card["train"]["history"]] == [8, 8]
    summary = json.loads(r.stdout)   # --json: stdout is the one result object, progress went to stderr
    assert summary["out"] == str(out)
    assert "epoch 2/2" in r.stderr


def test_init_warm_starts_from_a_model_dir(tmp_path, tiny_data, tiny_model):
    import torch

    from defectcls.errors import DefectclsError
    from defectcls.models import load_model_dir
    from defectcls.train import init_weights

    model, _ = load_model_dir(tiny_model)
    fresh = __import__("defectcls.models", fromlist=["build_model"]).build_model("mobilenet_v3_large")
    init_weights(fresh, str(tiny_model), "mobilenet_v3_large", 1)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)
    with pytest.raises(DefectclsError, match="is a mobilenet_v3_large"):
        train(_tiny_cfg(tiny_data, tmp_path / "m", arch="resnet18", init=str(tiny_model)))


def test_views_are_the_default_and_calibration_scores_as_the_saved_model_answers(tmp_path, tiny_data):
    """Threshold, temperature and metrics are chosen on the same test-time views the model directory
    answers with, as many of them counted: its test metrics are what evaluating the directory gives."""
    from defectcls.scoring import evaluate_model

    assert (TrainConfig(data="d", out="o").tta, TrainConfig(data="d", out="o").tta_top) == (8, 0)
    out = tmp_path / "m"
    train(_tiny_cfg(tiny_data, out, tta=4, tta_top=2))
    card = json.loads((out / "card.json").read_text())
    assert card["tta"] == 4 and card["train"]["config"]["tta"] == 4 and card["tta_top"] == 2
    fresh = evaluate_model(out, tiny_data, split="test")["metrics"]
    assert {k: card["metrics"]["test"][k] for k in ("tp", "fp", "tn", "fn")} == {k: fresh[k] for k in ("tp", "fp", "tn", "fn")}
    assert card["metrics"]["test"]["auroc"] == pytest.approx(fresh["auroc"], abs=1e-6)
    from defectcls.errors import DefectclsError

    with pytest.raises(DefectclsError, match="--tta must be one of"):
        train(_tiny_cfg(tiny_data, tmp_path / "x", tta=2))
    with pytest.raises(DefectclsError, match="--tta-top must be a whole number >= 0"):
        train(_tiny_cfg(tiny_data, tmp_path / "x", tta_top=-1))
    assert not (tmp_path / "x").exists()


def test_ema_weights_are_what_is_validated_and_saved(tmp_path, tiny_data):
    """With --ema the saved weights are the moving average, not the last step's (same seed, same data)."""
    from defectcls.errors import DefectclsError
    from defectcls.models import load_model_dir

    plain, avg = tmp_path / "plain", tmp_path / "ema"
    train(_tiny_cfg(tiny_data, plain, epochs=2, tta=1))
    train(_tiny_cfg(tiny_data, avg, epochs=2, tta=1, ema=0.5))
    assert json.loads((avg / "card.json").read_text())["train"]["config"]["ema"] == 0.5
    a, _ = load_model_dir(plain)
    b, _ = load_model_dir(avg)
    diff = max(float((p - q).abs().max().detach()) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert diff > 1e-6
    with pytest.raises(DefectclsError, match="--ema"):
        train(_tiny_cfg(tiny_data, tmp_path / "x", ema=1.0))


@pytest.mark.parametrize("balance", ["loss", "sampler", "background"])
def test_small_training_set_is_repeated_up_to_the_epoch_size(tiny_data, tmp_path, balance):
    """A few photos get the steps of a full-size set: an epoch draws EPOCH_SIZE samples, not one pass."""
    from defectcls.train import epoch_samples

    assert epoch_samples(37, 4096) == 4096 and epoch_samples(5000, 4096) == 5000 and epoch_samples(37, 0) == 37
    one_pass = train(_tiny_cfg(tiny_data, tmp_path / "one", balance=balance))
    card = json.loads((Path(one_pass["out"]) / "card.json").read_text())
    n_train = card["train"]["n"]["train"]
    assert card["train"]["epoch_samples"] == n_train and card["train"]["history"][0]["steps"] == -(-n_train // 16)
    train(_tiny_cfg(tiny_data, tmp_path / "rep", balance=balance, epochs=2, epoch_size=3 * n_train + 5))
    card = json.loads((tmp_path / "rep" / "card.json").read_text())
    assert card["train"]["epoch_samples"] == 3 * n_train + 5
    assert [h["steps"] for h in card["train"]["history"]] == [-(-(3 * n_train + 5) // 16)] * 2


def test_max_minutes_starts_no_epoch_that_would_overrun_and_keeps_the_best(tiny_data, tmp_path):
    from defectcls.errors import DefectclsError

    full = train(_tiny_cfg(tiny_data, tmp_path / "full", epochs=2, tta=1, patience=5))
    t = json.loads((Path(full["out"]) / "card.json").read_text())["train"]
    assert t["epochs_run"] == 2 and t["stopped"] == "completed"
    # any first epoch takes longer than a budget of 6e-5 s: the loop ends after it, the model is still saved
    short = train(_tiny_cfg(tiny_data, tmp_path / "short", epochs=5, tta=1, max_minutes=1e-6))
    t = json.loads((Path(short["out"]) / "card.json").read_text())["train"]
    assert t["epochs_run"] == 1 and t["best_epoch"] == 1 and t["stopped"] == "time budget"
    assert t["history"][-1]["stop"] == "time budget" and t["config"]["max_minutes"] == 1e-6
    assert (tmp_path / "short" / "model.safetensors").is_file()
    with pytest.raises(DefectclsError, match="--max-minutes"):
        train(_tiny_cfg(tiny_data, tmp_path / "x", max_minutes=0))


def _sigterm_at_validation(monkeypatch, n: int) -> None:
    """SIGTERM this process as the Nth validation pass starts (as `timeout` or a scheduler would)."""
    import signal

    import defectcls.train as T

    calls, real = [0], T.predict_logits

    def predict_logits(*args, **kw):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)

    monkeypatch.setattr(T, "predict_logits", predict_logits)


def test_sigterm_ends_the_loop_and_saves_the_best_epoch_so_far(tiny_data, tmp_path, monkeypatch, capsys):
    import signal

    from defectcls.cli import main

    before = signal.getsignal(signal.SIGTERM)
    _sigterm_at_validation(monkeypatch, 2)   # in epoch 2 of 4
    out = tmp_path / "m"
    rc = main(["train", "--data", str(tiny_data), "--out", str(out), "--arch", "mobilenet_v3_small", "--epochs", "4",
               "--img-size", "32", "--batch-size", "16", "--epoch-size", "0", "--tta", "1", "--workers", "1",
               "--no-cache", "--no-focus-restore", "--json"])
    assert rc == 130   # saved, and the command (or an experiment around the training) stops there
    err = capsys.readouterr().err
    assert f"interrupted: the best epoch so far (1) is saved in {out}" in err
    thr = json.loads((out / "card.json").read_text())["threshold"]
    assert f"on validation, by FNR target: 0 -> threshold {thr:.3g}, FNR " in err     # the trade-off, as saved
    t = json.loads((out / "card.json").read_text())["train"]
    assert t["stopped"] == "interrupted" and t["epochs_run"] == 1 and t["best_epoch"] == 1
    card = json.loads((out / "card.json").read_text())
    assert card["photo_range"]["sharpness"] and card["focus_below"] is None    # --no-focus-restore: measured, not used
    assert (out / "model.safetensors").is_file() and (out / "split.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is before   # the handler is the training loop's alone


def test_sigterm_in_a_fold_saves_that_fold_and_no_ensemble(tiny_data, tmp_path, monkeypatch):
    _sigterm_at_validation(monkeypatch, 2)   # fold 1's second epoch
    with pytest.raises(KeyboardInterrupt, match=r"in fold 1 of 2: the best epochs so far .* \(fold_0\); no ensemble"):
        train(_tiny_cfg(tiny_data, tmp_path / "m", epochs=3, tta=1, folds=2))
    assert json.loads((tmp_path / "m" / "fold_0" / "card.json").read_text())["train"]["stopped"] == "interrupted"
    assert not (tmp_path / "m" / "card.json").exists() and not (tmp_path / "m" / "fold_1").exists()


def test_sigterm_before_any_validated_epoch_saves_nothing_and_says_so(tiny_data, tmp_path, monkeypatch):
    _sigterm_at_validation(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt, match="before the first epoch was validated: nothing saved"):
        train(_tiny_cfg(tiny_data, tmp_path / "m", epochs=3, tta=1))
    assert not (tmp_path / "m" / "card.json").exists()


def test_negative_epoch_size_is_a_clear_error(tiny_data, tmp_path):
    from defectcls.errors import DefectclsError

    with pytest.raises(DefectclsError, match="--epoch-size"):
        train(_tiny_cfg(tiny_data, tmp_path / "m", epoch_size=-1))


def test_epoch_order_without_hard_share_is_one_reshuffled_pass_or_a_balanced_draw():
    import numpy as np
    import torch

    from defectcls.train import epoch_order

    y = np.array([0] * 30 + [1] * 10)
    order = epoch_order(y, 40, "loss", torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(40))
    order = epoch_order(y, 95, "loss", torch.Generator().manual_seed(0))   # repeated up to the epoch size
    assert len(order) == 95 and np.bincount(order.numpy(), minlength=40).min() == 2
    order = epoch_order(y, 4000, "sampler", torch.Generator().manual_seed(0))
    assert abs(float((y[order.numpy()] == 1).mean()) - 0.5) < 0.05
    # no losses yet (first epoch): the hard share draws nothing extra
    same = epoch_order(y, 40, "loss", torch.Generator().manual_seed(3), hard_share=0.5, sample_loss=None)
    assert torch.equal(same, epoch_order(y, 40, "loss", torch.Generator().manual_seed(3)))


def test_hard_share_revisits_the_photos_the_network_still_gets_wrong():
    import numpy as np
    import torch

    from defectcls.train import epoch_order

    y = np.array([0] * 500 + [1] * 500)
    loss = np.full(1000, 0.01)
    loss[[600, 601]] = 3.0       # two bad photos still missed (capped at 1 in the draw)
    loss[10] = np.nan            # not seen yet: counts as an average photo
    order = epoch_order(y, 1000, "loss", torch.Generator().manual_seed(0), hard_share=0.25, sample_loss=loss)
    counts = np.bincount(order.numpy(), minlength=1000)
    assert len(order) == 1000
    # 250 hard draws, two of weight 1 against 998 of 0.01: about 21 each, against about 1 for the rest
    assert counts[600] > 10 and counts[601] > 10
    assert np.median(counts[np.r_[0:600, 602:1000]]) == 1
    assert (counts[:500] > 0).mean() > 0.7   # the uniform part still covers the set


def test_background_balance_draws_both_classes_alike_in_each_band_of_background_level():
    import numpy as np
    import torch

    from defectcls.train import background_balance_weights, border_level, epoch_order

    # photos whose border is dark are mostly bad, bright ones mostly good: the light predicts the class
    rng = np.random.default_rng(0)
    y = np.array([1] * 380 + [0] * 20 + [1] * 20 + [0] * 380)
    level = np.r_[rng.uniform(100, 150, 400), rng.uniform(190, 240, 400)]
    x = np.repeat(level.astype(np.uint8), 16 * 16).reshape(800, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 0                       # the part: not in the border band
    assert np.allclose(border_level(x), level.astype(np.uint8))
    w = background_balance_weights(y, border_level(x), bins=2, cap=100.0)
    assert np.isclose(w.sum(), 1.0)
    dark = level < 170
    for band in (dark, ~dark):
        assert np.isclose(w[band & (y == 1)].sum(), w[band & (y == 0)].sum())
    order = epoch_order(y, 8000, "background", torch.Generator().manual_seed(0), weights=w).numpy()
    for band in (dark, ~dark):
        drawn = y[order][band[order]]
        assert abs(drawn.mean() - 0.5) < 0.05
    # the cap bounds how often one photo of a rare kind is drawn: 4x a photo of a one-class band, not 400/40 = 10x
    capped = background_balance_weights(y, level, bins=2, cap=4.0)
    assert np.isclose(capped[~dark & (y == 1)].max() / capped[~dark & (y == 0)].min(), 4.0 / (400 / 760))


def test_shot_balance_weighs_every_shot_of_a_class_alike_whatever_its_number_of_copies():
    import numpy as np
    import torch

    from defectcls.train import epoch_order, shot_balance_weights

    # good: one shot of 90 copies and ten single shots; bad: five shots of 2 copies
    y = np.array([0] * 100 + [1] * 10)
    groups = np.r_[np.zeros(90, int), np.arange(1, 11), 20 + np.arange(10) // 2]
    w = shot_balance_weights(y, groups)
    assert np.isclose(w.sum(), 1.0)
    assert np.isclose(w[y == 0].sum(), 0.5) and np.isclose(w[y == 1].sum(), 0.5)
    per_shot = {g: w[groups == g].sum() for g in np.unique(groups)}
    assert np.allclose([per_shot[g] for g in range(11)], 0.5 / 11)       # the 90 copies weigh as one single shot
    assert np.allclose([per_shot[g] for g in range(20, 25)], 0.5 / 5)
    order = epoch_order(y, 22000, "shots", torch.Generator().manual_seed(0), weights=w).numpy()
    assert abs((groups[order] == 0).mean() - 0.5 / 11) < 0.01            # not 90/100 of the good draws
    # without copy groups every photo is its own shot: the class-balanced sampler
    flat = shot_balance_weights(y, None)
    assert np.allclose(flat[y == 0], 0.5 / 100) and np.allclose(flat[y == 1], 0.5 / 10)


def test_balance_shots_finds_copies_even_when_the_split_goes_photo_by_photo(tiny_data, tmp_path):
    out = tmp_path / "m"
    train(_tiny_cfg(tiny_data, out, balance="shots", group_copies=False))
    card = json.loads((out / "card.json").read_text())
    assert card["train"]["config"]["balance"] == "shots"
    split = json.loads((out / "split.json").read_text())
    assert len(split["copy_groups"]) == sum(len(split[k]) for k in ("train", "val", "test"))


def test_mixed_policy_out_of_range_is_a_clear_error(tiny_data, tmp_path):
    from defectcls.errors import DefectclsError

    with pytest.raises(DefectclsError, match="--mixed"):
        train(_tiny_cfg(tiny_data, tmp_path / "m", mixed="good"))


def test_hard_share_out_of_range_is_a_clear_error(tiny_data, tmp_path):
    from defectcls.errors import DefectclsError

    with pytest.raises(DefectclsError, match="--hard-share"):
        train(_tiny_cfg(tiny_data, tmp_path / "m", hard_share=1.5))


def test_rank_loss_pushes_each_good_part_under_the_batch_lowest_bad_part():
    import torch
    import torch.nn.functional as F

    from defectcls.train import rank_loss

    # margins (bad - good logit): good -3 and -5, bad 2 and -1 (the lowest bad part)
    z = torch.tensor([[0.0, -3.0], [0.0, 2.0], [0.0, -5.0], [0.0, -1.0]], requires_grad=True)
    y = torch.tensor([0, 1, 0, 1])
    loss = rank_loss(z, y)
    torch.testing.assert_close(loss, (F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(-4.0))) / 2)
    loss.backward()
    g = z.grad[:, 1] - z.grad[:, 0]   # twice d loss / d margin
    assert g[0] > g[2] > 0            # a descent step lowers both good parts, the one nearer the bad part most
    assert g[3] < 0 and g[1] == 0     # and lifts only the lowest bad part
    for labels in (torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)):   # one class: nothing to rank
        z1 = torch.randn(3, 2, requires_grad=True)
        one = rank_loss(z1, labels)
        one.backward()
        assert one.item() == 0 and z1.grad.abs().sum() == 0


def test_rank_k_pulls_good_parts_under_the_few_lowest_bad_parts():
    import torch
    import torch.nn.functional as F

    from defectcls.train import rank_loss

    # margins: good -3 and -5; bad 2, -1 and 0.5: the two lowest bad parts are -1 and 0.5
    z = torch.tensor([[0.0, -3.0], [0.0, 2.0], [0.0, -5.0], [0.0, -1.0], [0.0, 0.5]], requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 1])
    sp = F.softplus
    t = torch.tensor
    torch.testing.assert_close(rank_loss(z, y, 1), (sp(t(-2.0)) + sp(t(-4.0))) / 2)   # K 1: the lowest alone
    two = rank_loss(z, y, 2)
    torch.testing.assert_close(two, (sp(t(-2.0)) + sp(t(-3.5)) + sp(t(-4.0)) + sp(t(-5.5))) / 2)
    two.backward()
    g = z.grad[:, 1] - z.grad[:, 0]
    assert g[3] < g[4] < 0 and g[1] == 0   # both of the two lowest bad parts are lifted, the lower more; not the third
    assert g[0] > g[2] > 0
    every = rank_loss(z.detach(), y, 3)
    torch.testing.assert_close(rank_loss(z.detach(), y, 50), every)   # K past the batch's bad parts: all of them


def test_rank_weight_joins_the_loss_and_the_card(tiny_data, tmp_path):
    from defectcls.errors import DefectclsError

    train(_tiny_cfg(tiny_data, tmp_path / "plain", seed=5))
    train(_tiny_cfg(tiny_data, tmp_path / "ranked", seed=5, rank_weight=2.0))
    loss = [json.loads((tmp_path / d / "card.json").read_text())["train"]["history"][0]["train_loss"]
            for d in ("plain", "ranked")]
    assert loss[1] > loss[0]   # same seed, same draws: the ranking term adds to what is minimised
    card = json.loads((tmp_path / "ranked" / "card.json").read_text())
    assert card["train"]["config"]["rank_weight"] == 2.0
    with pytest.raises(DefectclsError, match="--rank-weight"):
        train(_tiny_cfg(tiny_data, tmp_path / "m", rank_weight=-1.0))
    for k in (0, 1.5, True):
        with pytest.raises(DefectclsError, match="--rank-k"):
            train(_tiny_cfg(tiny_data, tmp_path / "m", rank_weight=1.0, rank_k=k))
    with pytest.raises(DefectclsError, match="--rank-weight W too"):   # K without the loss it shapes: not silently ignored
        train(_tiny_cfg(tiny_data, tmp_path / "m", rank_k=4))
    assert not (tmp_path / "m").exists()   # refused before anything is written


def test_paint_bad_trains_painted_good_parts_as_bad_and_is_recorded(tiny_data, tmp_path):
    from defectcls.config import AugConfig
    from defectcls.errors import DefectclsError

    train(_tiny_cfg(tiny_data, tmp_path / "plain", seed=5))
    train(_tiny_cfg(tiny_data, tmp_path / "painted", seed=5, aug=AugConfig(paint_bad=0.5)))
    cards = [json.loads((tmp_path / d / "card.json").read_text()) for d in ("plain", "painted")]
    assert cards[1]["train"]["config"]["aug"]["paint_bad"] == 0.5 and cards[0]["train"]["config"]["aug"]["paint_bad"] == 0
    # same seed: only the painting differs, and it changes what the network was trained on
    assert cards[0]["train"]["history"][0]["train_loss"] != cards[1]["train"]["history"][0]["train_loss"]
    for bad in (-0.1, 1.0):
        with pytest.raises(DefectclsError, match="paint_bad must be a share"):
            train(_tiny_cfg(tiny_data, tmp_path / "m", aug=AugConfig(paint_bad=bad)))
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def masked_data(tmp_path_factory) -> Path:
    """24 good and 12 bad synthetic parts (96 px) with their defect masks in masks/."""
    from defectcls.synth import generate

    out = tmp_path_factory.mktemp("masked")
    generate(out, n_good=24, n_bad=12, seed=3, size=96, masks=True)
    return out


def test_load_masks_reads_bad_masks_and_marks_the_missing_unknown(masked_data, tmp_path):
    import numpy as np
    from PIL import Image

    from defectcls.data import fit_square, load_masks, scan_folder
    from defectcls.errors import DefectclsError

    masks_dir = tmp_path / "masks"
    shutil.copytree(masked_data / "masks", masks_dir)
    (masks_dir / "bad_00001.png").unlink()
    Image.new("L", (50, 50)).save(masks_dir / "bad_00002.png")       # not the image's size
    samples = scan_folder(masked_data)
    m, known, problems = load_masks(samples, masks_dir, 32)
    names = [Path(s.path).name for s in samples]
    assert m.shape == (len(samples), 1, 32, 32) and m.dtype == np.uint8
    for i, s in enumerate(samples):
        if s.label == 0:
            assert known[i] and m[i].max() == 0
    unknown = {names[i] for i in np.flatnonzero(~known)}
    assert unknown == {"bad_00001.png", "bad_00002.png"} and len(problems) == 2
    assert any("50x50" in why for _, why in problems)
    i = names.index("bad_00000.png")
    raw = np.asarray(Image.open(masked_data / "masks" / "bad_00000.png")) > 0
    assert m[i].max() == 255 and np.array_equal(m[i, 0], fit_square(np.where(raw, 255, 0).astype(np.uint8), 32))
    with pytest.raises(DefectclsError, match="mask folder not found"):
        load_masks(samples, tmp_path / "nowhere", 32)
    # a JPEG photo finds the PNG mask of its name
    from defectcls.data import Sample

    Image.open(masked_data / "bad" / "bad_00000.png").convert("RGB").save(tmp_path / "bad_00000.jpg", quality=95)
    m_jpg, known_jpg, _ = load_masks([Sample(str(tmp_path / "bad_00000.jpg"), 1)], masks_dir, 32)
    assert known_jpg[0] and np.array_equal(m_jpg[0], m[i])


def test_mask_loss_rewards_cells_that_fire_where_the_defect_is():
    import torch

    from defectcls.train import mask_loss

    masks = torch.zeros(2, 1, 16, 16)
    masks[0, 0, 2:4, 10:12] = 1.0                    # one defect, in cell (0, 2) of a 4 x 4 grid
    known = torch.tensor([True, True])
    right = torch.full((2, 1, 4, 4), -6.0)
    right[0, 0, 0, 2] = 6.0
    wrong = torch.full((2, 1, 4, 4), -6.0)
    wrong[0, 0, 3, 0] = 6.0
    assert float(mask_loss(right, masks, known)) < 0.01 < 1.0 < float(mask_loss(wrong, masks, known))
    # the one positive cell weighs as much as the 31 negative ones
    silent = torch.full((2, 1, 4, 4), -6.0)
    assert float(mask_loss(silent, masks, known)) == pytest.approx(0.5 * 6.0, abs=0.01)
    logits = torch.zeros(2, 1, 4, 4, requires_grad=True)
    none = mask_loss(logits, masks, torch.tensor([False, False]))
    none.backward()
    assert float(none.detach()) == 0.0 and float(logits.grad.abs().sum()) == 0.0


def test_cell_targets_read_the_window_each_cell_looks_at():
    """MobileNet and ResNet cells look 15.5 px up-left of the usual grid: a defect there belongs to them."""
    import torch

    from defectcls.models import cam_offset
    from defectcls.train import cell_targets

    off = cam_offset("mobilenet_v3_small")
    assert off == (15.5, 15.5)
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, 0, 20:28, 20:28] = 1.0        # around pixel 24: cell (1, 1)'s window is 16-48 with the offset
    masks[1, 0, 0:6, 40:46] = 1.0          # top edge, right: cell (0, 1) either way
    on_grid = cell_targets(masks, (2, 2))
    seen = cell_targets(masks, (2, 2), off)
    assert on_grid[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert seen[0, 0].tolist() == [[0.0, 0.0], [0.0, 1.0]]
    assert on_grid[1, 0].tolist() == seen[1, 0].tolist() == [[0.0, 1.0], [0.0, 0.0]]
    # an offset the other way moves the windows down-right
    assert cell_targets(masks[:1], (2, 2), (-16.0, -16.0))[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    low = torch.zeros(1, 1, 64, 64)
    low[0, 0, 50:54, 50:54] = 1.0
    assert cell_targets(low, (2, 2), (-16.0, -16.0))[0, 0].tolist() == [[0.0, 0.0], [0.0, 1.0]]


def test_training_with_masks_learns_beside_the_class_and_saves_the_plain_network(masked_data, tmp_path):
    from defectcls.cli import main
    from defectcls.errors import DefectclsError
    from defectcls.models import build_model, load_model_dir

    low, high = tmp_path / "low", tmp_path / "high"
    train(_tiny_cfg(masked_data, low, epochs=2, tta=1, masks=str(masked_data / "masks"), mask_weight=0.5))
    rc = main(["train", "--data", str(masked_data), "--out", str(high), "--arch", "mobilenet_v3_small",
               "--epochs", "2", "--img-size", "32", "--batch-size", "16", "--epoch-size", "0", "--tta", "1",
               "--workers", "1", "--no-cache", "--json", "--masks", str(masked_data / "masks"), "--mask-weight", "2"])
    assert rc == 0
    config = json.loads((high / "card.json").read_text())["train"]["config"]
    assert config["masks"] == str(masked_data / "masks") and config["mask_weight"] == 2.0
    a, _ = load_model_dir(low)
    b, _ = load_model_dir(high)
    plain_keys = build_model("mobilenet_v3_small", in_chans=1, num_classes=2).state_dict().keys()
    assert a.state_dict().keys() == b.state_dict().keys() == plain_keys   # the mask head is not saved
    # same seed, data and random draws (both runs build the head): only the mask loss's weight differs
    diff = max(float((p - q).abs().max().detach()) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert diff > 1e-4
    with pytest.raises(DefectclsError, match="--frame full"):
        train(_tiny_cfg(masked_data, tmp_path / "x", masks=str(masked_data / "masks"), frame="part"))
    with pytest.raises(DefectclsError, match="--mask-weight"):
        train(_tiny_cfg(masked_data, tmp_path / "x", masks=str(masked_data / "masks"), mask_weight=0))
    with pytest.raises(DefectclsError, match="mask folder not found"):
        train(_tiny_cfg(masked_data, tmp_path / "x", masks=str(tmp_path / "nowhere")))
    empty = tmp_path / "empty_masks"
    empty.mkdir()
    with pytest.raises(DefectclsError, match="no bad image has a usable mask"):
        train(_tiny_cfg(masked_data, tmp_path / "x", masks=str(empty)))


def test_mask_head_reads_the_cam_layer_and_leaves_no_hook_behind():
    import torch

    from defectcls.models import build_model, cam_target_layer
    from defectcls.train import with_mask_head

    model = build_model("mobilenet_v3_small", in_chans=1, num_classes=2)
    layer = cam_target_layer(model, "mobilenet_v3_small")
    head = with_mask_head(model, "mobilenet_v3_small", 1, 64)
    assert len(layer._forward_hooks) == 1
    logits, cells = head(torch.rand(3, 1, 64, 64))
    assert logits.shape == (3, 2) and cells.shape == (3, 1, 2, 2)
    assert head.remove() is model and not layer._forward_hooks
    assert not any(m._forward_hooks for m in model.modules())


def test_split_seed_keeps_one_split_under_another_network_seed(tiny_data, tmp_path, capsys):
    from safetensors.torch import load_file

    from defectcls.cli import main

    tiny = ["--arch", "mobilenet_v3_small", "--epochs", "1", "--img-size", "32", "--batch-size", "16",
            "--epoch-size", "0", "--workers", "1", "--no-cache", "--tta", "1", "--json"]
    assert main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "a"), "--seed", "0", "--split-seed", "1",
                 *tiny]) == 0
    capsys.readouterr()
    train(_tiny_cfg(tiny_data, tmp_path / "b", seed=1, tta=1))    # the same split, its own network seed
    train(_tiny_cfg(tiny_data, tmp_path / "c", seed=0, tta=1))    # the same network seed, its own split
    split = {k: json.loads((tmp_path / k / "split.json").read_text()) for k in "abc"}
    parts = {k: {p: split[k][p] for p in ("train", "val", "test")} for k in "abc"}
    assert parts["a"] == parts["b"] != parts["c"]
    assert (split["a"]["seed"], split["b"]["seed"], split["c"]["seed"]) == (1, 1, 0)   # the split's seed
    card = json.loads((tmp_path / "a" / "card.json").read_text())
    assert card["train"]["seed"] == 0 and card["train"]["config"]["split_seed"] == 1
    wa, wb = (load_file(str(tmp_path / k / "model.safetensors")) for k in "ab")
    assert any(not (wa[n] == wb[n]).all() for n in wa)            # another start: another network
