"""The studies behind the product's choices, as reproducible commands.

- ``rgb-vs-gray``: the same recipe on RGB and on grayscale input; metrics and Grad-CAM side by side.
- ``archs``: several architectures under the same recipe: FNR, FPR, AUROC, robustness (worst
  FNR/FPR over ``perturb.LINE``), size on disk, CPU (and CUDA) latency; sorted by the
  metric priority FNR, then FPR, then latency, then size.
- ``cam-localization``: on synthetic bad parts with defect masks, how often the heat-map peak
  falls inside the (slightly dilated) defect (pointing game), per architecture and CAM method.
- ``data-size``: the recipe on seeded training subsets of growing size (the seed regime's
  good/bad ratio); FNR/FPR against training-set size.
- ``threshold``: no training; trained models' validation and test parts pooled and split again at
  random many times, each no-miss threshold policy (share of the lowest validation bad score, least
  FPR of good parts) chosen on each new validation half: how often the test half has a missed part,
  and the false alarms it costs.

Every experiment trains with THE recipe (``TrainConfig`` defaults; ``epochs`` / ``img_size``
override it for cheaper runs and are recorded), writes its models to REPORT_DIR/models/<name>/
and scores each on its own held-out test part. It writes REPORT_DIR/report.md (tables and
plots), REPORT_DIR/results.json and the plots as PNG.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import data as D
from .config import no_miss_problem
from .errors import DefectclsError

DEFAULT_ARCHS = ("resnet50", "mobilenet_v3_large", "resnet18", "mobilenet_v2", "squeezenet1_1")
CAM_ARCHS = ("mobilenet_v3_large", "resnet50")
DEFAULT_SIZES = ("100", "350", "1350", "full")
SEED_GOOD_SHARE = 1000 / 1350          # the seed regime: 1000 good / 350 bad
SHOW_SIZE = 192                          # side of the heat-map samples drawn in reports
METRIC_KEYS = ("fnr", "fpr", "auroc", "ece", "fn", "n_bad", "fp", "n_good", "threshold", "fpr_at_no_miss",
               "missed_shots", "bad_shots", "rejected_shots", "good_shots")
# settings that make two training runs the same run (for --reuse)
_SAME_RUN = ("data", "arch", "epochs", "img_size", "batch_size", "lr", "weight_decay", "color", "seed", "target_fnr",
             "threshold_method", "patience", "split", "balance", "pretrained", "max_per_class", "folds", "aug",
             "input_norm", "pool", "ema", "epoch_size", "hard_share", "rank_weight", "rank_k", "frame", "focus_restore", "masks",
             "mask_weight", "extra_labels", "init", "group_copies", "mixed", "split_seed")


# ---------------------------------------------------------------- shared helpers

def machine_info() -> dict:
    """Where the numbers come from: CPU, threads, GPU, library versions, date."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _norm(obj):
    return json.loads(json.dumps(obj))


def train_model(data: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0, epochs: int | None = None,
                img_size: int | None = None, progress: bool = False, reuse: bool = False, **overrides) -> dict:
    """Train THE recipe (``TrainConfig`` defaults plus OVERRIDES) into OUT; returns the card as a dict.

    With REUSE, an existing model directory trained with the same settings on the same data is kept;
    when only its test-time views (or how many of them count) differ from the recipe's, it is recalibrated with them
    (``scoring.recalibrate``: the views are not part of training).
    """
    from .models import read_card
    from .train import TrainConfig, epoch_samples, resolve_config, train

    cfg = TrainConfig(data=str(data), out=str(out), seed=seed, progress=progress, **overrides)
    if epochs:
        cfg.epochs = epochs
    if img_size:
        cfg.img_size = img_size
    resolved = resolve_config(cfg)
    want = {k: v for k, v in _norm(resolved.to_dict()).items() if k in _SAME_RUN}
    want["data"] = os.path.realpath(want["data"])
    card = read_card(out) if reuse and (Path(out) / "card.json").is_file() else None
    if card is not None and (card.train or {}).get("stopped") != "interrupted":   # an interrupted run: train again
        have = {k: v for k, v in (card.train or {}).get("config", {}).items() if k in _SAME_RUN}
        have["data"] = os.path.realpath(have.get("data", ""))
        have["input_norm"] = card.input_norm
        have["pool"] = card.pool
        # cards from before an option were trained as it is off (before --epoch-size an epoch was one pass;
        # before the focus restore soft photos were judged as they came)
        # (before --group-copies the split went photo by photo; before --mixed a shot's good and bad copies were
        # dealt apart, a split no flag of today makes: such a card is never the same run)
        for key, off in (("hard_share", 0.0), ("ema", 0.0), ("rank_weight", 0.0), ("rank_k", 1), ("epoch_size", 0),
                         ("focus_restore", False), ("frame", "full"), ("masks", None), ("extra_labels", None), ("init", None),
                         ("group_copies", False), ("mixed", "split before --mixed"), ("split_seed", None)):
            have.setdefault(key, off)
        for d in (have, want):   # no split seed: the seed's split
            d["split_seed"] = d.get("seed") if d["split_seed"] is None else d["split_seed"]
        if not have["masks"]:
            have["mask_weight"] = want["mask_weight"]   # the weight of a mask loss that was not there
        # a card from before held photos (``data.photo_check``) chose its epoch and threshold counting them
        have["holds"], want["holds"] = "held_bad_val" in (card.threshold_policy or {}), True
        n_train = (card.train or {}).get("n", {}).get("train", 0)
        if epoch_samples(n_train, have["epoch_size"]) == epoch_samples(n_train, want["epoch_size"]):
            have["epoch_size"] = want["epoch_size"]   # the same epochs (a set larger than either size)
        if have == want:
            pol = card.threshold_policy or {}
            # a no-miss threshold chosen before today's policy (half the lowest validation bad score until the share,
            # no floor of good parts until it): chosen again, like the views, as it is not part of training
            no_miss = "no_miss_share" in pol or (pol.get("target_fnr") == 0 and pol.get("method") == "conformal")
            old_policy = no_miss and (
                pol.get("no_miss_share", 0.5), pol.get("no_miss_min_fpr", 0.0)) != (cfg.no_miss_share, cfg.no_miss_min_fpr)
            if (card.tta, card.tta_top) != (cfg.tta, resolved.tta_top) or old_policy:
                from .scoring import recalibrate

                recalibrate(out, cfg.target_fnr, cfg.threshold_method, data_root=data, tta=cfg.tta,
                            no_miss_share=cfg.no_miss_share, no_miss_min_fpr=cfg.no_miss_min_fpr, tta_top=cfg.tta_top)
                return read_card(out).to_dict()
            return card.to_dict()
    train(cfg)
    return read_card(out).to_dict()


def _test_metrics(card: dict) -> dict:
    m = card.get("metrics") or {}
    part = m.get("test") or m.get("val") or m.get("oof") or {}
    return {k: part.get(k) for k in METRIC_KEYS}


def time_forward(model_dir: str | os.PathLike, device: str = "cpu", iters: int = 50, warmup: int = 10,
                 batch: int = 1) -> dict:
    """Latency of the torch forward pass (batch BATCH) on DEVICE: warm-up, perf_counter, median and p95.

    CUDA is synchronised by the copy of the logits to the host inside ``Predictor.logits``.
    """
    import torch

    from .inference import Predictor

    pred = Predictor(model_dir, device=device, backend="torch")
    c = pred.card
    x = np.random.default_rng(0).standard_normal((batch, c.in_chans, c.img_size, c.img_size)).astype(np.float32)
    for _ in range(warmup):
        pred.logits(x)
    ms = []
    for _ in range(iters):
        t0 = time.perf_counter()
        pred.logits(x)
        ms.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": round(float(np.median(ms)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "iters": iters, "batch": batch, "device": str(pred.device),
            "threads": torch.get_num_threads() if pred.device.type == "cpu" else None}


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _num(v, digits: int = 1) -> str:
    """Sizes, times and latencies: fewer decimals than rates."""
    return _fmt(None if v is None else float(v), digits)


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table; floats with 4 decimals (rates), None/NaN as n/a; pass strings for other formats."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def _write_report(out: Path, title: str, results: dict, body: list[str], command: str | None) -> list[str]:
    from .evaluate import to_json

    m = results["machine"]
    head = [f"# {title}", "",
            f"- command: `{command}`" if command else "- command: (library call)",
            f"- data: `{results['data']}`",
            f"- machine: {m['cpu']} ({m['cpu_count']} CPUs, torch threads {m['torch_threads']}), "
            f"GPU {m['cuda'] or 'none'}, torch {m['torch']}",
            f"- date: {m['date']}; duration {results['seconds']:.0f} s", ""]
    (out / "report.md").write_text("\n".join(head + body) + "\n", encoding="utf-8")
    (out / "results.json").write_text(to_json(results) + "\n", encoding="utf-8")
    return [str(out / "report.md"), str(out / "results.json")]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _start(data, out) -> tuple[Path, float]:
    D.scan_folder(data)  # fail early with the folder's own error
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out, time.perf_counter()


def _recipe(epochs: int | None, img_size: int | None) -> dict:
    from .train import TrainConfig

    d = TrainConfig(data="", out="")
    return {"epochs": epochs or d.epochs, "img_size": img_size or d.img_size}


# ---------------------------------------------------------------- rgb-vs-gray

def run_rgb_vs_gray(data: str | os.PathLike, out: str | os.PathLike, arch: str = "mobilenet_v3_large",
                    epochs: int | None = None, img_size: int | None = None, seed: int = 0, n_cam: int = 6,
                    progress: bool = False, reuse: bool = False, command: str | None = None) -> dict:
    """The same recipe on RGB and grayscale input: test metrics and Grad-CAM samples side by side."""
    from .explain import explain, overlay
    from .inference import Predictor
    from .scoring import select_split

    out, t0 = _start(data, out)
    rows, preds = [], {}
    for color in ("rgb", "gray"):
        mdir = out / "models" / f"{arch}_{color}"
        card = train_model(data, mdir, seed=seed, epochs=epochs, img_size=img_size, progress=progress, reuse=reuse,
                           arch=arch, color=color)
        rows.append({"color": color, "model_dir": str(mdir), **_test_metrics(card),
                     "train_s": card["train"].get("duration_s")})
        preds[color] = Predictor(mdir, backend="torch")
    test, _ = select_split(out / "models" / f"{arch}_gray", data, D.scan_folder(data), "auto")
    n_bad = min(len([s for s in test if s.label == 1]), max(1, math.ceil(n_cam * 2 / 3)))
    picks = [s for s in test if s.label == 1][:n_bad] + [s for s in test if s.label == 0][:max(0, n_cam - n_bad)]
    cams = []
    plt = _plt()
    fig, axes = plt.subplots(len(picks), 3, figsize=(9, 3 * len(picks)), squeeze=False)
    for r, s in enumerate(picks):
        axes[r, 0].imshow(D.load_image(s.path, "rgb"))
        axes[r, 0].set_title(f"{Path(s.path).name} ({D.LABELS[s.label]})", fontsize=8)
        row = {"path": s.path, "label": D.LABELS[s.label]}
        for col, color in enumerate(("rgb", "gray"), start=1):
            ex = explain(preds[color], s.path, "gradcam")
            axes[r, col].imshow(overlay(ex.image, ex.cam, size=256, box=ex.box))
            axes[r, col].set_title(f"{color}: P(bad) {ex.prediction.prob_bad:.3f} -> {ex.prediction.label}", fontsize=8)
            row[color] = {"prob_bad": ex.prediction.prob_bad, "label": ex.prediction.label}
        cams.append(row)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "cams.png", dpi=90)
    plt.close(fig)
    res = {"experiment": "rgb-vs-gray", "data": str(data), "arch": arch, "seed": seed, **_recipe(epochs, img_size),
           "rows": rows, "cam_samples": cams, "machine": machine_info(), "seconds": time.perf_counter() - t0}
    body = [f"{arch}, {res['epochs']} epochs, {res['img_size']} px, seed {seed}; metrics on the models' "
            "shared held-out test part at each card's threshold.", "",
            md_table(["input", "FNR", "missed", "FPR", "rejected", "AUROC", "ECE", "threshold", "train s"],
                     [[r["color"], r["fnr"], f"{r['fn']}/{r['n_bad']}", r["fpr"], f"{r['fp']}/{r['n_good']}",
                       r["auroc"], r["ece"], r["threshold"], _num(r["train_s"], 0)] for r in rows]),
            "", "Grad-CAM (evidence for 'bad') of each model on the same held-out photos:", "",
            "![Grad-CAM: input, RGB model, gray model](cams.png)"]
    res["files"] = _write_report(out, "RGB vs grayscale input", res, body, command) + [str(out / "cams.png")]
    return res


# ---------------------------------------------------------------- archs

def _sort_key(r: dict) -> tuple:
    inf = lambda v: math.inf if v is None or not math.isfinite(v) else v  # noqa: E731
    return (inf(r["fnr"]), inf(r["fpr"]), inf((r.get("cpu") or {}).get("p50_ms")), inf(r["size_mb"]))


def run_archs(data: str | os.PathLike, out: str | os.PathLike, archs: Sequence[str] = DEFAULT_ARCHS,
              epochs: int | None = None, img_size: int | None = None, seed: int = 0,
              arch_epochs: dict[str, int] | None = None, perturb_names: Sequence[str] | str | None = None,
              latency_iters: int = 50, progress: bool = False, reuse: bool = False, command: str | None = None) -> dict:
    """Each architecture under the same recipe: quality, robustness, size and latency, sorted by the metric priority."""
    import torch

    from .models import arch_spec, count_params, load_model_dir
    from .perturb import evaluate_perturbed, resolve_names, worst_name
    from .perturb import write_report as write_perturb

    for a in archs:
        arch_spec(a)
    resolve_names(perturb_names)
    out, t0 = _start(data, out)
    arch_epochs = arch_epochs or {}
    rows = []
    for arch in archs:
        mdir = out / "models" / arch
        ep = arch_epochs.get(arch, epochs)
        card = train_model(data, mdir, seed=seed, epochs=ep, img_size=img_size, progress=progress, reuse=reuse, arch=arch)
        rob = evaluate_perturbed(mdir, data, names=perturb_names, seed=seed, progress=progress)
        write_perturb(rob, out / "perturb" / arch)
        model, _ = load_model_dir(mdir)
        row = {"arch": arch, "model_dir": str(mdir), "epochs": card["train"]["config"]["epochs"], **_test_metrics(card),
               "worst_fnr": rob["worst"]["fnr"]["value"], "worst_fnr_under": worst_name(rob["worst"]["fnr"]),
               "worst_fpr": rob["worst"]["fpr"]["value"], "worst_fpr_under": worst_name(rob["worst"]["fpr"]),
               "size_mb": round((mdir / "model.safetensors").stat().st_size / 1e6, 2),
               "params_m": round(count_params(model) / 1e6, 2), "train_s": card["train"].get("duration_s"),
               "cpu": time_forward(mdir, "cpu", iters=latency_iters, warmup=max(1, latency_iters // 5)),
               "cuda": time_forward(mdir, "cuda", iters=latency_iters, warmup=max(1, latency_iters // 5))
               if torch.cuda.is_available() else None}
        rows.append(row)
        # each architecture's row as soon as it exists: a long run stopped part-way keeps what it measured
        (out / "rows.partial.json").write_text(json.dumps(_norm(rows), indent=1) + "\n", encoding="utf-8")
    rows.sort(key=_sort_key)
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = np.arange(len(rows))
    for off, key, label in ((-0.3, "fnr", "FNR clean"), (-0.1, "worst_fnr", "FNR worst perturbation"),
                            (0.1, "fpr", "FPR clean"), (0.3, "worst_fpr", "FPR worst perturbation")):
        a1.bar(xs + off, [r[key] if r[key] is not None and math.isfinite(r[key]) else 0 for r in rows], 0.2, label=label)
    a1.set_xticks(xs, [r["arch"] for r in rows], rotation=20)
    a1.set(ylabel="rate", title="quality (held-out test part)")
    a1.legend(fontsize=8)
    for r in rows:
        a2.scatter(r["cpu"]["p50_ms"], r["size_mb"])
        a2.annotate(r["arch"], (r["cpu"]["p50_ms"], r["size_mb"]), fontsize=8)
    a2.set(xlabel="CPU latency, batch 1, median (ms)", ylabel="size on disk (MB)", title="cost")
    fig.tight_layout()
    fig.savefig(out / "archs.png", dpi=90)
    plt.close(fig)
    res = {"experiment": "archs", "data": str(data), "seed": seed, **_recipe(epochs, img_size),
           "arch_epochs": arch_epochs, "rows": rows, "machine": machine_info(), "seconds": time.perf_counter() - t0}
    cuda = any(r["cuda"] for r in rows)
    table = md_table(
        ["rank", "arch", "epochs", "FNR", "FPR", "AUROC", "worst FNR (under)", "worst FPR (under)", "size MB", "params M",
         "CPU ms p50", *(["CUDA ms p50"] if cuda else []), "train s"],
        [[i + 1, r["arch"], r["epochs"], r["fnr"], r["fpr"], r["auroc"], f"{_fmt(r['worst_fnr'])} ({r['worst_fnr_under']})",
          f"{_fmt(r['worst_fpr'])} ({r['worst_fpr_under']})", _num(r["size_mb"]), _num(r["params_m"], 2),
          _num(r["cpu"]["p50_ms"], 2), *([_num(r["cuda"]["p50_ms"] if r["cuda"] else None, 2)] if cuda else []),
          _num(r["train_s"], 0)] for i, r in enumerate(rows)])
    body = [f"{res['epochs']} epochs (per-architecture: {arch_epochs or 'none'}), {res['img_size']} px, seed {seed}. "
            "Sorted by FNR, then FPR, then CPU latency, then size. Quality on each model's held-out test part at its "
            "card's threshold; worst = the highest rate over the perturbations of `defectcls evaluate --perturb` "
            "(tables in perturb/<arch>/perturb.md). Latency: torch eager forward pass, batch 1, after warm-up, "
            f"median of {latency_iters}, on {machine_info()['cpu']}"
            + (f" and {machine_info()['cuda']}" if cuda else " (no GPU here)") + ". Size: model.safetensors (fp32).", "",
            table, "", "![quality and cost per architecture](archs.png)"]
    res["files"] = _write_report(out, "Architectures", res, body, command) + [str(out / "archs.png")]
    return res


# ---------------------------------------------------------------- cam-localization

def pointing_hit(cam: np.ndarray, mask: np.ndarray) -> bool:
    """True when the heat-map's maximum lies inside MASK (same shape); a flat map never hits."""
    if float(cam.max()) <= float(cam.min()):
        return False
    return bool(mask[np.unravel_index(int(np.argmax(cam)), cam.shape)])


def mask_at(mask_path: str | os.PathLike, size: int, dilate: float, box: tuple[int, int, int] | None = None) -> np.ndarray:
    """A defect mask at the model's input size, dilated by DILATE x size pixels: the image's own fit_square,
    or, for a model that frames on the part, its square BOX of the image (``Preprocessing.box``)."""
    from scipy.ndimage import binary_dilation

    m = D.load_image(mask_path, "gray")
    m = D.fit_square(m if box is None else D.crop_square(m, box), size) > 0
    r = max(1, round(dilate * size))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return binary_dilation(m, structure=(xx ** 2 + yy ** 2) <= r * r)


def run_cam_localization(data: str | os.PathLike, out: str | os.PathLike, archs: Sequence[str] = CAM_ARCHS,
                         methods: Sequence[str] | None = None, epochs: int | None = None, img_size: int | None = None,
                         seed: int = 0, dilate: float = 0.03, split: str = "auto", n_show: int = 3,
                         progress: bool = False, reuse: bool = False, command: str | None = None,
                         models: Sequence[str | os.PathLike] | None = None) -> dict:
    """Pointing game on bad parts with defect masks (DATA/masks/<name>, from ``defectcls synth --masks``).

    MODELS: trained model directories to score instead of training one per arch (e.g. the shipped
    model on freshly generated parts); each is named by its card's arch.
    """
    from PIL import Image

    from .explain import CAM_METHODS, explain, overlay
    from .inference import Predictor
    from .models import arch_spec, read_card
    from .scoring import select_split

    methods = list(methods or CAM_METHODS)
    bad_methods = [m for m in methods if m not in CAM_METHODS]
    if bad_methods:
        raise DefectclsError(f"unknown CAM method(s) {', '.join(bad_methods)}; choose from {', '.join(CAM_METHODS)}")
    for a in archs:
        arch_spec(a)
    mask_dir = Path(data) / "masks"
    if not mask_dir.is_dir():
        raise DefectclsError(f"{data} has no masks/ folder: make the data with `defectcls synth --masks`")
    given = [Path(m) for m in models or []]
    for m in given:
        if not (m / "card.json").is_file():
            raise DefectclsError(f"--models: {m} is not a model directory (no card.json)")
    out, t0 = _start(data, out)
    rows, shown = [], []
    # who: how plots and tables name a model (given models may share an architecture)
    todo = [(read_card(m).arch, m, str(m)) for m in given] if given else \
        [(arch, out / "models" / arch, arch) for arch in archs]
    for arch, mdir, who in todo:
        if not given:
            train_model(data, mdir, seed=seed, epochs=epochs, img_size=img_size, progress=progress, reuse=reuse,
                        arch=arch)
        pred = Predictor(mdir, backend="torch")
        size = pred.card.img_size
        chosen, used = select_split(mdir, data, D.scan_folder(data), split)
        bad = [(s, mask_dir / Path(s.path).name) for s in chosen if s.label == 1]
        bad = [(s, m) for s, m in bad if m.is_file()]
        if not bad:
            raise DefectclsError(f"no bad image of the {used} part has a mask in {mask_dir}")
        stats = {m: {"hits": 0, "hits_detected": 0, "detected": 0} for m in methods}
        offsets: dict[str, list[float]] = {}
        chance = []
        for j, (s, mpath) in enumerate(bad):
            img = pred.load(s.path)
            mask = None
            for method in methods:
                ex = explain(pred, img, method)
                if mask is None:   # over the square the model saw (``Preprocessing.box``), found once by explain
                    mask = mask_at(mpath, size, dilate, ex.box)
                    chance.append(float(mask.mean()))
                offsets[method] = list(ex.cam_offset)
                hit = pointing_hit(ex.cam, mask)
                st = stats[method]
                st["hits"] += hit
                if ex.prediction.label == "bad":
                    st["detected"] += 1
                    st["hits_detected"] += hit
                if j < n_show:   # drawn over the square the model saw, where the mask outline is
                    seen = ex.image if ex.box is None else D.crop_square(ex.image, ex.box)
                    shown.append({"who": who, "method": method, "j": j, "mask": mask, "hit": hit,
                                  "overlay": overlay(seen, ex.cam, size=max(size, SHOW_SIZE)), "name": Path(s.path).name})
        for method in methods:
            st = stats[method]
            rows.append({"arch": arch, "model": str(mdir), "method": method, "split": used, "n": len(bad), "hits": st["hits"],
                         "rate": st["hits"] / len(bad), "detected": st["detected"],
                         "rate_detected": st["hits_detected"] / st["detected"] if st["detected"] else None,
                         "chance": float(np.mean(chance)), "cam_offset": offsets[method]})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["rate"] for r in rows])
    ax.plot(range(len(rows)), [r["chance"] for r in rows], "k_", markersize=20, label="chance (dilated mask area)")
    ax.set_xticks(range(len(rows)), [f"{r['model'] if given else r['arch']}\n{r['method']}" for r in rows], fontsize=7)
    ax.set(ylim=(0, 1), ylabel="share of heat-map peaks inside the defect", title="pointing game")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pointing.png", dpi=90)
    plt.close(fig)
    keys = list(dict.fromkeys((d["who"], d["j"]) for d in shown))
    fig, axes = plt.subplots(len(keys), len(methods), figsize=(3 * len(methods), 3 * len(keys)), squeeze=False)
    for d in shown:
        ax = axes[keys.index((d["who"], d["j"])), methods.index(d["method"])]
        ax.imshow(d["overlay"])
        h, w = d["overlay"].shape[:2]
        if h == w:
            big = np.asarray(Image.fromarray(d["mask"].astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST))
            ax.contour(big > 127, levels=[0.5], colors="white", linewidths=0.8)
        ax.set_title(f"{d['who']} {d['method']}: {'hit' if d['hit'] else 'miss'}\n{d['name']}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=90)
    plt.close(fig)
    res = {"experiment": "cam-localization", "data": str(data), "seed": seed, "dilate": dilate, "methods": methods,
           **_recipe(epochs, img_size), "rows": rows, "machine": machine_info(), "seconds": time.perf_counter() - t0}
    if given:
        res.update(epochs=None, img_size=None, models=[str(m) for m in given])
    trained = (f"{res['epochs']} epochs, {res['img_size']} px, seed {seed}." if not given else
               "Given models: " + ", ".join(f"`{m}`" for m in given) + ".")
    which = "Every bad part of DATA" if rows[0]["split"] == "all" else f"Bad parts of each model's {rows[0]['split']} part"
    body = [f"{trained} {which} "
            f"with a defect mask; a hit is a heat-map maximum (at the model's input size) inside the mask dilated "
            f"by {dilate:.0%} of the side. 'chance' is the mean dilated mask area (a random point's hit rate); "
            "'among detected' counts only parts the model called bad.", "",
            md_table((["model"] if given else []) +
                     ["arch", "method", "bad parts", "hits", "pointing rate", "among detected", "detected", "chance"],
                     [([r["model"]] if given else []) +
                      [r["arch"], r["method"], r["n"], r["hits"], r["rate"], r["rate_detected"], r["detected"], r["chance"]]
                      for r in rows]),
            "", "![pointing game](pointing.png)", "", "![samples: heat-maps with the defect outline](samples.png)"]
    res["files"] = _write_report(out, "CAM localisation (pointing game)", res, body, command) + \
        [str(out / "pointing.png"), str(out / "samples.png")]
    return res


# ---------------------------------------------------------------- data-size

def parse_sizes(sizes: Sequence[str] | str) -> list[str]:
    """'100,350,1350,full' -> ['100', '350', '1350', 'full'] (checked)."""
    items = [s.strip() for s in (sizes.split(",") if isinstance(sizes, str) else sizes) if str(s).strip()]
    for s in items:
        if s != "full" and (not s.isdigit() or int(s) < 4):
            raise DefectclsError(f"--sizes: {s!r} is neither 'full' nor a training-set size >= 4")
    if not items:
        raise DefectclsError("--sizes: give at least one size")
    return items


def caps_for(size: str, good_share: float = SEED_GOOD_SHARE) -> tuple[int, int] | None:
    """(good, bad) caps of a training-set SIZE at the seed regime's ratio; None for 'full'."""
    if size == "full":
        return None
    n = int(size)
    good = min(n - 1, max(1, round(n * good_share)))
    return good, n - good


def _val_fpr_at(card: dict, target: float) -> float | None:
    """The validation FPR the card's policy gives at TARGET FNR (its ``tradeoff``; None on cards without one)."""
    return next((r["val_fpr"] for r in (card.get("threshold_policy") or {}).get("tradeoff", [])
                 if r["target_fnr"] == target), None)


def run_data_size(data: str | os.PathLike, out: str | os.PathLike, sizes: Sequence[str] | str = DEFAULT_SIZES,
                  arch: str = "mobilenet_v3_large", good_share: float = SEED_GOOD_SHARE, epochs: int | None = None,
                  img_size: int | None = None, seed: int = 0, progress: bool = False, reuse: bool = False,
                  command: str | None = None) -> dict:
    """The recipe on seeded training subsets (good:bad as in the seed regime); test FNR/FPR against size."""
    from .evaluate import count_text

    sizes = parse_sizes(sizes)
    out, t0 = _start(data, out)
    rows = []
    for size in sizes:
        mdir = out / "models" / f"n{size}"
        caps = caps_for(size, good_share)
        card = train_model(data, mdir, seed=seed, epochs=epochs, img_size=img_size, progress=progress, reuse=reuse,
                           arch=arch, max_per_class=caps)
        split = json.loads((mdir / "split.json").read_text())
        y = [lab for _, lab in split["train"]]
        rows.append({"size": size, "n_train": len(y), "n_good": y.count(0), "n_bad": y.count(1),
                     "model_dir": str(mdir), **{f"test_{k}": v for k, v in _test_metrics(card).items()},
                     "fnr_upper95": (card["metrics"].get("test") or {}).get("fnr_upper95"),
                     "val_fpr_at_fnr_1pct": _val_fpr_at(card, 0.01),
                     "train_s": card["train"].get("duration_s")})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    n = [r["n_train"] for r in rows]
    ax.plot(n, [r["test_fnr"] for r in rows], "o-", label="FNR (bad parts missed)")
    ax.plot(n, [r["test_fpr"] for r in rows], "s-", label="FPR (good parts rejected)")
    floor = [r["test_fpr_at_no_miss"] for r in rows]
    if any(f is not None for f in floor):
        ax.plot(n, [np.nan if f is None else f for f in floor], "s--", color="C1", alpha=0.5,
                label="FPR at no miss (the ranking's floor)")
    ax.axhline(0.01, color="C0", ls=":", lw=1, label="FNR target 1%")
    ax.axhline(0.02, color="C1", ls=":", lw=1, label="FPR target 2%")
    ax.set(xscale="log", xlabel="training images", ylabel="rate on the held-out test part", title=f"{arch}: data size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "data_size.png", dpi=90)
    plt.close(fig)
    res = {"experiment": "data-size", "data": str(data), "arch": arch, "seed": seed, "good_share": good_share,
           **_recipe(epochs, img_size), "rows": rows, "machine": machine_info(), "seconds": time.perf_counter() - t0}
    body = [f"{arch}, {res['epochs']} epochs, {res['img_size']} px, seed {seed}. Each size is a seeded subset of the "
            f"training part with {good_share:.1%} good parts (the seed regime: 1000 good / 350 bad); validation and test "
            "parts are the full seeded 15%/15% parts, the same for every size.", "",
            md_table(["size", "train good", "train bad", "FNR", "missed", "FNR 95% upper", "FPR", "rejected", "AUROC",
                      "threshold", "FPR at no miss", "val FPR at target FNR 1%", "train s"],
                     [[r["size"], r["n_good"], r["n_bad"], r["test_fnr"],
                       count_text(r["test_fn"], r["test_n_bad"], r["test_missed_shots"], r["test_bad_shots"]),
                       r["fnr_upper95"], r["test_fpr"],
                       count_text(r["test_fp"], r["test_n_good"], r["test_rejected_shots"], r["test_good_shots"]),
                       r["test_auroc"],
                       r["test_threshold"], r["test_fpr_at_no_miss"], r["val_fpr_at_fnr_1pct"],
                       _num(r["train_s"], 0)] for r in rows]),
            "", "FNR and FPR are the test part's at the card's threshold (its target, by default no miss), missed and "
            "rejected also counted by shot where the split kept copies of one photo together; the "
            "validation FPR at target FNR 1% is what the same policy would cost with a 1% target "
            "(`threshold_policy.tradeoff`; n/a on cards from before it). FPR at no miss is the test part's FPR at the "
            "best threshold that misses none of its bad parts, chosen on those photos themselves: the least any "
            "no-miss policy could reject with this network (n/a on cards from before it).",
            "", "![FNR and FPR against training-set size](data_size.png)"]
    res["files"] = _write_report(out, "Training-set size (seed regime)", res, body, command) + [str(out / "data_size.png")]
    return res


# ---------------------------------------------------------------- threshold (re-splits)

DEFAULT_POLICIES = ("0.5:0", "0.25:0", "0.25:0.08")


def parse_policies(policies: Sequence[str] | str) -> list[tuple[float, float]]:
    """'SHARE:LEAST_FPR' items (comma-separated or a list): the no-miss threshold policies to compare."""
    items = policies.split(",") if isinstance(policies, str) else list(policies)
    out = []
    for item in (x.strip() for x in items):
        share, _, least = item.partition(":")
        try:
            pol = (float(share), float(least or 0))
        except ValueError:
            raise DefectclsError(f"--policies: {item!r} is not SHARE:LEAST_FPR, e.g. 0.25:0.08") from None
        if problem := no_miss_problem(*pol, names=("the share", "the least FPR")):
            raise DefectclsError(f"--policies: {item!r}: {problem}")
        out.append(pol)
    if not out:
        raise DefectclsError("--policies: none given")
    return out


def resplit_policy(y: np.ndarray, p: np.ndarray, held: np.ndarray, part: np.ndarray, share: float, least_fpr: float,
                   reps: int, seed: int = 0, groups: np.ndarray | None = None) -> dict:
    """One no-miss policy (``evaluate.choose_threshold`` with target 0, NO_MISS_SHARE = SHARE, NO_MISS_MIN_FPR =
    LEAST_FPR) on one model's held-out photos: Y labels, P its P(bad), HELD photos judged bad whatever P, PART 0 for
    validation and 1 for test. The model's own split, then REPS random splits of the pooled photos into a validation
    and a test half of the same sizes per class (the two parts are exchangeable: neither trained the network). Each
    time the threshold is chosen on the validation half and applied to the test half. GROUPS (copies of one photo
    share a number, as the model's split kept them: ``copies.copy_groups``): each group goes to one half whole,
    the halves' sizes per class then within about a group of the model's own."""
    from .evaluate import _choose_threshold

    rng = np.random.default_rng(seed)
    ib, ig = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    nbv, ngv = int(np.sum(part[ib] == 0)), int(np.sum(part[ig] == 0))
    missed, fpr = [], []
    for r in range(reps + 1):
        if r == 0:
            vb, tb, vg, tg = ib[part[ib] == 0], ib[part[ib] == 1], ig[part[ig] == 0], ig[part[ig] == 1]
        elif groups is not None:
            n_val = nbv + ngv
            halves = D.stratified_split(y, (0.0, n_val / len(y), 1 - n_val / len(y)), int(rng.integers(2**31)), groups)
            v_idx, t_idx = np.array(halves["val"], int), np.array(halves["test"], int)
            vb, vg, tb, tg = v_idx[y[v_idx] == 1], v_idx[y[v_idx] == 0], t_idx[y[t_idx] == 1], t_idx[y[t_idx] == 0]
        else:
            pb, pg = rng.permutation(ib), rng.permutation(ig)
            vb, tb, vg, tg = pb[:nbv], pb[nbv:], pg[:ngv], pg[ngv:]
        v = np.concatenate([vb, vg])
        t = _choose_threshold(y[v], p[v], 0.0, "conformal", held=held[v], no_miss_share=share,
                              no_miss_min_fpr=least_fpr, groups=None if groups is None else groups[v])["threshold"]
        missed.append(int(np.sum((p[tb] < t) & ~held[tb])))
        fpr.append(float(np.mean((p[tg] >= t) | held[tg])) if len(tg) else float("nan"))
    m, f = np.array(missed[1:]), np.array(fpr[1:])
    return {"share": share, "least_fpr": least_fpr, "own_missed": missed[0], "own_fpr": fpr[0],
            "p_miss": float(np.mean(m > 0)) if reps else None, "mean_missed": float(m.mean()) if reps else None,
            "mean_fpr": float(f.mean()) if reps else None,
            "fpr_p90": float(np.quantile(f, 0.9)) if reps else None}


def run_threshold(data: str | os.PathLike, out: str | os.PathLike, models: Sequence[str | os.PathLike] = (),
                  policies: Sequence[str] | str = DEFAULT_POLICIES, reps: int = 1000, seed: int = 0,
                  progress: bool = False, reuse: bool = False, command: str | None = None, tta_top: int | None = None,
                  **_recipe_args) -> dict:
    """No-miss threshold policies judged by re-splits of trained MODELS' held-out photos (``resplit_policy``).
    DATA: the folder the models were trained on (their split.json names its parts). Each model's validation and
    test scores (its card's views and temperature) are kept in OUT/scores/<name>.csv; REUSE reads them back when
    the same weights, temperature and views scored them. TTA_TOP: score with that many of each card's views counted
    (``models.top_views``; 0: all; None: as the card says), at the card's temperatures."""
    from .copies import split_groups
    from .evaluate import at_temperature, policy_temperature
    from .inference import Predictor
    from .models import model_id, read_card, with_views
    from .scoring import evaluate_model

    if _recipe_args.get("epochs") is not None or _recipe_args.get("img_size") is not None:
        raise DefectclsError("threshold trains nothing: drop --epochs and --img-size")
    if not models:
        raise DefectclsError("threshold needs --models: trained model directories with their split.json")
    if reps < 0:
        raise DefectclsError("--reps must be >= 0")
    pols = parse_policies(policies)
    out, t0 = _start(data, out)
    (out / "scores").mkdir(exist_ok=True)
    names, rows = [], []
    for m in (Path(x) for x in models):
        if not (m / "card.json").is_file() or not (m / "split.json").is_file():
            raise DefectclsError(f"--models: {m} is not a trained model directory (card.json and split.json)")
        name = m.name if m.name not in names else f"{m.parent.name}_{m.name}"
        names.append(name)
        cache = out / "scores" / f"{name}.csv"
        card = read_card(m)
        card = card if tta_top is None else with_views(card, card.tta, tta_top)
        key = (f"{model_id(m, card)} T {card.temperature!r} views {card.tta}"   # what the scores depend on
               + (f" top {card.tta_top}" if card.tta_top else ""))
        tab = []
        if reuse and cache.is_file():
            with open(cache, newline="", encoding="utf-8") as fh:
                tab = list(csv.DictReader(fh))
            if not tab or any(r.get("scored_by") != key for r in tab):
                tab = []                               # another model or card in the same place: score it again
        if tab:
            paths = [r["path"] for r in tab]
            y, p = np.array([int(r["label"]) for r in tab]), np.array([float(r["p_bad"]) for r in tab])
            held, part = np.array([r["held"] == "1" for r in tab]), np.array([int(r["part"]) for r in tab])
        else:
            got = {k: [] for k in ("y", "p", "held", "part", "path")}
            pred = Predictor(m, tta_top=tta_top)     # loaded (and exported) once for both parts
            for i, split in enumerate(("val", "test")):
                res = evaluate_model(m, data, split=split, predictor=pred)
                if res["skipped"]:
                    raise DefectclsError(f"{m}: {len(res['skipped'])} {split} photo(s) unreadable, e.g. "
                                         f"{res['skipped'][0]['path']}: {res['skipped'][0]['error']}")
                for col, val in (("y", res["y_true"]), ("p", res["prob_bad"]), ("held", res["held"]),
                                 ("part", [i] * len(res["y_true"])),
                                 ("path", [os.path.relpath(x, data) for x in res["paths"]])):
                    got[col] += val
            paths = got["path"]
            y, p = np.array(got["y"], int), np.array(got["p"], float)
            held, part = np.array(got["held"], bool), np.array(got["part"], int)
            with open(cache, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["path", "label", "p_bad", "held", "part", "scored_by"])
                w.writerows([q, int(a), repr(float(b)), int(c), int(d), key]
                            for q, a, b, c, d in zip(got["path"], y, p, held, part, strict=True))
        if progress:
            print(f"{name}: {int(np.sum(part == 0))} validation / {int(np.sum(part == 1))} test photos", flush=True)
        groups = split_groups(json.loads((m / "split.json").read_text(encoding="utf-8")), paths)
        groups = None if groups is None else np.array(groups)
        p = at_temperature(p, card.temperature, policy_temperature(card))   # the shares are taken at the policy's scale
        for share, least in pols:
            rows.append({"model": name, **resplit_policy(y, p, held, part, share, least, reps, seed, groups)})
    summary = []
    for share, least in pols:
        mine = [r for r in rows if (r["share"], r["least_fpr"]) == (share, least)]
        summary.append({"share": share, "least_fpr": least,
                        "own_missed": sum(r["own_missed"] for r in mine),
                        "own_with_miss": sum(r["own_missed"] > 0 for r in mine),
                        **({"p_miss": float(np.mean([r["p_miss"] for r in mine])),
                            "mean_fpr": float(np.mean([r["mean_fpr"] for r in mine])),
                            "median_fpr": float(np.median([r["mean_fpr"] for r in mine]))} if reps else {})})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summary if reps else ():
        ax.plot(s["median_fpr"], s["p_miss"], "o")
        ax.annotate(f"{s['share']:g} / {s['least_fpr']:g}", (s["median_fpr"], s["p_miss"]), fontsize=8,
                    xytext=(4, 2), textcoords="offset points")
    ax.set(xlabel="false alarms (median over models of the mean test FPR)",
           ylabel="P(a missed bad part on the test half)", title="no-miss policies: share / least FPR")
    fig.tight_layout()
    fig.savefig(out / "threshold.png", dpi=90)
    plt.close(fig)
    res = {"experiment": "threshold", "data": str(data), "models": [str(m) for m in models], "reps": reps,
           "seed": seed, "rows": rows, "summary": summary, "machine": machine_info(),
           "seconds": time.perf_counter() - t0}
    head = ["policy (share / least FPR)"] + names
    body = [f"{len(names)} models, {reps} random re-splits of each one's validation and test parts (pooled, split "
            "again per class at their sizes), seed " f"{seed}. Each cell: P(at least one missed bad part on the test half) "
            "/ mean test FPR over the re-splits; in brackets the model's own split: missed / FPR. The threshold is "
            "`choose_threshold` with target 0 (a share of the lowest validation bad score, lowered until it rejects "
            "at least the least FPR of validation good parts); held photos count as rejected.", "",
            md_table(head, [[f"{s:g} / {a:g}"] + [
                f"{_fmt(r['p_miss'], 3)} / {_fmt(r['mean_fpr'], 3)} ({r['own_missed']} / {_fmt(r['own_fpr'], 3)})"
                for r in rows if (r["share"], r["least_fpr"]) == (s, a)] for s, a in pols]), "",
            md_table(["policy", "P(miss), mean over models", "FPR, mean", "FPR, median", "own splits: missed (models)"],
                     [[f"{s['share']:g} / {s['least_fpr']:g}", s.get("p_miss"), s.get("mean_fpr"), s.get("median_fpr"),
                       f"{s['own_missed']} ({s['own_with_miss']})"] for s in summary]),
            "", "![P(miss) against false alarms per policy](threshold.png)"]
    res["files"] = _write_report(out, "No-miss threshold policies on re-split held-out photos", res, body, command) + [
        str(out / "threshold.png")]
    return res


EXPERIMENTS: dict[str, Callable[..., dict]] = {
    "rgb-vs-gray": run_rgb_vs_gray,
    "archs": run_archs,
    "cam-localization": run_cam_localization,
    "data-size": run_data_size,
    "threshold": run_threshold,
}


def format_summary(res: dict) -> str:
    """A few lines for the terminal: the report's table is in report.md."""
    lines = [f"{res['experiment']} on {res['data']} in {res['seconds']:.0f} s: "]
    for r in res["rows"]:
        name = r.get("arch") or r.get("color") or r.get("size")
        if res["experiment"] == "threshold":
            continue
        if res["experiment"] == "cam-localization":
            lines.append(f"  {r['arch']:<20} {r['method']:<10} pointing {r['rate']:.3f} ({r['hits']}/{r['n']}), "
                         f"chance {r['chance']:.3f}")
        else:
            fnr, fpr = r.get("fnr", r.get("test_fnr")), r.get("fpr", r.get("test_fpr"))
            lines.append(f"  {name!s:<20} FNR {_fmt(fnr)} FPR {_fmt(fpr)}")
    for s in res.get("summary", ()):
        lines.append(f"  share {s['share']:g}, least FPR {s['least_fpr']:g}: own splits {s['own_missed']} missed"
                     + (f"; re-splits P(miss) {s['p_miss']:.3f}, FPR mean {s['mean_fpr']:.3f}, median "
                        f"{s['median_fpr']:.3f}" if "p_miss" in s else ""))
    lines.append(f"  report: {res['files'][0]}")
    return "\n".join(lines)
