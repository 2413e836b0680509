"""`defectcls <command>`: argument parsing and output only; the library does the work."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from .config import MIXED, NO_MISS_MIN_FPR, NO_MISS_SHARE, AugConfig, no_miss_problem
from .errors import DefectclsError

DEFAULT_MODEL_NAME = "mobilenet_v3_large_gray"


def default_model_dir() -> str:
    """The shipped model: under DEFECTCLS_MODELS_DIR (default ./models), else in this checkout's models/."""
    from .config import models_dir

    here = Path(models_dir()) / DEFAULT_MODEL_NAME
    shipped = Path(__file__).resolve().parents[1] / "models" / DEFAULT_MODEL_NAME
    if not here.is_dir() and not os.environ.get("DEFECTCLS_MODELS_DIR") and shipped.is_dir():
        return str(shipped)     # run from another folder: the checkout's own shipped model
    return str(here)


def _emit(obj, as_json: bool, text: str | None = None) -> None:
    from .evaluate import to_json

    print(to_json(obj) if as_json else (text if text is not None else json.dumps(obj, indent=2)), flush=True)


class _Fmt(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _cmd(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=f"{help}\n\nexample:\n  {example}", formatter_class=_Fmt)


# ---------------------------------------------------------------- synth

def _add_synth(sub) -> None:
    p = _cmd(sub, "synth", "generate synthetic emblem photos (good/ and bad/)",
             "defectcls synth --out data/synth --good 1000 --bad 350 --seed 0")
    p.add_argument("--out", required=True, help="output folder (gets good/, bad/ and with --masks masks/)")
    p.add_argument("--good", type=int, default=1000, help="number of good parts")
    p.add_argument("--bad", type=int, default=350, help="number of bad parts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--masks", action="store_true", help="also write each bad image's defect mask")
    p.add_argument("--defects", default=None,
                   help="defect kinds of bad parts, comma-separated (default: all of blotch, corruption, scratch)")
    p.add_argument("--subtle-share", type=float, default=None,
                   help="share of bad parts whose defects are all subtle, the borderline cases (default: 0.2)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_synth)


def _run_synth(a) -> int:
    from .synth import generate

    if a.good < 0 or a.bad < 0 or a.size < 32:
        raise DefectclsError("--good/--bad must be >= 0 and --size >= 32")
    mix = {}     # only what was asked for: the generator's defaults are the product's mix
    if a.defects is not None:
        mix["kinds"] = tuple(k.strip() for k in a.defects.split(",") if k.strip())
    if a.subtle_share is not None:
        mix["subtle_share"] = a.subtle_share
    s = generate(a.out, n_good=a.good, n_bad=a.bad, seed=a.seed, size=a.size, masks=a.masks,
                 workers=a.workers, progress=not a.json, **mix)
    _emit(s, a.json, f"wrote {a.good} good and {a.bad} bad images ({a.size}px) to {a.out}")
    return 0


# ---------------------------------------------------------------- train

def _add_train(sub) -> None:
    from .config import TrainConfig

    d = TrainConfig(data="", out="")
    p = _cmd(sub, "train", "train a good/bad classifier on a folder with good/ and bad/",
             "defectcls train --data data/synth --arch mobilenet_v3_large --out models/my_model")
    p.add_argument("--data", required=True, help="folder with good/ and bad/ subfolders")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--arch", default=d.arch, help="mobilenet_v3_large, resnet50, resnet18, mobilenet_v2, squeezenet1_1, ...")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--epoch-size", type=int, default=d.epoch_size, metavar="N",
                   help="samples an epoch draws at least: a smaller training set is repeated, reshuffled each pass, "
                        "so a few hundred photos get the steps of a full-size set; 0: one pass")
    p.add_argument("--img-size", type=int, default=d.img_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, metavar="WD",
                   help="AdamW's decoupled weight decay (0: none)")
    p.add_argument("--color", choices=["gray", "rgb"], default=d.color)
    p.add_argument("--seed", type=int, default=d.seed,
                   help="the network's start, the order of its photos and their augmentation; also the split's unless "
                        "--split-seed")
    p.add_argument("--split-seed", type=int, default=None,
                   help="which photos go to train / val / test (and the folds, the --max-per-class subset); default: "
                        "--seed. One split with two --seed values tells the network's luck from the split's draw")
    p.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument("--target-fnr", type=float, default=d.target_fnr, help="FNR the threshold must meet on new parts")
    p.add_argument("--threshold-method", choices=["conformal", "empirical"], default=d.threshold_method)
    p.add_argument("--no-miss-share", type=float, default=d.no_miss_share, metavar="F",
                   help="with target FNR 0 (conformal): the threshold is F times the lowest validation bad score, "
                        "a margin for a new part's lowest bad score; in (0, 1]")
    p.add_argument("--no-miss-min-fpr", type=float, default=d.no_miss_min_fpr, metavar="A",
                   help="with target FNR 0 (conformal): the threshold also rejects at least the share A of the "
                        "validation good parts, for the bad parts scored among them that validation did not draw; "
                        "in [0, 1), 0: none")
    p.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience in epochs")
    p.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="wall-clock budget of the training loop: no epoch starts that would end past it (at the "
                        "mean epoch length so far); the best epoch is kept. The schedule still spans --epochs. "
                        "Ctrl-C or SIGTERM also end the loop: the best epoch so far is saved, then exit status 130")
    p.add_argument("--ema", type=float, default=d.ema, metavar="DECAY",
                   help="validate and keep an exponential moving average of the weights (e.g. 0.995); 0: off")
    p.add_argument("--balance", choices=["loss", "sampler", "background", "shots", "none"], default=d.balance,
                   help="class imbalance: weighted loss, balanced sampler, a sampler balanced within each band "
                        "of background level (so the light behind the part cannot stand in for the class), a sampler "
                        "that weighs every shot of each class alike, its copies sharing its weight, or none")
    p.add_argument("--hard-share", type=float, default=d.hard_share, metavar="F",
                   help="share of each epoch (after the first) drawn again in proportion to each photo's recent "
                        "loss, so rare defects the network still misses are seen more often; 0: off")
    p.add_argument("--rank-weight", type=float, default=d.rank_weight, metavar="W",
                   help="beside the class loss, W times a ranking loss: each good part of a batch should score "
                        "below the batch's lowest-scored bad part (the photos that set the no-miss threshold); 0: off")
    p.add_argument("--rank-k", type=int, default=d.rank_k, metavar="K",
                   help="with --rank-weight: pull each good part under the batch's K lowest-scored bad parts, "
                        "not only the lowest (the pulls are summed)")
    p.add_argument("--masks", metavar="DIR",
                   help="defect masks named like the bad images (`defectcls synth --masks` writes DATA/masks): a "
                        "second loss teaches the last feature map (the Grad-CAM layer) where each defect is")
    p.add_argument("--mask-weight", type=float, default=d.mask_weight, metavar="W",
                   help="weight of the mask loss beside the class loss (with --masks)")
    p.add_argument("--pretrained", action="store_true", help="start from ImageNet weights (download or torch cache)")
    p.add_argument("--pretrained-file", help="start from a local state dict (safetensors or plain weights file)")
    p.add_argument("--extra-labels", help="reviewed-labels CSV (path,label) that adds or overrides labels")
    p.add_argument("--init", help="start from this model directory's weights (same arch and colour mode): fine-tuning")
    p.add_argument("--max-per-class", type=int, nargs=2, metavar=("GOOD", "BAD"),
                   help="train on a seeded subset of the training part")
    p.add_argument("--group-copies", action=argparse.BooleanOptionalAction, default=d.group_copies,
                   help="find copies of one photo in DATA (turned, mirrored, zoomed or relit versions, as augmented "
                        "datasets ship them) and keep each photo's copies in one part of the split and one fold, so "
                        "validation and test score photos the network never saw; --no-group-copies splits photo by "
                        "photo")
    p.add_argument("--mixed", choices=MIXED, default=d.mixed,
                   help="a shot whose copies are filed under both labels (`defectcls copies` names them), in "
                        "training: keep each copy's label, train every copy as bad (a defect one inspector saw), or "
                        "leave the shot out; validation and test keep the labels as filed")
    p.add_argument("--folds", type=int, default=d.folds,
                   help="K > 1: K-fold cross-validation; writes OUT/fold_0..K-1 and OUT as their ensemble")
    p.add_argument("--fp16-weights", action="store_true", help="store weights as float16 (half the size)")
    p.add_argument("--no-focus-restore", action="store_true",
                   help="do not sharpen photos softer than the training photos back before judging them (the "
                        "default does: data.restore_focus)")
    p.add_argument("--aug", choices=["full", "light", "none"], default="full",
                   help="training augmentation: full (pose, light, blur, JPEG, noise), light (pose, mild light), none")
    p.add_argument("--no-aug", action="store_const", const="none", dest="aug", help="same as --aug none")
    p.add_argument("--aug-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="change single augmentation ranges of the preset (fields of AugConfig), e.g. brightness=0.3 "
                        "gamma=0.45 (the ranges before 2026-11-28)")
    p.add_argument("--input-norm", choices=["image", "centre", "none"], default=None,
                   help="image: each photo standardised to zero mean and unit variance inside the network, so "
                        "light and contrast drifts do not move the verdict; centre: the same with the mean and "
                        "variance of the central disc, where the part is, so filled corners do not move it either; "
                        "none: the dataset's mean/std only "
                        "(default: image, or the --init model's)")
    p.add_argument("--pool", choices=["avg", "avgmax"], default=None,
                   help="global pooling before the classifier: avg, or avgmax (mean of average and max pooling, so "
                        "a defect a few pixels wide is not averaged away) (default: avg, or the --init model's)")
    p.add_argument("--frame", choices=["full", "part"], default=None,
                   help="part: each photo cropped to a square centred on the part and scaled to the training photos' "
                        "median part size, so camera distance and off-centre parts do not move the verdict; full: "
                        "the whole photo (default: full, or the --init model's)")
    p.add_argument("--tta", type=int, choices=[1, 4, 8], default=8,
                   help="test-time views the model answers with: 8 = the 4 rotations by 90 degrees and their mirror "
                        "images, logits averaged (fewer missed parts and false alarms, 8x the compute); 1 = the photo "
                        "alone (fastest); threshold and temperature are chosen with the same views")
    p.add_argument("--tta-top", type=int, default=d.tta_top, metavar="K",
                   help="of those views, average the K with the highest bad margin (a defect that one view shows "
                        "is not averaged away by the others); 0: all of them (default: %(default)s; 2 is "
                        "measured in docs/benchmarks.md)")
    p.add_argument("--bad-degrade", type=float, default=AugConfig.bad_degrade, metavar="F",
                   help="blur and JPEG strength on bad parts, as a share of the good parts' (1: alike): lower "
                        "spares the smallest defects, but the more strongly blurred photos are then all good parts "
                        "and the network learns that blur means good")
    p.add_argument("--no-cache", action="store_true", help="do not keep decoded images on disk")
    p.add_argument("--workers", type=int, default=None, help="decode processes")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object (no progress bars)")
    p.set_defaults(func=_run_train)


def _aug_overrides(pairs: list[str]) -> dict:
    """--aug-set KEY=VALUE ... -> {field: value} of AugConfig, each value of its field's type."""
    from dataclasses import fields

    types = {f.name: type(getattr(AugConfig(), f.name)) for f in fields(AugConfig)}
    out = {}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep or key not in types or key == "bad_degrade":
            raise DefectclsError(f"--aug-set {pair!r}: expected KEY=VALUE with KEY one of "
                                 f"{', '.join(k for k in types if k != 'bad_degrade')} (--bad-degrade has its own flag)")
        try:
            out[key] = (val.lower() in ("1", "true", "yes")) if types[key] is bool else types[key](val)
        except ValueError as exc:
            raise DefectclsError(f"--aug-set {pair!r}: {val!r} is not a {types[key].__name__}") from exc
    return out


def _run_train(a) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(data=a.data, out=a.out, arch=a.arch, epochs=a.epochs, epoch_size=a.epoch_size, img_size=a.img_size,
                      batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, color=a.color, seed=a.seed,
                      split_seed=a.split_seed, device=a.device,
                      target_fnr=a.target_fnr, threshold_method=a.threshold_method, no_miss_share=a.no_miss_share,
                      no_miss_min_fpr=a.no_miss_min_fpr, patience=a.patience,
                      max_minutes=a.max_minutes, ema=a.ema, rank_weight=a.rank_weight, rank_k=a.rank_k,
                      balance=a.balance, hard_share=a.hard_share, pretrained=a.pretrained, pretrained_file=a.pretrained_file,
                      extra_labels=a.extra_labels, init=a.init, max_per_class=tuple(a.max_per_class) if a.max_per_class else None,
                      folds=a.folds, group_copies=a.group_copies, mixed=a.mixed, fp16_weights=a.fp16_weights,
                      focus_restore=not a.no_focus_restore, workers=a.workers, disk_cache=not a.no_cache,
                      progress=not a.json, aug=AugConfig.preset(a.aug), input_norm=a.input_norm, pool=a.pool, tta=a.tta,
                      tta_top=a.tta_top, frame=a.frame, masks=a.masks, mask_weight=a.mask_weight)
    if not 0 <= a.bad_degrade <= 1:
        raise DefectclsError("--bad-degrade must be in [0, 1]")
    cfg.aug = replace(cfg.aug, bad_degrade=a.bad_degrade, **_aug_overrides(a.aug_set))
    from .models import arch_spec

    arch_spec(cfg.arch)
    if not 0 <= cfg.target_fnr < 1:
        raise DefectclsError("--target-fnr must be in [0, 1)")
    _check_no_miss(cfg.no_miss_share, cfg.no_miss_min_fpr)
    summary = train(cfg)
    if summary and a.json:
        _emit(summary, True)
    return 0


# ---------------------------------------------------------------- evaluate

def _add_evaluate(sub) -> None:
    p = _cmd(sub, "evaluate", "score a model on a labelled folder (FNR, FPR, AUROC, ECE, ...)",
             "defectcls evaluate --model models/mobilenet_v3_large_gray --data data/synth_test --json")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--data", required=True, help="folder with good/ and bad/")
    p.add_argument("--split", choices=["auto", "all", "train", "val", "test"], default="auto",
                   help="auto: the model's own test part when DATA is its training folder, else all images")
    p.add_argument("--threshold", type=float, default=None, help="override the card's threshold")
    p.add_argument("--report-dir", help="write ROC, confusion and reliability plots, metrics.json and scores.csv "
                                        "(each photo's P(bad) and verdict) here")
    p.add_argument("--perturb", action="store_true",
                   help="score clean and under each perturbation (light, blur, JPEG, noise, pose); "
                        "with --report-dir writes perturb.md, perturb.json and perturb_scores.csv (each "
                        "photo's P(bad) under each perturbation)")
    p.add_argument("--perturb-names", help="comma-separated perturbations or groups (implies --perturb; default: "
                                           "'line', the line's drifts; 'stronger': past them; 'fills': turns and "
                                           "zooms with black, white, mirrored or edge corners; 'slant': the "
                                           "camera off the part's axis; 'all'; 'list' "
                                           "prints the names; any other magnitude or combination composes "
                                           "from steps joined by '+', e.g. blur2.5+jpeg25 or "
                                           "rotate_any+scale0.8_black)")
    p.add_argument("--perturb-seed", type=int, default=0, help="seed of the random perturbations (noise, angles)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(a) -> int:
    if a.perturb or a.perturb_names:
        return _run_evaluate_perturb(a)
    from .evaluate import write_report
    from .scoring import evaluate_model

    res = evaluate_model(a.model or default_model_dir(), a.data, split=a.split, threshold=a.threshold)
    m = res["metrics"]
    if a.report_dir:
        res["report_files"] = write_report(a.report_dir, res["y_true"], res["prob_bad"], m, title=res["model_id"],
                                           paths=res["paths"], held=res["held"])
    out = {**m, "model_id": res["model_id"], "split": res["split"], "skipped": res["skipped"],
           **({"report_files": res["report_files"]} if a.report_dir else {})}
    text = (f"{res['model_id']} on {a.data} ({res['split']}, n={m['n']}): threshold {m['threshold']:.4f}\n"
            f"  FNR {m['fnr']:.4f} ({m['fn']}/{m['n_bad']} bad parts missed)   FPR {m['fpr']:.4f} "
            f"({m['fp']}/{m['n_good']} good parts rejected)\n"
            f"  precision {m['precision']:.4f} recall {m['recall']:.4f} AUROC {m['auroc']:.4f} AP {m['ap']:.4f} "
            f"ECE {m['ece']:.4f}\n  FPR at no miss {m['fpr_at_no_miss']:.4f} (the best threshold set on these "
            f"photos themselves to miss none: the floor the ranking sets)\n"
            f"  confusion [[tn fp] [fn tp]] = {m['confusion_matrix']}"
            + (f"\n  bad shots (copies of one photo counted once, as the card's bound counts them): "
               f"{m['missed_shots']} of {m['bad_shots']} missed; good shots: {m['rejected_shots']} of "
               f"{m['good_shots']} with a copy rejected"
               + (f" (95% bound for new good shots {m['rejected_shots_upper95']:.3f})"
                  if "rejected_shots_upper95" in m else "") if "bad_shots" in m else "")
            + (f"\n  held (judged bad whatever the model says: no part seen, or a slanted camera): "
               f"{m['held_bad']} bad, {m['held_good']} good" if m["held_bad"] or m["held_good"] else "")
            + (f"\n  skipped {len(res['skipped'])} unreadable file(s)" if res["skipped"] else ""))
    _emit(out, a.json, text)
    return 0


def _check_no_miss(share: float | None, min_fpr: float | None) -> None:
    if problem := no_miss_problem(share, min_fpr, ("--no-miss-share", "--no-miss-min-fpr")):
        raise DefectclsError(problem)


def _add_calibrate(sub) -> None:
    p = _cmd(sub, "calibrate", "choose a model's threshold anew for a target FNR on its own validation part "
                               "(no retraining)",
             "defectcls calibrate --model runs/my_model --target-fnr 0.01")
    p.add_argument("--model", required=True, help="model directory with its split.json")
    p.add_argument("--target-fnr", type=float, default=None,
                   help="missed-defect rate to guarantee, e.g. 0 or 0.01 (required unless --photos-only)")
    p.add_argument("--threshold-method", choices=["conformal", "empirical"], default="conformal")
    p.add_argument("--no-miss-share", type=float, default=None, metavar="F",
                   help="with target FNR 0: the threshold is F times the lowest validation bad score (default: "
                        f"the share the model was trained with; {NO_MISS_SHARE:g} for a model trained before the option)")
    p.add_argument("--no-miss-min-fpr", type=float, default=None, metavar="A",
                   help="with target FNR 0: the threshold also rejects at least the share A of the validation good "
                        f"parts (default: as the model was trained; {NO_MISS_MIN_FPR:g} for a model trained before the "
                        "option)")
    p.add_argument("--data", default=None, help="the training folder, if it moved since training")
    p.add_argument("--tta", type=int, choices=[1, 4, 8], default=None,
                   help="change the test-time views the model answers with (the temperature is refitted); "
                        "default: keep the card's")
    p.add_argument("--tta-top", type=int, default=None, metavar="K",
                   help="change how many of those views count: the K with the highest bad margin, 0 for all (the "
                        "temperature is refitted); default: keep the card's")
    p.add_argument("--refit-temperature", action="store_true",
                   help="fit the temperature anew on validation with the views kept: the confidence by NLL or squared "
                        "error, whichever leaves the lower validation ECE, the policy's scale by NLL (for a model "
                        "trained before the confidence was fitted so; the verdicts at the same policy do not change)")
    p.add_argument("--screen", action="store_true",
                   help="with test-time views: look at one view first; a part whose one-view P(bad) is below a "
                        "fifth of every flagged validation bad part's is good, one above every validation good "
                        "part's (and the threshold) is bad; only the parts between get all views")
    p.add_argument("--photos-only", action="store_true",
                   help="only measure what the training photos look like (their sharpness and the part's size) "
                        "and record it on the card, for the photo notes on softer photos and on parts sized past "
                        "training; --data may then be any folder of photos "
                        "like them (the card says whether they were the training files); no scoring, the "
                        "threshold stays (a threshold calibration records it too, on cards without it)")
    p.add_argument("--focus-restore", choices=["on", "off"], default=None,
                   help="with --photos-only: sharpen photos softer than the training photos back before judging "
                        "them (data.restore_focus; what training does by default), or not; default: as the card has it")
    p.add_argument("--dry-run", action="store_true", help="print the new threshold and metrics, change nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_calibrate)


def _views_text(views: int, top: int) -> str:
    return f"{views}" + (f" (the {top} most suspicious counted)" if top else "")


def _photo_range_text(r: dict | None) -> str:
    if not r:
        return "none"
    from .data import trained_sizes

    sizes = trained_sizes(r)
    return (f"sharpness {r['sharpness'][0]:.3g}-{r['sharpness'][-1]:.3g}"
            + (f", part size {sizes[0]:.3f}-{sizes[1]:.3f} of the side with zoom" if sizes else "") + f" ({r['n']} photos)")


def _run_calibrate(a) -> int:
    from .evaluate import lone_threshold_warning, tradeoff_text
    from .scoring import recalibrate, record_photo_range

    if a.photos_only:
        if (a.target_fnr is not None or a.tta is not None or a.tta_top is not None or a.screen or a.no_miss_share is not None
                or a.no_miss_min_fpr is not None or a.refit_temperature):
            raise DefectclsError("--photos-only changes nothing but the photo range: drop --target-fnr, --tta, --tta-top, "
                                 "--refit-temperature, --screen, --no-miss-share and --no-miss-min-fpr, or calibrate "
                                 "without it (which "
                                 "records the range too)")
        res = record_photo_range(a.model, data_root=a.data, write=not a.dry_run,
                                 focus_restore=None if a.focus_restore is None else a.focus_restore == "on")
        old = res["before"]
        lines = [f"{a.model}: training photos' look {_photo_range_text(old['photo_range'])} -> "
                 f"{_photo_range_text(res['photo_range'])}" + ("" if res["written"] else "  [dry run: not written]")]
        lines.append(f"  focus restore: {'below ' + format(old['focus_below'], '.3g') if old['focus_below'] else 'off'} -> "
                     + (f"photos of sharpness below {res['focus_below']:.3g} are sharpened back" if res["focus_below"]
                        else "off"))
        if not res["photo_range"]["training_files"]:
            lines.append(f"  measured on {res['folder']}, which does not hold the files the model was trained on "
                         "(fingerprint differs): photos like them stand in for them")
        if res["stale_exports"] and res["written"]:
            lines.append(f"  exported {', '.join(res['stale_exports'])} still carry the old card: export again")
        _emit(res, a.json, "\n".join(lines))
        return 0
    if a.target_fnr is None:
        raise DefectclsError("calibrate needs --target-fnr (or --photos-only)")
    if a.focus_restore is not None:
        raise DefectclsError("--focus-restore goes with --photos-only")
    _check_no_miss(a.no_miss_share, a.no_miss_min_fpr)
    res = recalibrate(a.model, a.target_fnr, a.threshold_method, data_root=a.data, write=not a.dry_run, tta=a.tta,
                      screen=a.screen, no_miss_share=a.no_miss_share, no_miss_min_fpr=a.no_miss_min_fpr,
                      refit_temperature=a.refit_temperature, tta_top=a.tta_top)
    pol, old = res["threshold_policy"], res["before"]
    lines = [f"{a.model}: threshold {old['threshold']:.6g} -> {res['threshold']:.6g} "
             f"({pol['method']}, target FNR {pol['target_fnr']}, "
             + (f"{pol['no_miss_share']:g} of the lowest validation bad score, " if "no_miss_share" in pol else "")
             + (f"lowered to reject {pol['no_miss_min_fpr']:.0%} of validation good parts, " if "floor_by" in pol else "")
             + f"guaranteed {pol['guaranteed_fnr']}, "
             + (f"95% bound {pol['fnr_upper95']:.4g}, " if "fnr_upper95" in pol else "") +
             f"{pol['n_bad_val']} bad parts in validation)" + ("" if res["written"] else "  [dry run: not written]")]
    if warning := lone_threshold_warning(pol, res["temperature"]):
        lines.append(f"  warning: {warning}")
    if tradeoff := tradeoff_text(pol):
        lines.append(f"  on validation, by FNR target: {tradeoff}")
    if res["background"] != old["background"]:
        lines.append(f"  background {res['background']} recorded: black or white corners a tool left get it "
                     "(data.restore_fill)")
    if res["tta"] != old["tta"] or res["tta_top"] != old["tta_top"] or res["temperature"] != old["temperature"]:
        lines.append(f"  test-time views {_views_text(old['tta'], old['tta_top'])} -> "
                     f"{_views_text(res['tta'], res['tta_top'])}, temperature {old['temperature']:.4g} -> "
                     f"{res['temperature']:.4g} (the policy's scale {pol.get('chosen_at_temperature', old['temperature']):.4g}); "
                     f"validation ECE {(old['metrics'] or {}).get('val', {}).get('ece', float('nan')):.4f} -> "
                     f"{res['metrics']['val']['ece']:.4f}")
    if res["screen"]:
        sc = res["screen"]
        lines.append(f"  screen: one view first; P(bad) below {sc['below']:.4g} is good at once (a fifth of the lowest of "
                     f"{sc['n_flagged_bad_val']} flagged validation bad parts, {sc['lowest_flagged_bad']:.4g}), above "
                     f"{sc['above']:.4g} bad at once (the highest of {sc['n_good_val']} validation good parts, or the "
                     f"threshold); all views for {sc['all_views_val_good']:.1%} of validation good and "
                     f"{sc['all_views_val_bad']:.1%} of bad parts")
    elif old["screen"]:
        lines.append("  screen removed (calibrate with --screen to choose one for this threshold)")
    if res["photo_range"] != old["photo_range"]:
        lines.append(f"  training photos' look recorded: {_photo_range_text(res['photo_range'])} (photo notes)")
    for name, m in res["metrics"].items():
        was = old["metrics"].get(name, {})
        lines.append(f"  {name}: FNR {was.get('fnr', float('nan')):.4f} -> {m['fnr']:.4f}   "
                     f"FPR {was.get('fpr', float('nan')):.4f} -> {m['fpr']:.4f}   (n={m['n']})")
    if res["stale_exports"] and res["written"]:
        lines.append(f"  exported {', '.join(res['stale_exports'])} still carry the old threshold: export again")
    _emit(res, a.json, "\n".join(lines))
    return 0


# ---------------------------------------------------------------- predict

def _add_predict(sub) -> None:
    p = _cmd(sub, "predict", "judge images good/bad (one line per image)",
             "defectcls predict examples/bad_blotch.png --json")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--cam-dir", help="also write a Grad-CAM overlay per image (JPEG) into this folder")
    p.add_argument("--cam-method", default="gradcam", help="gradcam, gradcam++ or eigencam")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true",
                   help="JSON lines: path, label, prob_bad, threshold, latency_ms, model_id, notes (what makes the "
                        "verdict less sure: an oval part, an outline far from round, a soft photo, a part sized past "
                        "training, no part found), held (bad whatever prob_bad says: all of those but the soft photo "
                        "and the size); or path, error")
    p.set_defaults(func=_run_predict)


def _safe_stem(path: str) -> str:
    import hashlib
    import re

    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:80] or "image"
    return f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def _run_predict(a) -> int:
    from . import data as D
    from .errors import ImageLoadError
    from .inference import Predictor

    pred = Predictor(a.model or default_model_dir(), device=a.device)
    failed = 0
    if a.cam_dir:
        from PIL import Image

        from .explain import explain, overlay

        Path(a.cam_dir).mkdir(parents=True, exist_ok=True)
    for path in a.images:
        try:
            if a.cam_dir:
                ex = explain(pred, path, a.cam_method)
                r, cam, img = ex.prediction, ex.cam, ex.image
                cam_path = Path(a.cam_dir) / f"{_safe_stem(path)}_{r.label}.jpg"
                ov = overlay(img, cam, size=min(512, max(img.shape[:2])), box=ex.box)
                Image.fromarray(ov).save(cam_path, quality=90)
            else:
                r = pred.predict(path)
        except ImageLoadError as exc:
            failed += 1
            msg = str(exc)  # names the file already when it comes from a path
            _emit({"path": path, "error": msg}, a.json, f"ERROR {msg}" if msg.startswith(str(path)) else f"{path}: ERROR {msg}")
            continue
        row = {"path": path, "label": r.label, "prob_bad": round(r.prob_bad, 6), "threshold": r.threshold,
               "latency_ms": r.latency_ms, "model_id": r.model_id, "notes": r.notes, "held": r.held}
        if a.cam_dir:
            row["cam"] = str(cam_path)
        _emit(row, a.json, D.verdict_line(path, r.label, r.prob_bad, r.threshold, r.latency_ms, r.held, r.notes,
                                          row.get("cam")))
    if failed:
        print(f"{failed} of {len(a.images)} image(s) could not be judged", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------- inspect

def _add_inspect(sub) -> None:
    p = _cmd(sub, "inspect", "factory mode: judge a folder once or keep watching it, with a visual log",
             "defectcls inspect --model models/mobilenet_v3_large_gray --input /line/cam1 --log-dir factory_log --watch\n"
             "  defectcls inspect report --log-dir factory_log")
    p.add_argument("action", nargs="?", choices=["report"], help="'report': write LOG_DIR/report.html from the log")
    p.add_argument("--model", default=None,
                   help="model directory (default: the shipped model), or an exported .onnx file (onnxruntime only)")
    p.add_argument("--input", help="folder (searched recursively) or quoted glob, e.g. 'photos/**/*.png'")
    p.add_argument("--log-dir", required=True, help="folder for log.csv, log.jsonl, overlays/ and report.html")
    p.add_argument("--watch", action="store_true", help="keep judging new files until Ctrl-C / SIGTERM")
    p.add_argument("--save-good", action="store_true", help="also write overlays for good parts")
    p.add_argument("--png", action="store_true", help="overlays as PNG instead of JPEG")
    p.add_argument("--to-review", action="store_true",
                   help="send borderline and held parts (a slanted camera, no part in sight) to the app's review queue")
    p.add_argument("--band", type=float, default=0.1, help="borderline: |P(bad) - threshold| <= BAND")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--decode", choices=["auto", "threads", "processes"], default="auto",
                   help="decode pool: processes (libspng, where installed) or threads (Pillow); auto picks")
    p.add_argument("--workers", type=int, default=None,
                   help="decoders (default: one process per CPU; threads: CPUs - model threads + 1, >= 2)")
    p.add_argument("--threads", type=int, default=None, help="model threads (default: a quarter of the CPUs, >= 1)")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between folder scans")
    p.add_argument("--settle", type=float, default=2.0,
                   help="an unreadable file is logged as an error once unchanged this many seconds")
    p.add_argument("--cam-method", default="gradcam", help="gradcam, gradcam++ or eigencam")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                   help="for a model directory: auto runs on onnxruntime on CPU (its model.onnx when current, else one "
                        "exported once into the cache; DEFECTCLS_AUTO_EXPORT=0 keeps torch), torch on CUDA")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object (no progress bar)")
    p.set_defaults(func=_run_inspect)


def _run_inspect(a) -> int:
    from .inspect import format_summary, inspect_folder, write_report

    if a.action == "report":
        path = write_report(a.log_dir, band=a.band)
        _emit({"report": str(path)}, a.json, f"wrote {path}")
        return 0
    if not a.input:
        raise DefectclsError("--input is required: a folder or a quoted glob such as 'photos/*.png'")
    s = inspect_folder(a.model or default_model_dir(), a.input, a.log_dir, save_good=a.save_good,
                       overlay_format="png" if a.png else "jpeg", to_review=a.to_review, review_band=a.band,
                       batch_size=a.batch_size, workers=a.workers, watch=a.watch, poll_s=a.poll, settle_s=a.settle,
                       progress=not a.json, handle_signals=True, cam_method=a.cam_method, device=a.device,
                       backend=a.backend, threads=a.threads, decode=a.decode)
    _emit(s, a.json, format_summary(s))
    return 0


# ---------------------------------------------------------------- review

def _add_review(sub) -> None:
    p = _cmd(sub, "review", "work with the QA review queue (see `defectcls review export --help`)",
             "defectcls review export --out labels.csv")
    rsub = p.add_subparsers(dest="review_command", required=True, metavar="ACTION")
    e = rsub.add_parser("export", help="write the latest reviewed label per image as a CSV for training",
                        description="write the latest reviewed label per image (columns path,label first) for\n"
                                    "`defectcls train --extra-labels`\n\nexample:\n"
                                    "  defectcls review export --out labels.csv\n"
                                    "  defectcls train --data data/synth --out models/retrained --extra-labels labels.csv",
                        formatter_class=_Fmt)
    e.add_argument("--out", required=True, help="CSV file to write")
    e.add_argument("--review-dir", default=None, help="review queue folder; else $DEFECTCLS_REVIEW_DIR or review_queue/")
    e.add_argument("--json", action="store_true", help="print a JSON summary")
    e.set_defaults(func=_run_review_export)


def _run_review_export(a) -> int:
    from .config import review_dir
    from .review import ReviewQueue

    root = a.review_dir or review_dir()
    if not Path(root).is_dir():
        raise DefectclsError(f"no review queue at {root} (set --review-dir or DEFECTCLS_REVIEW_DIR)")
    q = ReviewQueue(root, push_repo="")
    n = q.export_labels(a.out)
    st = q.stats()
    out = {"out": a.out, "rows": n, "pending": st["pending"], "reviewed": st["reviewed"],
           "unreadable_rows": st["unreadable_rows"], "problems": st["problems"]}
    warn = "".join(f"\n  warning: {p}" for p in st["problems"])
    _emit(out, a.json, f"wrote {n} reviewed label(s) to {a.out} ({st['pending']} image(s) still pending){warn}")
    return 0


# ---------------------------------------------------------------- bench

def _add_bench(sub) -> None:
    p = _cmd(sub, "bench", "time forward, Grad-CAM and the end-to-end request per model, against the naive pipeline",
             "defectcls bench --models mobilenet_v3_large=models/mobilenet_v3_large_gray resnet50 --json")
    p.add_argument("--models", nargs="+", metavar="NAME[=DIR]",
                   help="display name = model directory; a bare architecture name times its untrained network. "
                        "None means the shipped MobileNetV3 and models/resnet50_gray, or their untrained architectures")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--iters", type=int, default=30, help="timed runs per measurement (after warm-up)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="batch size of the throughput measurement")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per runtime; None keeps torch's and onnxruntime's own (use 1 on a busy CPU)")
    p.add_argument("--img-size", type=int, default=None, help="input size of untrained architectures; None means 224")
    p.add_argument("--no-naive", action="store_true", help="skip the naive pipeline")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_run_bench)


def _parse_models(items: list[str] | None) -> dict[str, str | None] | None:
    if not items:
        return None
    out: dict[str, str | None] = {}
    for item in items:
        name, _, path = item.partition("=")
        if not name:
            raise DefectclsError(f"--models: {item!r} is neither NAME=DIR nor an architecture name")
        out[name] = path or None
    return out


def _run_bench(a) -> int:
    from .bench import benchmark, format_table

    res = benchmark(_parse_models(a.models), device=a.device, iters=a.iters, warmup=a.warmup, batch=a.batch,
                    naive=not a.no_naive, img_size=a.img_size, threads=a.threads)
    _emit(res, a.json, format_table(res))
    return 0


# ---------------------------------------------------------------- export

def _add_export(sub) -> None:
    p = _cmd(sub, "export", "export a model to ONNX (fp32, optionally int8) with a parity check against torch",
             "defectcls export --model models/mobilenet_v3_large_gray --int8 --json")
    p.add_argument("--model", default=None, help="model directory; None means the shipped model")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx, quantized for edge CPUs")
    p.add_argument("--out", help="output folder; None means the model directory")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--n-check", type=int, default=200, help="synthetic parts in the parity check")
    p.add_argument("--n-calib", type=int, default=256, help="synthetic parts that calibrate the int8 ranges")
    p.add_argument("--json", action="store_true", help="the export report as one JSON object")
    p.set_defaults(func=_run_export)


def _run_export(a) -> int:
    from .export import export_onnx

    if a.n_check < 1 or a.n_calib < 1:
        raise DefectclsError("--n-check and --n-calib must be >= 1")
    rep = export_onnx(a.model or default_model_dir(), out=a.out, int8=a.int8, opset=a.opset, n_check=a.n_check,
                      n_calib=a.n_calib)
    lines = [f"exported {rep['model_id']} ({rep['arch']}, outputs {', '.join(rep['outputs'])}) in {rep['seconds']} s"]
    for kind, f in rep["files"].items():
        lines.append(f"  {kind}: {f['path']} ({f['size_mb']:.1f} MB)")
    p32 = rep["parity"]["fp32"]
    lines.append(f"  fp32 parity on {p32['n']} synthetic parts: max |P(bad) diff| {p32['max_prob_diff']:.1e} "
                 f"(limit {p32['tolerance']:.0e})")
    if "int8" in rep["parity"]:
        q = rep["parity"]["int8"]
        lines.append(f"  int8 ({q.get('method')}): verdicts agree {q.get('verdict_agreement', 0):.1%}, "
                     f"bad verdicts lost {q.get('missed_bad')}, max |P(bad) diff| {q.get('max_prob_diff', float('nan')):.1e}")
    _emit(rep, a.json, "\n".join(lines))
    return 0 if rep["ok"] else 1


# ---------------------------------------------------------------- evaluate --perturb, experiment

def _run_evaluate_perturb(a) -> int:
    from .perturb import GRAMMAR, GROUPS, PERTURBATIONS, evaluate_perturbed, format_table, summary, write_report

    if a.perturb_names == "list":
        groups = {g: v for g, v in GROUPS.items() if g != "all"}
        _emit({"perturbations": list(PERTURBATIONS), "groups": groups, "compose": GRAMMAR}, a.json,
              "\n".join([*PERTURBATIONS, "", "groups: " + ", ".join([*GROUPS]), f"other names: {GRAMMAR}"]))
        return 0
    res = evaluate_perturbed(a.model or default_model_dir(), a.data, split=a.split, names=a.perturb_names,
                             seed=a.perturb_seed, threshold=a.threshold, progress=not a.json)
    if a.report_dir:
        res["report_files"] = write_report(res, a.report_dir)
    _emit(summary(res), a.json, format_table(res))
    return 0


def _add_experiment(sub) -> None:
    from .experiment import DEFAULT_POLICIES, DEFAULT_SIZES, EXPERIMENTS

    p = _cmd(sub, "experiment", "reproduce a study: rgb-vs-gray, archs, cam-localization, data-size (each trains "
                                "with the recipe) or threshold (re-splits trained models' held-out photos); writes "
                                "report.md, results.json and plots",
             "defectcls experiment archs --data ../shared/data/casting/train --out reports/archs --epochs 8 --img-size 160")
    p.add_argument("name", choices=list(EXPERIMENTS), help="the experiment")
    p.add_argument("--data", required=True, help="folder with good/ and bad/ (cam-localization: also masks/)")
    p.add_argument("--out", required=True, help="report folder (gets report.md, results.json, *.png, models/)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (default: the recipe's)")
    p.add_argument("--img-size", type=int, default=None, help="override the recipe's input size")
    p.add_argument("--archs", nargs="+", default=None,
                   help="architectures (archs: the five of the study; cam-localization: mobilenet_v3_large resnet50; "
                        "rgb-vs-gray and data-size use the first, default mobilenet_v3_large)")
    p.add_argument("--arch-epochs", nargs="+", default=[], metavar="ARCH=N",
                   help="archs: epochs for one architecture, e.g. resnet50=4 (say so in the report)")
    p.add_argument("--methods", nargs="+", default=None, help="cam-localization: CAM methods (default: all)")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL_DIR",
                   help="cam-localization: score these trained models instead of training one per arch; threshold: "
                        "the trained models (DATA: the folder they were trained on)")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES), metavar="SHARE:LEAST_FPR,...",
                   help="threshold: no-miss policies to compare (--no-miss-share and --no-miss-min-fpr of train)")
    p.add_argument("--reps", type=int, default=1000, help="threshold: random re-splits per model")
    p.add_argument("--tta-top", type=int, default=None, metavar="K",
                   help="threshold: score with K of each model's test-time views counted, the most suspicious (0: "
                        "all; default: as each card says), at the card's temperatures")
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="data-size: training-set sizes, comma-separated")
    p.add_argument("--perturb-names", default=None, help="archs: comma-separated perturbations (default: all)")
    p.add_argument("--latency-iters", type=int, default=50, help="archs: timed forward passes per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="keep models in OUT/models trained earlier with the same settings")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object (training logs to stderr)")
    p.set_defaults(func=_run_experiment)


def _run_experiment(a) -> int:
    import contextlib
    import shlex

    from .experiment import EXPERIMENTS, format_summary

    arch_epochs = {}
    for item in a.arch_epochs:
        name, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise DefectclsError(f"--arch-epochs: {item!r} is not ARCH=N with N >= 1")
        arch_epochs[name] = int(n)
    if (a.epochs is not None and a.epochs < 1) or (a.img_size is not None and a.img_size < 32):
        raise DefectclsError("--epochs must be >= 1 and --img-size >= 32")
    kw = dict(epochs=a.epochs, img_size=a.img_size, seed=a.seed, progress=not a.json, reuse=a.reuse,
              command="defectcls " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["experiment"] else None)
    if a.name == "archs":
        kw.update(arch_epochs=arch_epochs, perturb_names=a.perturb_names, latency_iters=a.latency_iters,
                  **({"archs": a.archs} if a.archs else {}))
    elif a.name == "cam-localization":
        kw.update(methods=a.methods, models=a.models, **({"archs": a.archs} if a.archs else {}))
    elif a.name == "threshold":
        kw.update(models=a.models or (), policies=a.policies, reps=a.reps, tta_top=a.tta_top)
    elif a.name == "data-size":
        kw.update(sizes=a.sizes, **({"arch": a.archs[0]} if a.archs else {}))
    else:
        kw.update({"arch": a.archs[0]} if a.archs else {})
    with contextlib.redirect_stdout(sys.stderr) if a.json else contextlib.nullcontext():
        res = EXPERIMENTS[a.name](a.data, a.out, **kw)
    _emit(res, a.json, format_summary(res))
    return 0


# ---------------------------------------------------------------- copies

def _add_copies(sub) -> None:
    p = _cmd(sub, "copies", "find copies of one photo in a folder (turned, mirrored, zoomed or relit versions) and, "
                            "with --model, how many of a model's validation and test photos it saw in training",
             "defectcls copies --data ../shared/data/casting/train --model runs/my_model")
    p.add_argument("--data", required=True, help="folder with good/ and bad/")
    p.add_argument("--model", help="a model directory trained on DATA: count its held-out photos with a training copy")
    p.add_argument("--against", metavar="DIR",
                   help="a second folder with good/ and bad/ (photos to score): how many are copies of a photo of "
                        "DATA, or with --model of its training part, i.e. shots the network has seen")
    p.add_argument("--csv", help="write each photo's path, label and group number here")
    p.add_argument("--color", choices=["gray", "rgb"], default="gray")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_copies)


def _run_copies(a) -> int:
    from .copies import report, report_text

    res = report(a.data, a.model, a.color, a.workers, a.csv, progress=not a.json, against=a.against)
    _emit(res, a.json, report_text(res))
    return 0


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="defectcls", description="Good/bad visual inspection of round industrial parts.",
                                formatter_class=_Fmt)
    p.add_argument("--version", action="version", version=f"defectcls {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_train, _add_evaluate, _add_calibrate, _add_predict, _add_inspect, _add_review, _add_bench,
                _add_export, _add_experiment, _add_copies):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import tune_malloc

    tune_malloc()
    return run_parsed(build_parser().parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """Run a parsed command: DefectclsError becomes a one-line reason and exit 2, Ctrl-C exit 130."""
    try:
        return int(args.func(args) or 0)
    except DefectclsError as exc:
        print(f"defectcls {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"defectcls {args.command}: interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        return 130
