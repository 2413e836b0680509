"""`defectcls <command>`: argument parsing and output only; the library does the work."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import DefectclsError

DEFAULT_MODEL_NAME = "mobilenet_v3_large_gray"


def default_model_dir() -> str:
    from .config import models_dir

    return str(Path(models_dir()) / DEFAULT_MODEL_NAME)


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
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_synth)


def _run_synth(a) -> int:
    from .synth import generate

    if a.good < 0 or a.bad < 0 or a.size < 32:
        raise DefectclsError("--good/--bad must be >= 0 and --size >= 32")
    s = generate(a.out, n_good=a.good, n_bad=a.bad, seed=a.seed, size=a.size, masks=a.masks,
                 workers=a.workers, progress=not a.json)
    _emit(s, a.json, f"wrote {a.good} good and {a.bad} bad images ({a.size}px) to {a.out}")
    return 0


# ---------------------------------------------------------------- train

def _add_train(sub) -> None:
    from .train import TrainConfig

    d = TrainConfig(data="", out="")
    p = _cmd(sub, "train", "train a good/bad classifier on a folder with good/ and bad/",
             "defectcls train --data data/synth --arch mobilenet_v3_large --out models/my_model")
    p.add_argument("--data", required=True, help="folder with good/ and bad/ subfolders")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--arch", default=d.arch, help="mobilenet_v3_large, resnet50, resnet18, mobilenet_v2, squeezenet1_1, ...")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--img-size", type=int, default=d.img_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--color", choices=["gray", "rgb"], default=d.color)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument("--target-fnr", type=float, default=d.target_fnr, help="FNR the threshold must meet on new parts")
    p.add_argument("--threshold-method", choices=["conformal", "empirical"], default=d.threshold_method)
    p.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience in epochs")
    p.add_argument("--balance", choices=["loss", "sampler", "none"], default=d.balance,
                   help="class imbalance: weighted loss, balanced sampler, or none")
    p.add_argument("--pretrained", action="store_true", help="start from ImageNet weights (download or torch cache)")
    p.add_argument("--pretrained-file", help="start from a local state dict (safetensors or plain weights file)")
    p.add_argument("--extra-labels", help="reviewed-labels CSV (path,label) that adds or overrides labels")
    p.add_argument("--max-per-class", type=int, nargs=2, metavar=("GOOD", "BAD"),
                   help="train on a seeded subset of the training part")
    p.add_argument("--fp16-weights", action="store_true", help="store weights as float16 (half the size)")
    p.add_argument("--no-aug", action="store_true", help="switch training augmentation off")
    p.add_argument("--no-cache", action="store_true", help="do not keep decoded images on disk")
    p.add_argument("--workers", type=int, default=None, help="decode processes")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object (no progress bars)")
    p.set_defaults(func=_run_train)


def _run_train(a) -> int:
    from .augment import AugConfig
    from .train import TrainConfig, train

    cfg = TrainConfig(data=a.data, out=a.out, arch=a.arch, epochs=a.epochs, img_size=a.img_size,
                      batch_size=a.batch_size, lr=a.lr, color=a.color, seed=a.seed, device=a.device,
                      target_fnr=a.target_fnr, threshold_method=a.threshold_method, patience=a.patience,
                      balance=a.balance, pretrained=a.pretrained, pretrained_file=a.pretrained_file,
                      extra_labels=a.extra_labels, max_per_class=tuple(a.max_per_class) if a.max_per_class else None,
                      fp16_weights=a.fp16_weights, workers=a.workers, disk_cache=not a.no_cache,
                      progress=not a.json, aug=AugConfig.none() if a.no_aug else AugConfig())
    from .models import arch_spec

    arch_spec(cfg.arch)
    if not 0 <= cfg.target_fnr < 1:
        raise DefectclsError("--target-fnr must be in [0, 1)")
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
    p.add_argument("--report-dir", help="write ROC, confusion and reliability plots and metrics.json here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(a) -> int:
    from .evaluate import write_report
    from .scoring import evaluate_model

    res = evaluate_model(a.model or default_model_dir(), a.data, split=a.split, threshold=a.threshold)
    m = res["metrics"]
    if a.report_dir:
        res["report_files"] = write_report(a.report_dir, res["y_true"], res["prob_bad"], m, title=res["model_id"])
    out = {**m, "model_id": res["model_id"], "split": res["split"], "skipped": res["skipped"],
           **({"report_files": res["report_files"]} if a.report_dir else {})}
    text = (f"{res['model_id']} on {a.data} ({res['split']}, n={m['n']}): threshold {m['threshold']:.4f}\n"
            f"  FNR {m['fnr']:.4f} ({m['fn']}/{m['n_bad']} bad parts missed)   FPR {m['fpr']:.4f} "
            f"({m['fp']}/{m['n_good']} good parts rejected)\n"
            f"  precision {m['precision']:.4f} recall {m['recall']:.4f} AUROC {m['auroc']:.4f} AP {m['ap']:.4f} "
            f"ECE {m['ece']:.4f}\n  confusion [[tn fp] [fn tp]] = {m['confusion_matrix']}"
            + (f"\n  skipped {len(res['skipped'])} unreadable file(s)" if res["skipped"] else ""))
    _emit(out, a.json, text)
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
    p.add_argument("--json", action="store_true", help="JSON lines: path, label, prob_bad, latency_ms (or path, error)")
    p.set_defaults(func=_run_predict)


def _safe_stem(path: str) -> str:
    import hashlib
    import re

    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:80] or "image"
    return f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def _run_predict(a) -> int:
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
                Image.fromarray(overlay(img, cam, size=min(512, max(img.shape[:2])))).save(cam_path, quality=90)
            else:
                r = pred.predict(path)
        except ImageLoadError as exc:
            failed += 1
            _emit({"path": path, "error": str(exc)}, a.json, f"{path}: ERROR {exc}")
            continue
        row = {"path": path, "label": r.label, "prob_bad": round(r.prob_bad, 6), "threshold": r.threshold,
               "latency_ms": r.latency_ms, "model_id": r.model_id}
        if a.cam_dir:
            row["cam"] = str(cam_path)
        _emit(row, a.json, f"{path}: {r.label} (P(bad) {r.prob_bad:.4f}, threshold {r.threshold:.4f}, "
                           f"{r.latency_ms:.1f} ms)" + (f" -> {row['cam']}" if a.cam_dir else ""))
    if failed:
        print(f"{failed} of {len(a.images)} image(s) could not be judged", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="defectcls", description="Good/bad visual inspection of round industrial parts.",
                                formatter_class=_Fmt)
    p.add_argument("--version", action="version", version=f"defectcls {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_train, _add_evaluate, _add_predict):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DefectclsError as exc:
        print(f"defectcls {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"defectcls {args.command}: interrupted", file=sys.stderr)
        return 130
