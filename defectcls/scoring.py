"""Scoring a model directory on a labelled folder, without leaking its training images."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import data as D
from .errors import DefectclsError
from .evaluate import compute_metrics, prob_bad_from_logits, shot_counts
from .explain import screen_all_views
from .inference import Predictor
from .train import SPLIT_FILE

SCREEN_MARGIN = 0.2   # the screen clears below a fifth of the lowest one-view P(bad) of a flagged validation bad part


def select_split(model_dir: str | os.PathLike, data_root: str | os.PathLike, samples: list[D.Sample],
                 split: str) -> tuple[list[D.Sample], str]:
    """The samples to score: with split 'auto', the model's own test part when DATA is its training folder."""
    split_path = Path(model_dir) / SPLIT_FILE
    saved = json.loads(split_path.read_text()) if split_path.is_file() else None
    # the same folder, wherever it lives now: same path, or same file names, sizes and labels
    same = saved is not None and (os.path.realpath(saved["data_root"]) == os.path.realpath(data_root)
                                  or saved.get("data_fingerprint") == D.fingerprint(samples))
    if split == "all" or (split == "auto" and not same):
        return samples, "all"
    if saved is None or not same:
        raise DefectclsError(f"--split {split} needs the model's training folder; {model_dir} was trained on "
                             f"{saved['data_root'] if saved else 'an unknown folder'}")
    name = "test" if split == "auto" else split
    root = Path(data_root)
    chosen = [D.Sample(str(root / rel), int(lab)) for rel, lab in saved[name]]
    return chosen, name


def split_copy_groups(model_dir: str | os.PathLike, data_root: str | os.PathLike, paths: list[str]) -> list[int] | None:
    """The copy group of each of PATHS (photos of DATA_ROOT) as MODEL_DIR's split.json kept them; None for a split
    made without looking for copies (``copies.split_groups``)."""
    from .copies import split_groups

    saved = json.loads((Path(model_dir) / SPLIT_FILE).read_text())
    return split_groups(saved, [os.path.relpath(x, data_root) for x in paths])


def evaluate_model(model_dir: str | os.PathLike, data_root: str | os.PathLike, split: str = "auto",
                   threshold: float | None = None, predictor: Predictor | None = None,
                   also: Sequence[Predictor] = ()) -> dict:
    """Metrics of MODEL_DIR on DATA_ROOT at the card's threshold (or THRESHOLD), held photos judged bad
    (``data.photo_check``; "held" per photo); ALSO: more predictors with the same preprocessing, scored
    on the same decoded photos ("also_logits")."""
    pred = predictor or Predictor(model_dir)
    samples, used = select_split(model_dir, data_root, D.scan_folder(data_root), split)
    images, ok, failed = D.decode_all(samples, pred.card.img_size, pred.card.color, use_disk_cache=False,
                                      frame_ref=pred.prep.frame_ref, background=pred.prep.background,
                                      focus_below=pred.prep.focus_below)
    if not ok:
        raise DefectclsError(f"no readable images in {data_root}")
    y = np.array([samples[i].label for i in ok])
    held = D.held_all([samples[i].path for i in ok], pred.card.color)
    z = pred.logits_cached(images)
    p = prob_bad_from_logits(z, pred.card.temperature)
    thr = pred.threshold if threshold is None else threshold
    metrics = compute_metrics(y, p, thr, held)
    groups = split_copy_groups(model_dir, data_root, [samples[i].path for i in ok]) if used != "all" else None
    if groups is not None:
        metrics.update(shot_counts(groups, y, p, thr, held))
    return {"metrics": metrics, "y_true": y.tolist(), "prob_bad": p.tolist(),
            "held": held.tolist(), "logits": z.tolist(),
            "paths": [samples[i].path for i in ok], "model_id": pred.model_id, "split": used,
            "skipped": [{"path": path, "error": err} for path, err in failed],
            "also_logits": [other.logits_cached(images).tolist() for other in also]}


def recalibrate(model_dir: str | os.PathLike, target_fnr: float, method: str = "conformal",
                data_root: str | os.PathLike | None = None, write: bool = True, tta: int | None = None,
                screen: bool = False, no_miss_share: float | None = None, no_miss_min_fpr: float | None = None,
                refit_temperature: bool = False, tta_top: int | None = None) -> dict:
    """Choose MODEL_DIR's threshold anew for TARGET_FNR on its own validation part, without retraining.

    The validation and test parts come from the model's split.json (DATA_ROOT: where its training
    folder is now, default the path it was trained from; the folder must hold the same files).
    TTA sets how many test-time views the model answers with from now on (1, 4 or 8), TTA_TOP how many of them
    count (``models.top_views``; 0: all; None: the card's where fewer than TTA); when either
    changes (or with REFIT_TEMPERATURE), the temperatures are fitted anew on validation
    (``evaluate.threshold_temperatures``: the card's by NLL or squared error, the policy's scale by NLL), else the card's
    are kept and the policy is chosen at the scale it was chosen at before. A card
    written before ``background`` gets it from its training photos (``data.restore_fill``).

    With target 0 the threshold is a share ``no_miss_share`` of the lowest validation bad score, and rejects at
    least ``no_miss_min_fpr`` of the validation good parts (``evaluate.choose_threshold``); by default as the model
    was trained (``config.NO_MISS_SHARE`` and ``config.NO_MISS_MIN_FPR`` for a card from before the options).
    SCREEN (views 4 or 8): also choose the one-view screen (``inference.Predictor``): ``below`` is
    SCREEN_MARGIN times the lowest one-view P(bad) among the validation bad parts the full model
    flags (taken at the policy's scale, as the threshold's share is). A flagged part exchangeable with
    them scores below that lowest one with probability at most 1/(n+1) (n of them, as for the conformal
    threshold); the margin is spare below it (with
    half, the shipped model's own test part had one flagged bad part cleared, at 0.22 of the
    validation lowest: docs/benchmarks.md section 0). ``above`` is the highest one-view P(bad) of
    a validation good part, or the threshold if higher: a good part scores above it with
    probability at most 1/(m+1) (m good parts); a part above it is bad at once, which can only
    catch more bad parts. The metrics are then the screened model's.
    Without SCREEN a card's screen is removed (it belongs to the threshold and temperature it was
    chosen with).
    Threshold, policy, views, temperature, background, screen and val/test metrics are replaced, atomically.
    """
    from .config import NO_MISS_MIN_FPR, NO_MISS_SHARE, no_miss_problem
    from .copies import split_groups
    from .evaluate import at_temperature, choose_threshold, policy_at_temperature, policy_temperature, threshold_temperatures
    from .models import read_card, write_card

    if not 0.0 <= target_fnr < 1.0:
        raise DefectclsError(f"target FNR must be in [0, 1), got {target_fnr}")
    if method not in ("conformal", "empirical"):
        raise DefectclsError(f"threshold method must be conformal or empirical, got {method!r}")
    if problem := no_miss_problem(no_miss_share, no_miss_min_fpr):
        raise DefectclsError(problem)
    model_dir = Path(model_dir)
    split_path = model_dir / SPLIT_FILE
    if not split_path.is_file():
        raise DefectclsError(f"{model_dir} has no {SPLIT_FILE}: its validation part is unknown, so retrain with "
                             "--target-fnr instead")
    saved = json.loads(split_path.read_text())
    if not saved.get("val"):
        raise DefectclsError(f"{model_dir} has no validation part (a --folds ensemble): retrain with --target-fnr")
    root = Path(data_root or saved["data_root"])
    if not root.is_dir():
        raise DefectclsError(f"training folder {root} not found: pass --data with where it is now")
    folder = D.scan_folder(root)
    if D.fingerprint(folder) != saved.get("data_fingerprint"):
        raise DefectclsError(f"{root} does not hold the files {model_dir} was trained on (fingerprint differs)")
    card = read_card(model_dir)
    trained = (card.train or {}).get("config", {})   # as the model was trained; a card from before an option: today's
    if no_miss_share is None:
        no_miss_share = float(trained.get("no_miss_share", NO_MISS_SHARE))
    if no_miss_min_fpr is None:
        no_miss_min_fpr = float(trained.get("no_miss_min_fpr", NO_MISS_MIN_FPR))
    pred = Predictor(model_dir, backend="torch", tta=tta, screen=False, tta_top=tta_top)
    background = card.background
    if background is None:   # a card from before it: the training folder's background, as train estimates it
        background = D.estimate_background([x.path for x in folder], card.color, seed=int(card.train.get("seed", 0)))
        pred.prep = replace(pred.prep, background=tuple(background) if background else None)
    photo_range = card.photo_range   # a card from before it: the training folder's, as train estimates it
    if photo_range is None:
        photo_range = D.estimate_photo_range([x.path for x in folder], card.color, seed=int(card.train.get("seed", 0)))
        if photo_range is not None:
            photo_range["training_files"] = True   # the fingerprint was checked above
            _add_zoom(photo_range, card)
    views, top = pred.card.tta, pred.card.tta_top
    if screen and views == 1:
        raise DefectclsError("--screen needs test-time views to save: use it with --tta 4 or 8 (or a card with them)")
    one = Predictor(model_dir, backend="torch", tta=1, screen=False) if screen else None   # the screen's view
    if one is not None:
        one.prep = pred.prep
    metrics, parts, held, z1, val_names = {}, {}, {}, {}, None
    for name in [n for n in ("val", "test") if saved.get(n)]:
        res = evaluate_model(model_dir, root, split=name, predictor=pred, also=(one,) if one else ())
        if res["skipped"]:
            bad = res["skipped"][0]
            raise DefectclsError(f"{len(res['skipped'])} {name} image(s) unreadable now, e.g. {bad['path']}: {bad['error']}")
        parts[name] = (np.array(res["y_true"]), np.array(res["logits"], dtype=np.float32))
        held[name] = np.array(res["held"], dtype=bool)
        if name == "val":
            val_names = [os.path.relpath(path, root) for path in res["paths"]]
        if one is not None:
            z1[name] = np.array(res["also_logits"][0], dtype=np.float32)
    if views == card.tta and top == card.tta_top and not refit_temperature:   # the card's confidence, the policy's scale kept
        temperature, t_policy = card.temperature, policy_temperature(card)
    else:
        temperature, t_policy = threshold_temperatures(parts["val"][1], parts["val"][0])
    y_val, p_val = parts["val"][0], prob_bad_from_logits(parts["val"][1], t_policy)
    policy = choose_threshold(y_val, p_val, target_fnr, method, names=val_names, held=held["val"],
                              no_miss_share=no_miss_share, no_miss_min_fpr=no_miss_min_fpr,
                              groups=split_groups(saved, val_names))
    thr = policy["threshold"]   # at t_policy until the screen is chosen, then everything at the card's temperature
    probs = {name: (y, prob_bad_from_logits(z, temperature)) for name, (y, z) in parts.items()}
    screen_card = None
    if screen:
        p1 = {name: prob_bad_from_logits(z, t_policy) for name, z in z1.items()}
        flagged = (y_val == 1) & (p_val >= thr)
        if not flagged.any():
            raise DefectclsError("no validation bad part reaches the threshold: nothing to choose a screen from")
        if not (y_val == 0).any():
            raise DefectclsError("no good part in validation: nothing to choose a screen from")
        lowest = float(p1["val"][flagged].min())
        below = min(SCREEN_MARGIN * lowest, thr)
        highest = float(p1["val"][y_val == 0].max())
        above = max(highest, thr)
        n_good = int((y_val == 0).sum())
        all_views = {name: screen_all_views(p, below, above) for name, p in p1.items()}
        if t_policy != temperature:   # the bounds at the card's temperature; a part at one stays on its side
            below, above, lowest, highest = (at_temperature(v, t_policy, temperature)
                                             for v in (below, above, lowest, highest))
            below, above = below * (1 - 1e-9), above * (1 + 1e-9)
        screen_card = {"views": 1, "below": below, "above": above, "lowest_flagged_bad": lowest,
                       "highest_good": highest, "margin": SCREEN_MARGIN, "n_flagged_bad_val": int(flagged.sum()),
                       "clear_miss_bound": 1.0 / (int(flagged.sum()) + 1), "n_good_val": n_good,
                       "false_alarm_bound": 1.0 / (n_good + 1),
                       "all_views_val": float(np.mean(all_views["val"])),
                       "all_views_val_good": float(np.mean(all_views["val"][y_val == 0])),
                       "all_views_val_bad": float(np.mean(all_views["val"][y_val == 1]))}
        probs = {name: (y, np.where(all_views[name], p, prob_bad_from_logits(z1[name], temperature)))
                 for name, (y, p) in probs.items()}
    policy = policy_at_temperature(policy, t_policy, temperature)
    thr = policy["threshold"]
    for name, (y, p) in probs.items():
        metrics[name] = compute_metrics(y, p, thr, held[name])
    before = {"threshold": card.threshold, "threshold_policy": card.threshold_policy, "metrics": card.metrics,
              "tta": card.tta, "tta_top": card.tta_top, "temperature": card.temperature, "background": card.background,
              "screen": card.screen, "photo_range": card.photo_range}
    if write:
        card.threshold, card.threshold_policy, card.metrics = thr, policy, metrics
        card.tta, card.tta_top, card.temperature = views, top, temperature
        card.background, card.screen = background, screen_card
        card.photo_range = photo_range
        write_card(card, model_dir)
    stale = sorted(p.name for p in model_dir.glob("*.onnx"))
    return {"model": str(model_dir), "written": write, "threshold": thr, "threshold_policy": policy,
            "tta": views, "tta_top": top, "temperature": temperature, "background": background, "screen": screen_card,
            "photo_range": photo_range, "metrics": metrics, "before": before,
            "stale_exports": stale}


def _add_zoom(photo_range: dict, card) -> None:
    """``data.add_zoom`` with the zoom CARD's model was trained with, where its card says it."""
    D.add_zoom(photo_range, card.frame_ref, ((card.train.get("config") or {}).get("aug") or {}).get("scale"))


def record_photo_range(model_dir: str | os.PathLike, data_root: str | os.PathLike | None = None,
                       write: bool = True, focus_restore: bool | None = None) -> dict:
    """Measure what MODEL_DIR's training photos look like (``data.estimate_photo_range``, as ``train`` does) and
    record it on its card, for photo notes; nothing else changes and nothing is scored.

    DATA_ROOT: a folder with good/ and bad/, by default the training folder named in split.json. A folder
    that does not hold the files the model was trained on (another copy, re-encoded, or photos like them)
    is measured all the same, and the range says so (``training_files`` false). FOCUS_RESTORE True / False
    turns sharpening softer photos back (the card's ``focus_below``, ``data.restore_focus``) on / off; None
    keeps it as it is (on: at the new range's low end). Returns {model, written, photo_range, focus_below,
    before, stale_exports}: an exported ONNX file carries the card it was exported with, so re-export it."""
    from .models import read_card, write_card

    model_dir = Path(model_dir)
    split_path = model_dir / SPLIT_FILE
    saved = json.loads(split_path.read_text()) if split_path.is_file() else {}
    if data_root is None and not saved:
        raise DefectclsError(f"{model_dir} has no {SPLIT_FILE}: pass --data with a folder of its kind of photos")
    root = Path(data_root or saved["data_root"])
    if not root.is_dir():
        raise DefectclsError(f"folder {root} not found: pass --data with where the training photos are now")
    folder = D.scan_folder(root)
    card = read_card(model_dir)
    photo_range = D.estimate_photo_range([x.path for x in folder], card.color, seed=int(card.train.get("seed", 0)))
    if photo_range is None:
        raise DefectclsError(f"no photo of {root} could be read: nothing to measure")
    photo_range["training_files"] = D.fingerprint(folder) == saved.get("data_fingerprint")
    _add_zoom(photo_range, card)
    before = {"photo_range": card.photo_range, "focus_below": card.focus_below}
    restore = bool(card.focus_below) if focus_restore is None else focus_restore
    focus_below = photo_range["sharpness"][0] if restore else None
    if write:
        card.photo_range, card.focus_below = photo_range, focus_below
        write_card(card, model_dir)
    return {"model": str(model_dir), "written": write, "photo_range": photo_range, "focus_below": focus_below,
            "before": before, "folder": str(root), "stale_exports": sorted(p.name for p in model_dir.glob("*.onnx"))}
