"""Training loop: imbalance-aware, FNR-first early stopping, calibration and threshold, DDP-ready."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import sys
import threading
import time
import types
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from .augment import augment, paint_defects
from .config import MIXED, TrainConfig, resolve_device, seed_everything
from .errors import DefectclsError
from .evaluate import (
    calibrated_policy,
    compute_metrics,
    floor_note,
    fpr_at_fnr,
    lone_threshold_warning,
    prob_bad_from_logits,
    shot_counts,
    tradeoff_text,
)
from .models import (
    INPUT_NORMS,
    POOLS,
    TTA_VIEWS,
    DihedralTTA,
    Ensemble,
    ModelCard,
    build_model,
    cam_offset,
    cam_target_layer,
    check_tta_top,
    eval_batch,
    read_card,
    save_model_dir,
    unwrap_tta,
    with_tta,
)

SPLIT_FILE = "split.json"


# ---------------------------------------------------------------- distributed helpers

def _dist_info() -> tuple[int, int, bool]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, world > 1


def _log(msg: str, rank: int = 0) -> None:
    """Progress lines go to stderr: stdout carries only the result (one JSON object with --json)."""
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)


def _log_policy(policy: dict, where: str, temperature: float) -> None:
    """What the saved threshold rests on: a lone outlier's warning, and the trade-off WHERE it was chosen."""
    if warning := lone_threshold_warning(policy, temperature):
        _log(f"warning: {warning}")
    if note := floor_note(policy):
        _log(note)
    if tradeoff := tradeoff_text(policy):
        _log(f"{where}, by FNR target: {tradeoff}")


def to_input(batch_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NxCxHxW -> normalised float (the tensor twin of data.normalize)."""
    return (batch_u8.float() / 255.0 - mean) / std


@torch.inference_mode()
def predict_logits(model: nn.Module, images_u8: np.ndarray, mean: torch.Tensor, std: torch.Tensor,
                   device: torch.device, batch_size: int | None = None) -> np.ndarray:
    """Logits for cached uint8 images, no augmentation (BATCH_SIZE None: ``eval_batch`` for the size and views)."""
    model.eval()
    if batch_size is None:
        net = unwrap_tta(model)
        batch_size = eval_batch(images_u8.shape[-1], model.views if isinstance(model, DihedralTTA) else 1,
                                len(net.members) if isinstance(net, Ensemble) else 1)
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = to_input(torch.from_numpy(images_u8[i:i + batch_size]).to(device), mean, std)
        out.append(model(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 2), np.float32)


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """CFG with ``input_norm`` and ``pool`` set: as asked, else the --init model's (fine-tuning keeps its
    network), else the defaults ("image", "avg"); ``tta_top`` as the card stores it; its other options checked."""
    init_card = read_card(cfg.init) if cfg.init else None
    norm = cfg.input_norm or (init_card.input_norm if init_card else "image")
    if norm not in INPUT_NORMS:
        raise DefectclsError(f"--input-norm must be one of {', '.join(INPUT_NORMS)}, got {norm!r}")
    pool = cfg.pool or (init_card.pool if init_card else "avg")
    if pool not in POOLS:
        raise DefectclsError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if not cfg.weight_decay >= 0:
        raise DefectclsError(f"--weight-decay must be 0 or more, got {cfg.weight_decay:g}")
    if not 0.0 <= cfg.ema < 1.0:
        raise DefectclsError(f"--ema must be a decay in [0, 1) (0: off), got {cfg.ema}")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise DefectclsError(f"--max-minutes must be > 0, got {cfg.max_minutes}")
    if cfg.epoch_size < 0:
        raise DefectclsError(f"--epoch-size must be >= 0 (0: one pass over the training set), got {cfg.epoch_size}")
    if not 0 <= cfg.hard_share < 1:
        raise DefectclsError(f"--hard-share must be in [0, 1) (0: off), got {cfg.hard_share}")
    if not (cfg.rank_weight >= 0 and math.isfinite(cfg.rank_weight)):
        raise DefectclsError(f"--rank-weight must be >= 0 (0: off), got {cfg.rank_weight}")
    if isinstance(cfg.rank_k, bool) or not isinstance(cfg.rank_k, int) or cfg.rank_k < 1:
        raise DefectclsError(f"--rank-k must be a whole number >= 1, got {cfg.rank_k!r}")
    if cfg.rank_k != 1 and cfg.rank_weight == 0:
        raise DefectclsError(f"--rank-k {cfg.rank_k} shapes the ranking loss, which is off: give --rank-weight W too")
    fills = (cfg.aug.fill_border_p, cfg.aug.fill_reflect_p, cfg.aug.fill_const_p)
    if min(fills) < 0 or sum(fills) > 1:
        raise DefectclsError("the fill shares fill_border_p, fill_reflect_p and fill_const_p must be >= 0 and "
                             f"sum to at most 1, got {', '.join(f'{f:g}' for f in fills)}")
    if cfg.mixed not in MIXED:
        raise DefectclsError(f"--mixed must be one of {', '.join(MIXED)}, got {cfg.mixed!r}")
    if not 0.0 <= cfg.aug.paint_bad < 1.0:
        raise DefectclsError(f"paint_bad must be a share in [0, 1) (0: off), got {cfg.aug.paint_bad:g}")
    if cfg.aug.paint_bad and cfg.masks:
        raise DefectclsError("paint_bad with --masks: a painted blotch has no mask; use one or the other")
    if cfg.mask_weight <= 0:
        raise DefectclsError(f"--mask-weight must be > 0, got {cfg.mask_weight}")
    if cfg.tta not in TTA_VIEWS:
        raise DefectclsError(f"--tta must be one of {', '.join(map(str, TTA_VIEWS))}, got {cfg.tta!r}")
    frame = cfg.frame or ("part" if init_card and init_card.frame_ref else "full")
    if frame not in D.FRAMES:
        raise DefectclsError(f"--frame must be one of {', '.join(D.FRAMES)}, got {frame!r}")
    if init_card is not None and (frame == "part") != bool(init_card.frame_ref):
        raise DefectclsError(f"--frame {frame} differs from the --init model's ({'part' if init_card.frame_ref else 'full'}): "
                             "a network keeps the framing it learned")
    if cfg.masks and frame == "part":
        raise DefectclsError("--masks needs --frame full: the masks are drawn on the whole photo")
    if cfg.masks and not Path(cfg.masks).is_dir():   # before the photos are decoded, not after
        raise DefectclsError(f"mask folder not found: {cfg.masks}")
    return replace(cfg, input_norm=norm, pool=pool, frame=frame,
                   tta_top=check_tta_top(cfg.tta_top, cfg.tta, what="--tta-top"))   # stored as the card will be


def init_weights(model: nn.Module, model_dir: str, arch: str, in_chans: int) -> None:
    """Warm start: copy the weights of an existing model directory (fine-tuning, retraining with reviewed labels)."""
    from .models import load_model_dir

    src, card = load_model_dir(model_dir)
    if card.arch != arch or card.in_chans != in_chans:
        raise DefectclsError(f"--init {model_dir} is a {card.arch} with {card.in_chans} input channel(s); "
                             f"this run trains a {arch} with {in_chans}")
    model.load_state_dict(src.state_dict())


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, images_u8: np.ndarray, mean: torch.Tensor, std: torch.Tensor,
                       device: torch.device, max_images: int = 512, batch_size: int = 32, seed: int = 0) -> None:
    """Re-estimate BatchNorm running statistics on un-augmented training images ("precise BN").

    Trained from scratch, the running averages lag far behind fast-moving weights, so the
    eval-mode network can answer one class for everything while training-mode accuracy is
    high. A cumulative average over a few hundred clean images makes eval mode match.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(images_u8) < 2:
        return
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    model.train()
    pick = np.random.default_rng(seed).permutation(len(images_u8))[:max_images]
    with torch.no_grad():   # the running statistics update all the same; no graph to record
        for i in range(0, len(pick), batch_size):
            idx = np.sort(pick[i:i + batch_size])
            if len(idx) < 2:
                continue
            x = to_input(torch.from_numpy(images_u8[idx]).to(device), mean, std)
            model(x.contiguous(memory_format=torch.channels_last))
    for bn, m in zip(bns, momenta, strict=True):
        bn.momentum = m
    model.train(was_training)


def epoch_samples(n_train: int, epoch_size: int) -> int:
    """Samples one epoch draws: the training set once, or repeated up to EPOCH_SIZE when it is smaller.

    The recipe's step count (and so its learning-rate schedule and augmentation ramp) then stays
    that of a full-size set when a user trains on a few hundred photos.
    """
    return max(n_train, epoch_size)


BG_BINS, BG_CAP = 8, 3.0   # --balance background: quantile bands of the border's level, weight cap


def border_level(x: np.ndarray) -> np.ndarray:
    """The background level of each photo in X (N, C, H, W): its border band's median (3% of the side), channels averaged."""
    return np.array([float(D.border_median(im.transpose(1, 2, 0), frac=0.03).mean()) for im in x])


def background_balance_weights(y: np.ndarray, level: np.ndarray, bins: int = BG_BINS, cap: float = BG_CAP) -> np.ndarray:
    """Drawing weights (summing to 1) under which both classes weigh the same within each band of background level.

    The bands are quantiles of LEVEL (``border_level``). Where the light behind the part predicts the class
    (on the casting photos the border's median alone ranks bad above good with AUROC 0.84), a network can learn
    the light instead of the defect; drawn this way it cannot. A photo's weight is capped at CAP times, and
    floored at 1/CAP of, that of a photo in a band of one class.
    """
    edges = np.quantile(level, np.linspace(0, 1, bins + 1)[1:-1])
    band = np.digitize(level, edges)
    w = np.ones(len(y))
    for k in np.unique(band):
        in_band = band == k
        classes = np.unique(y[in_band])
        for c in classes:
            m = in_band & (y == c)
            w[m] = in_band.sum() / (len(classes) * m.sum())
    w = np.clip(w, 1.0 / cap, cap)
    return w / w.sum()


def shot_balance_weights(y: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Drawing weights (summing to 1) under which both classes weigh the same and, within a class, every shot.

    GROUPS numbers the copies of one shot (``copies.copy_groups``; None: every photo its own shot). On a folder
    built by augmenting a few hundred shots (the casting photos: 556 shots, one of them 276 photos), drawing photo
    by photo lets the largest groups outvote the rest; drawn this way each shot counts once, its copies sharing
    its weight.
    """
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    w = np.zeros(len(y))
    for c in (0, 1):
        m = y == c
        if not m.any():
            continue
        shots, inverse, size = np.unique(g[m], return_inverse=True, return_counts=True)
        w[m] = 0.5 / (len(shots) * size[inverse])
    return w / w.sum()


def epoch_order(y: np.ndarray, n_epoch: int, balance: str, gen: torch.Generator, hard_share: float = 0.0,
                sample_loss: np.ndarray | None = None, weights: np.ndarray | None = None) -> torch.Tensor:
    """Indices of the training photos one epoch visits, in order.

    BALANCE "sampler" draws both classes equally often ("background" and "shots": by WEIGHTS, from
    ``background_balance_weights`` or ``shot_balance_weights``), otherwise each photo is visited once per pass.
    With HARD_SHARE > 0 and the previous epochs' SAMPLE_LOSS, that share of the epoch is drawn again in proportion to each
    photo's recent loss (capped at 1), so the rare defects the network still misses (a 1-3 px pin mark
    among thousands of obvious blotches) are seen many times more often than once an epoch, instead of
    being outvoted.
    """
    n_hard = 0
    if hard_share > 0 and sample_loss is not None and np.isfinite(sample_loss).any():
        n_hard = int(round(hard_share * n_epoch))   # hard_share < 1: checked by resolve_config
    n_base = n_epoch - n_hard
    if balance in ("sampler", "background", "shots"):
        w = weights if weights is not None else shot_balance_weights(y, None)   # each photo its own shot
        order = torch.multinomial(torch.tensor(w), n_base, replacement=True, generator=gen) if n_base else \
            torch.zeros(0, dtype=torch.long)
    else:
        passes = math.ceil(n_base / len(y)) if n_base else 0
        order = torch.cat([torch.randperm(len(y), generator=gen) for _ in range(passes)] or
                          [torch.zeros(0, dtype=torch.long)])[:n_base]
    if n_hard:
        seen = np.where(np.isfinite(sample_loss), sample_loss, np.nanmean(sample_loss))
        w = torch.tensor(np.clip(seen, 1e-6, 1.0))
        hard = torch.multinomial(w, n_hard, replacement=True, generator=gen)
        order = torch.cat([order, hard])[torch.randperm(n_epoch, generator=gen)]
    return order


def _merge_sample_loss(sample_loss: np.ndarray) -> np.ndarray:
    """Each rank saw its own share of the photos: combine their running losses (mean where several saw one)."""
    seen = np.isfinite(sample_loss)
    t = torch.tensor(np.stack([np.where(seen, sample_loss, 0.0), seen.astype(np.float64)]))
    torch.distributed.all_reduce(t)
    total, count = t.numpy()
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _selection_score(y: np.ndarray, prob: np.ndarray, loss: float, target_fnr: float,
                     held: np.ndarray | None = None) -> tuple[float, float]:
    """Lower is better: FPR at the threshold meeting the target FNR on validation (HELD parts judged bad,
    as the threshold is chosen: ``evaluate.choose_threshold``), then loss."""
    return (fpr_at_fnr(y, prob, target_fnr, held), loss)


def _subset(idx: list[int], labels: np.ndarray, max_per_class: tuple[int, int], seed: int) -> list[int]:
    rng = np.random.default_rng(seed + 1)
    out = []
    for cls, cap in enumerate(max_per_class):
        members = [i for i in idx if labels[i] == cls]
        out += rng.permutation(members)[:cap].tolist() if len(members) > cap else members
    return sorted(out)


@dataclass
class _Data:
    """The decoded, labelled folder and its seeded train/val/test split (indices into samples)."""

    root: Path
    samples: list[D.Sample]
    labels: np.ndarray
    images: np.ndarray
    failed: list[tuple[str, str]]
    parts: dict[str, list[int]]
    frame_ref: float | None = None   # framing on the part (``data.fit_frame``); None: the whole photo
    background: list[float] | None = None   # the photos' background (``data.restore_fill``)
    masks: np.ndarray | None = None         # defect masks at working size (``data.load_masks``), with --masks
    mask_known: np.ndarray | None = None    # which images' masks are known (every good one; bad ones with a file)
    photo_range: dict | None = None         # what the photos look like (``data.estimate_photo_range``)
    focus_below: float | None = None        # softer photos are sharpened back (``data.restore_focus``)
    groups: np.ndarray | None = None        # copies of one photo share a number (``copies.copy_groups``)

    held_known: dict[int, bool] = field(default_factory=dict)   # ``held``'s answers so far

    def rel(self, i: int) -> str:
        """Sample I's path relative to the folder, as split.json and the threshold policy name it."""
        return os.path.relpath(self.samples[i].path, self.root)

    def groups_of(self, idx) -> np.ndarray | None:
        """The copy group of each of samples IDX (``copies.copy_groups``); None when copies were not looked for."""
        return None if self.groups is None else self.groups[idx]

    def calibrated(self, cfg: TrainConfig, idx, logits: np.ndarray) -> tuple[float, dict]:
        """The card's temperature and threshold policy from the LOGITS of samples IDX (``evaluate.calibrated_policy``
        with CFG's target and no-miss rule, the photos' holds and copy groups)."""
        return calibrated_policy(logits, self.labels[idx], cfg.target_fnr, cfg.threshold_method,
                                 names=[self.rel(i) for i in idx], held=self.held(idx),
                                 no_miss_share=cfg.no_miss_share, no_miss_min_fpr=cfg.no_miss_min_fpr,
                                 groups=self.groups_of(idx))

    def metrics(self, idx, prob: np.ndarray, thr: float) -> dict:
        """``evaluate.compute_metrics`` of samples IDX (labels as filed, held photos rejected) at THR, and, when
        copies were looked for, the same counted by shot (``evaluate.shot_counts``)."""
        y, held = self.labels[idx], self.held(idx)
        m = compute_metrics(y, prob, thr, held)
        groups = self.groups_of(idx)
        return m if groups is None else {**m, **shot_counts(groups, y, prob, thr, held)}

    def held(self, idx) -> np.ndarray:
        """Whether the photos of samples IDX are held (``data.photo_check``: judged bad whatever the model
        says), each photo checked once: the threshold and the metrics count verdicts as the product gives them."""
        todo = [int(i) for i in idx if int(i) not in self.held_known]
        if todo:
            color = "gray" if self.images.shape[1] == 1 else "rgb"
            self.held_known.update(zip(todo, D.held_all([self.samples[i].path for i in todo], color).tolist(), strict=True))
        return np.array([self.held_known[int(i)] for i in idx], bool)


def _shots_text(m: dict) -> str:
    """', shots missed 0/51 rejected 4/24' for metrics counted by shot (``evaluate.shot_counts``), else ''."""
    return (f", shots missed {m['missed_shots']}/{m['bad_shots']} rejected {m['rejected_shots']}/{m['good_shots']}"
            if "good_shots" in m else "")


def training_labels(labels: np.ndarray, groups: np.ndarray | None, idx, mixed: str) -> tuple[list[int], np.ndarray]:
    """The training photos IDX and the labels they train with under the --mixed policy: a shot whose copies are
    filed under both labels (over the whole folder, ``groups`` numbering the shots) keeps each copy's label
    ("keep"), trains every copy as bad ("bad": a defect one inspector saw is one) or is left out ("drop")."""
    idx = [int(i) for i in idx]
    if mixed == "keep" or groups is None:
        return idx, labels[idx].copy()
    both = D.mixed_shots(labels, groups)
    in_mixed = np.array([int(groups[i]) in both for i in idx], bool)
    if mixed == "drop":
        idx = [i for i, m in zip(idx, in_mixed, strict=True) if not m]
        return idx, labels[idx].copy()
    y = labels[idx].copy()
    y[in_mixed] = 1
    return idx, y


def _train_part(cfg: TrainConfig, data: _Data, idx, rank: int = 0) -> tuple[list[int], np.ndarray]:
    """``training_labels`` for the training photos IDX of DATA under cfg.mixed, saying what it changed."""
    out, y = training_labels(data.labels, data.groups, idx, cfg.mixed)
    if cfg.mixed == "drop" and len(out) < len(idx):
        _log(f"--mixed drop: {len(idx) - len(out)} training photos of shots filed under both labels left out", rank)
    elif cfg.mixed == "bad" and (changed := int((y != data.labels[out]).sum())):
        _log(f"--mixed bad: {changed} good-labelled training photos of shots also filed bad train as bad", rank)
    return out, y


def _load_data(cfg: TrainConfig, rank: int = 0, distributed: bool = False) -> _Data:
    root = Path(cfg.data)
    samples = D.scan_folder(root)
    if cfg.extra_labels:
        samples, overridden, added = D.merge_labels(samples, D.read_label_csv(cfg.extra_labels))
        _log(f"extra labels {cfg.extra_labels}: {overridden} overridden, {added} added", rank)
    frame_ref = None
    if cfg.frame == "part":   # the --init model's, else the median part size of up to 256 seeded photos
        init_ref = read_card(cfg.init).frame_ref if cfg.init else None
        frame_ref = init_ref or D.estimate_frame_ref([s.path for s in samples], cfg.color, seed=cfg.seed)
        _log(f"framing on the part: radius {frame_ref:.4f} of the side", rank)
    # what tells a tool's black or white fill from the photos' own background, at training and inference alike
    # and what the photos look like, for photo notes and sharpening soft ones back (one decode of 256 photos)
    background, photo_range = D.estimate_look([s.path for s in samples], cfg.color, seed=cfg.seed)
    if photo_range is not None:
        photo_range["training_files"] = True
        D.add_zoom(photo_range, frame_ref, cfg.aug.scale)
    focus_below = photo_range["sharpness"][0] if photo_range and cfg.focus_restore else None
    if distributed and rank != 0:
        torch.distributed.barrier()  # let rank 0 decode and fill the disk cache first
    images, ok, failed = D.decode_all(samples, cfg.img_size, cfg.color, cfg.workers, cfg.disk_cache,
                                      progress=cfg.progress and rank == 0, frame_ref=frame_ref, background=background,
                                      focus_below=focus_below)
    if distributed and rank == 0:
        torch.distributed.barrier()
    for _path, reason in failed:
        _log(f"skipped unreadable image: {reason}", rank)
    samples = [samples[i] for i in ok]
    labels = np.array([s.label for s in samples])
    if len(np.unique(labels)) < 2:
        raise DefectclsError("training needs readable images of both classes (good/ and bad/)")
    groups = None
    if cfg.group_copies or cfg.balance == "shots" or cfg.mixed != "keep":
        from .copies import copy_groups

        groups = copy_groups([s.path for s in samples], cfg.color, workers=cfg.workers, progress=cfg.progress and rank == 0)
        sizes = np.bincount(groups)
        _log(f"copies of one photo: {len(sizes)} groups of {len(groups)} photos (largest {int(sizes.max())})"
             + (", each kept in one part of the split" if cfg.group_copies else ""), rank)
    parts = D.stratified_split(labels.tolist(), tuple(cfg.split), cfg.data_seed, groups if cfg.group_copies else None)
    if cfg.group_copies:
        for name, share in zip(("val", "test"), cfg.split[1:], strict=True):
            if share > 0 and len(np.unique(labels[parts[name]])) < 2:
                raise DefectclsError(f"the {name} part has no image of one class: with copies of one photo kept together "
                                     "they fall in too few groups to share among train, val and test "
                                     "(--no-group-copies splits photo by photo)")
    masks = known = None
    if cfg.masks:
        masks, known, problems = D.load_masks(samples, cfg.masks, cfg.img_size)
        n_bad = int((labels == 1).sum())
        if n_bad == len(problems):
            raise DefectclsError(f"--masks {cfg.masks}: no bad image has a usable mask there "
                                 f"(e.g. {problems[0][1]}); masks are named like their images")
        _log(f"defect masks from {cfg.masks}: {n_bad - len(problems)} of {n_bad} bad images"
             + (f"; without a usable mask (no mask loss): {len(problems)}, e.g. {problems[0][1]}" if problems else ""),
             rank)
    return _Data(root, samples, labels, images, failed, parts, frame_ref, background, masks, known, photo_range,
                 focus_below, groups)


def _norm_stats(cfg: TrainConfig, x: np.ndarray) -> tuple[list[float], list[float]]:
    """Input mean/std: ImageNet's for pretrained starts, else the training images' own."""
    c = x.shape[1]
    if cfg.pretrained or cfg.pretrained_file:
        return ([0.449] * c if c == 1 else [0.485, 0.456, 0.406]), ([0.226] * c if c == 1 else [0.229, 0.224, 0.225])
    f = x.astype(np.float32) / 255.0
    return f.mean(axis=(0, 2, 3)).round(4).tolist(), np.maximum(f.std(axis=(0, 2, 3)), 1e-3).round(4).tolist()


class MaskHead(nn.Module):
    """MODEL plus a 1x1 convolution on its last feature map (the Grad-CAM layer) that tells, cell by cell,
    whether a defect lies there; ``forward`` returns (class logits, cell logits N x 1 x h x w).

    Trained beside the class loss when defect masks are known (``--masks``), it asks the features the
    classifier pools to tell where every defect is, not only enough of them to call the part bad; only
    MODEL is saved (``remove`` detaches the hook).
    """

    def __init__(self, model: nn.Module, layer: nn.Module, channels: int):
        super().__init__()
        self.model = model
        self.head = nn.Conv2d(channels, 1, 1)
        self._feat: torch.Tensor | None = None
        self._hook = layer.register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _inputs, output: torch.Tensor) -> None:
        self._feat = output

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        feat, self._feat = self._feat, None
        return logits, self.head(feat)

    def remove(self) -> nn.Module:
        self._hook.remove()
        return self.model


def with_mask_head(model: nn.Module, arch: str, in_chans: int, img_size: int) -> MaskHead:
    """``MaskHead`` on MODEL's Grad-CAM layer (its channels read from one forward pass)."""
    layer = cam_target_layer(model, arch)
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        dev = next(model.parameters()).device
        model(torch.zeros(1, in_chans, img_size, img_size, device=dev))
    hook.remove()
    model.train(was_training)
    return MaskHead(model, layer, seen[0].shape[1]).to(dev)


def cell_targets(masks: torch.Tensor, cells: tuple[int, int], offset: tuple[float, float] = (0.0, 0.0)
                 ) -> torch.Tensor:
    """Which of the CELLS (h, w) of a feature map hold a defect of MASKS (N x 1 x H x W, in [0, 1]): a cell
    does when any pixel of the window it looks at is at least a tenth covered.

    Cell i looks at a window of H / h pixels centred OFFSET (``models.cam_offset``: 15.5 pixels for
    MobileNets and ResNets) up and left of the window of the usual grid, so the masks are moved down and
    right by OFFSET before the grid's maxima are taken.
    """
    h, w = masks.shape[-2:]
    dy, dx = round(offset[0]), round(offset[1])
    shifted = F.pad(masks, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    shifted = shifted[..., max(-dy, 0):max(-dy, 0) + h, max(-dx, 0):max(-dx, 0) + w]
    return (F.adaptive_max_pool2d(shifted, cells) >= 0.1).float()


def mask_loss(cell_logits: torch.Tensor, masks: torch.Tensor, known: torch.Tensor,
              offset: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """Class-balanced binary cross-entropy of the cells (N x 1 x h x w) against MASKS (N x 1 x H x W, in [0, 1])
    read by ``cell_targets`` with OFFSET. Positive and negative cells of the images whose mask is KNOWN weigh
    half each; 0 when no mask is known in the batch."""
    if not bool(known.any()):
        return cell_logits.sum() * 0.0
    target = cell_targets(masks[known], cell_logits.shape[-2:], offset)
    per_cell = F.binary_cross_entropy_with_logits(cell_logits[known].float(), target, reduction="none")
    pos = target.sum()
    neg = target.numel() - pos
    loss = (per_cell * (1 - target)).sum() / neg.clamp_min(1)
    return 0.5 * (loss + (per_cell * target).sum() / pos) if pos > 0 else loss


def rank_loss(logits: torch.Tensor, y: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Mean over the batch's good parts of the sum, over its K lowest-scored bad parts (all of them when fewer), of
    softplus(good margin - bad margin), the margin being logit(bad) - logit(good): the no-miss threshold sits
    under the lowest bad parts, so every good part above them is a false alarm. K 1 pulls under one photo; a
    larger K shares the pull among the few that set the threshold. Zero (with a gradient path) when the batch
    lacks either class."""
    margin = logits[:, 1] - logits[:, 0]
    bad = y == 1
    if bad.all() or not bad.any():
        return margin.sum() * 0.0
    low = margin[bad].topk(min(int(k), int(bad.sum())), largest=False).values
    return F.softplus(margin[~bad][:, None] - low[None, :]).sum(dim=1).mean()


@contextlib.contextmanager
def _interruptible(enabled: bool):
    """Within the block, Ctrl-C or SIGTERM (``timeout``, a job scheduler) ends the training loop instead of the
    process: the flag it yields says so, and the caller saves the best epoch so far. Off (a plain block) when
    ENABLED is false (distributed runs, whose launcher owns the signals) or off the main thread."""
    flag = types.SimpleNamespace(hit=False)
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, on_term)
    try:
        yield flag
    except KeyboardInterrupt:
        flag.hit = True
    finally:
        signal.signal(signal.SIGTERM, before)


def _fit(cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
         mean_t: torch.Tensor, std_t: torch.Tensor, device: torch.device, gen: torch.Generator, what: str,
         rank: int = 0, world: int = 1, distributed: bool = False,
         masks: tuple[np.ndarray, np.ndarray] | None = None,
         held_val: np.ndarray | None = None,
         groups_train: np.ndarray | None = None) -> tuple[nn.Module, int, list[dict]]:
    """Train one network (CFG resolved by resolve_config); returns it with the weights of its best validation
    epoch (on rank 0), that epoch, history. MASKS: the training images' defect masks and which are known
    (``cfg.mask_weight`` times ``mask_loss`` joins the class loss). HELD_VAL: which validation photos are
    held (``data.photo_check``), for the epoch's score as the threshold will be chosen. GROUPS_TRAIN: the copy group
    of each training photo, for ``--balance shots``."""
    c = x_train.shape[1]
    model = build_model(cfg.arch, in_chans=c, num_classes=2, pretrained=cfg.pretrained,
                        pretrained_file=cfg.pretrained_file, input_norm=cfg.input_norm, pool=cfg.pool)
    if cfg.init:
        init_weights(model, cfg.init, cfg.arch, c)
    model = model.to(device).to(memory_format=torch.channels_last)
    ema = None
    if cfg.ema:   # copies the network before any mask head hooks onto it
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=False)
    net: nn.Module = model
    if masks is not None:
        net = with_mask_head(model, cfg.arch, c, cfg.img_size)
        cell_offset = cam_offset(cfg.arch)
    trained = net
    if distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    n_bad, n_good = int((y_train == 1).sum()), int((y_train == 0).sum())
    class_w = torch.tensor([len(y_train) / (2 * n_good), len(y_train) / (2 * n_bad)], device=device) \
        if cfg.balance == "loss" else None
    draw_w = background_balance_weights(y_train, border_level(x_train), BG_BINS, BG_CAP) if cfg.balance == "background" \
        else shot_balance_weights(y_train, groups_train) if cfg.balance == "shots" else None
    n_epoch = epoch_samples(len(y_train), cfg.epoch_size)
    steps_per_epoch = max(1, math.ceil(n_epoch / (cfg.batch_size * world)))
    opt = torch.optim.AdamW(trained.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.15)
    _log(f"training {cfg.arch} ({cfg.color}, {cfg.img_size}px) on {device}, world {world}: "
         f"train {len(y_train)} ({n_good} good / {n_bad} bad), {n_epoch} samples an epoch, {what}", rank)

    total_steps = cfg.epochs * steps_per_epoch
    scored = ema.module if ema is not None else model   # the weights validated, selected and saved
    best_score, best_state, best_epoch, history = (math.inf, math.inf, math.inf), None, -1, []
    stale = 0
    sample_loss = np.full(len(y_train), np.nan)   # running loss of each training photo (hard-example sampling)
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    t_loop = time.perf_counter()
    with _interruptible(not distributed) as interrupted:
        for epoch in range(cfg.epochs):
            model.train()
            perm_gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            order = epoch_order(y_train, n_epoch, cfg.balance, perm_gen, cfg.hard_share, sample_loss if epoch else None,
                                draw_w)
            order = order[rank::world]
            bar = range(0, len(order), cfg.batch_size)
            if cfg.progress and rank == 0:
                from tqdm import tqdm

                bar = tqdm(bar, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
            losses = []
            for step, i in enumerate(bar):
                idx = order[i:i + cfg.batch_size].numpy()
                if len(idx) < 2:  # BatchNorm cannot train on a single sample
                    continue
                xb = torch.from_numpy(x_train[idx]).to(device).float() / 255.0
                yb = torch.from_numpy(y_train[idx]).to(device)
                painted = None
                if cfg.aug.paint_bad > 0:   # before the pose and light changes, which then apply to the blotch too
                    xb, yb, painted = paint_defects(xb, yb, cfg.aug.paint_bad, gen)
                aug = cfg.aug.at_strength(cfg.aug.strength((epoch * steps_per_epoch + step) / total_steps))
                if masks is None:
                    xb = augment(xb, aug, gen, labels=yb)
                else:
                    mb = torch.from_numpy(masks[0][idx]).to(device).float() / 255.0
                    xb, mb = augment(xb, aug, gen, labels=yb, masks=mb)
                xb = ((xb - mean_t) / std_t).contiguous(memory_format=torch.channels_last)
                out = net(xb)
                logits = out[0] if masks is not None else out
                per_sample = F.cross_entropy(logits, yb, reduction="none")
                loss = (per_sample * class_w[yb]).sum() / class_w[yb].sum() if class_w is not None else per_sample.mean()
                if cfg.rank_weight > 0:
                    loss = loss + cfg.rank_weight * rank_loss(logits, yb, cfg.rank_k)
                if masks is not None:
                    loss = loss + cfg.mask_weight * mask_loss(out[1], mb, torch.from_numpy(masks[1][idx]).to(device),
                                                              cell_offset)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ema is not None:
                    ema.update_parameters(model)
                if sched.last_epoch + 1 < sched.total_steps:
                    sched.step()
                losses.append(loss.item())
                if cfg.hard_share > 0:   # only hard-example sampling reads them: no device->host copy otherwise
                    seen = per_sample.detach().cpu().double().numpy()
                    prev = sample_loss[idx]
                    merged = np.where(np.isnan(prev), seen, 0.5 * (prev + seen))
                    # a painted good part's loss is not its photo's: the photo keeps the loss it had
                    sample_loss[idx] = merged if painted is None else np.where(painted.cpu().numpy(), prev, merged)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if distributed and cfg.hard_share > 0:   # every rank draws the next epoch from the same losses
                sample_loss = _merge_sample_loss(sample_loss)
            stop = torch.zeros(1)
            if rank == 0:
                recompute_bn_stats(scored, x_train, mean_t, std_t, device, seed=cfg.seed + epoch)
                logits = predict_logits(scored, x_val, mean_t, std_t, device)
                val_loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_val)))
                prob = prob_bad_from_logits(logits)
                m = compute_metrics(y_val, prob, 0.5)
                score = _selection_score(y_val, prob, val_loss, cfg.target_fnr, held_val)
                # an epoch trained on the full augmentation ranges beats any epoch of the ramp (robustness)
                strength = cfg.aug.strength(((epoch + 1) * steps_per_epoch - 1) / total_steps)
                ramping = strength < 1.0
                score = (float(ramping), *score)
                history.append({"epoch": epoch + 1, "steps": len(losses), "train_loss": float(np.mean(losses)),
                                "val_loss": val_loss, "val_fnr": m["fnr"], "val_fpr": m["fpr"], "val_auroc": m["auroc"],
                                "val_fpr_at_target_fnr": score[1], "aug_strength": round(strength, 3)})
                improved = score < best_score
                if improved:   # the copy first: an interrupt between the two leaves a matching pair
                    best_state = copy.deepcopy(scored.state_dict())
                    best_score, best_epoch, stale = score, epoch + 1, 0
                else:
                    stale += 1
                _log(f"epoch {epoch + 1}/{cfg.epochs} loss {np.mean(losses):.4f} | val loss {val_loss:.4f} "
                     f"FNR {m['fnr']:.3f} FPR {m['fpr']:.3f} AUROC {m['auroc']:.4f} "
                     f"FPR@FNR<={cfg.target_fnr:g} {score[1]:.3f}{' (aug ramp)' if ramping else ''}{' *' if improved else ''}")
                stop[0] = float(stale >= cfg.patience and not ramping)
                spent = time.perf_counter() - t_loop
                if not stop[0] and epoch + 1 < cfg.epochs and spent + spent / (epoch + 1) > budget_s:
                    stop[0] = 2.0   # another epoch of the mean length would overrun --max-minutes
            if distributed:
                torch.distributed.broadcast(stop, 0)
            if stop.item():
                why = "patience" if stop.item() == 1 else "time budget"
                if history:
                    history[-1]["stop"] = why
                _log(f"early stop: no better validation score for {cfg.patience} epochs" if why == "patience" else
                     f"stop: another epoch would overrun --max-minutes {cfg.max_minutes:g}; best epoch {best_epoch}",
                     rank)
                break
    if interrupted.hit:
        if best_state is None:
            raise KeyboardInterrupt("before the first epoch was validated: nothing saved")
        history[-1]["stop"] = "interrupted"
        _log(f"interrupted in epoch {len(history) + 1}: saving the best epoch so far ({best_epoch})")
    if isinstance(trained, MaskHead):
        trained.remove()
    if rank == 0:
        model.load_state_dict(best_state)
    return model, best_epoch, history


def _write_split(out: Path, data: _Data, seed: int, fingerprint: str, parts: dict[str, list[int]], **extra) -> None:
    if data.groups is not None:   # which photos were kept together, to check or repeat the split
        extra["copy_groups"] = [[data.rel(i), int(g)] for i, g in enumerate(data.groups)]
    split = {"data_root": str(data.root.resolve()), "data_fingerprint": fingerprint, "seed": seed,
             **{k: [[data.rel(i), int(data.labels[i])] for i in parts[k]] for k in ("train", "val", "test")}, **extra}
    (out / SPLIT_FILE).write_text(json.dumps(split) + "\n", encoding="utf-8")


def _save_single(cfg: TrainConfig, model: nn.Module, data: _Data, mean: list[float], std: list[float],
                 parts: dict[str, list[int]], out: str | Path, device: torch.device, world: int, t0: float,
                 best_epoch: int, history: list[dict], extra_train: dict | None = None) -> dict:
    """Temperature and threshold on validation, metrics, card, weights and split.json for one trained network."""
    c = data.images.shape[1]
    mean_t = torch.tensor(mean, device=device).view(1, c, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, c, 1, 1)
    val_idx, test_idx = parts["val"], parts["test"]
    scorer = with_tta(model, cfg.tta, cfg.tta_top)   # the model as its directory will answer
    logits_val = predict_logits(scorer, data.images[val_idx], mean_t, std_t, device)
    temperature, policy = data.calibrated(cfg, val_idx, logits_val)
    prob_val = prob_bad_from_logits(logits_val, temperature)
    thr = policy["threshold"]
    metrics = {"val": data.metrics(val_idx, prob_val, thr)}
    if test_idx:
        prob_test = prob_bad_from_logits(predict_logits(scorer, data.images[test_idx], mean_t, std_t, device),
                                         temperature)
        metrics["test"] = data.metrics(test_idx, prob_test, thr)
    duration = time.perf_counter() - t0
    fingerprint = D.fingerprint(data.samples)
    card = ModelCard(
        arch=cfg.arch, in_chans=c, color=cfg.color, img_size=cfg.img_size, mean=mean, std=std,
        input_norm=cfg.input_norm, pool=cfg.pool, tta=cfg.tta, tta_top=cfg.tta_top, frame_ref=data.frame_ref,
        background=data.background, photo_range=data.photo_range, focus_below=data.focus_below,
        threshold=thr,
        temperature=temperature,
        threshold_policy=policy, metrics=metrics,
        train={"config": cfg.to_dict(), "data_root": str(data.root.resolve()),
               "data_fingerprint": fingerprint, "seed": cfg.seed, "device": str(device),
               "world_size": world, "best_epoch": best_epoch, "epochs_run": len(history),
               "stopped": history[-1].get("stop", "completed") if history else "completed",
               "epoch_samples": epoch_samples(len(parts["train"]), cfg.epoch_size),
               "duration_s": round(duration, 1), "history": history, "skipped": [p for p, _ in data.failed],
               "n": {k: len(parts[k]) for k in ("train", "val", "test")}, **(extra_train or {})},
    )
    saved = save_model_dir(model.cpu().to(memory_format=torch.contiguous_format), card, out, fp16=cfg.fp16_weights)
    model.to(device)
    _write_split(saved, data, cfg.data_seed, fingerprint, parts)
    t = metrics.get("test", metrics["val"])
    _log(f"saved {saved}: threshold {thr:.4f} ({policy['method']}), T {temperature:.3f}; "
         f"{'test' if 'test' in metrics else 'val'} FNR {t['fnr']:.4f} FPR {t['fpr']:.4f} AUROC {t['auroc']:.4f} "
         f"ECE {t['ece']:.4f}{_shots_text(t)} in {duration:.0f}s")
    _log_policy(policy, "on validation", temperature)
    return {"out": str(saved), "threshold": thr, "temperature": temperature, "metrics": metrics,
            "best_epoch": best_epoch, "stopped": card.train["stopped"], "duration_s": round(duration, 1)}


def train(cfg: TrainConfig) -> dict:
    """Train a model on CFG.data and write a model directory to CFG.out; returns a summary.

    With ``cfg.folds`` > 1 this is K-fold cross-validation (``train_folds``).
    """
    rank, world, distributed = _dist_info()
    cfg = resolve_config(cfg)
    if cfg.folds > 1:
        if distributed:
            raise DefectclsError("--folds trains its folds one after another in one process: start it without torchrun")
        return train_folds(cfg)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    gen = seed_everything(cfg.seed)

    data = _load_data(cfg, rank, distributed)
    labels, images = data.labels, data.images
    train_idx = data.parts["train"]
    if cfg.max_per_class:
        train_idx = _subset(train_idx, labels, cfg.max_per_class, cfg.data_seed)
    val_idx, test_idx = data.parts["val"], data.parts["test"]
    if not val_idx:
        raise DefectclsError("validation part is empty: need at least 3 images of each class")
    train_idx, y_train = _train_part(cfg, data, train_idx, rank)
    x_train = images[train_idx]
    mean, std = _norm_stats(cfg, x_train)
    c = images.shape[1]
    mean_t = torch.tensor(mean, device=device).view(1, c, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, c, 1, 1)

    masks = (data.masks[train_idx], data.mask_known[train_idx]) if data.masks is not None else None
    held_val = data.held(val_idx) if rank == 0 else None   # the epochs are scored on rank 0
    model, best_epoch, history = _fit(cfg, x_train, y_train, images[val_idx], labels[val_idx], mean_t, std_t, device,
                                      gen, f"val {len(val_idx)}, test {len(test_idx)}", rank, world, distributed,
                                      masks, held_val, data.groups_of(train_idx))
    summary: dict = {}
    if rank == 0:
        summary = _save_single(cfg, model, data, mean, std, {"train": train_idx, "val": val_idx, "test": test_idx},
                               cfg.out, device, world, t0, best_epoch, history)
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if summary.get("stopped") == "interrupted":   # saved; a caller (an experiment, the CLI) stops here too
        raise KeyboardInterrupt(f"the best epoch so far ({best_epoch}) is saved in {summary['out']}")
    return summary


def stratified_folds(labels: np.ndarray, k: int, seed: int, groups: np.ndarray | None = None) -> list[np.ndarray]:
    """K seeded, stratified folds of positions 0..len(labels)-1 (scikit-learn's StratifiedKFold; with GROUPS, a
    group number per position, StratifiedGroupKFold: each group in one fold)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    counts = np.bincount(labels, minlength=2)
    if k < 2 or counts.min() < k:
        raise DefectclsError(f"--folds {k}: needs 2 <= K <= the images of the rarer class outside the test part "
                             f"({int(counts.min())})")
    if groups is not None:
        sgk = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        folds = [val for _, val in sgk.split(np.zeros(len(labels)), labels, groups)]
        if any(len(np.unique(labels[f])) < 2 for f in folds):
            raise DefectclsError(f"--folds {k} --group-copies: a fold has no image of one class: too few groups of copies")
        return folds
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [val for _, val in skf.split(np.zeros(len(labels)), labels)]


def train_folds(cfg: TrainConfig) -> dict:
    """K-fold cross-validation: K members and their ensemble, written as model directories.

    The test part of the usual seeded split stays held out; the rest (train + val, seeded
    subset with ``max_per_class``) is cut into K stratified folds. Member k trains on the
    other K-1 folds, keeps its best epoch on fold k, and is written to OUT/fold_k as a full
    model directory (its own threshold and temperature from fold k). OUT itself becomes the
    ensemble (``card.arch == "ensemble"``, ``card.members``): the mean of the members' logits,
    all weights in OUT/model.safetensors. Its temperature and threshold are chosen on the
    out-of-fold predictions (every part scored by the member that never trained on it), and
    its card holds the out-of-fold metrics ("oof") and the ensemble's test metrics ("test").
    """
    from .models import ENSEMBLE_ARCH, Ensemble

    cfg = resolve_config(cfg)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    data = _load_data(cfg)
    labels, images = data.labels, data.images
    pool = np.array(sorted(data.parts["train"] + data.parts["val"]))
    if cfg.max_per_class:
        pool = np.array(_subset(pool.tolist(), labels, cfg.max_per_class, cfg.data_seed))
    test_idx = data.parts["test"]
    y_pool = labels[pool]
    folds = stratified_folds(y_pool, cfg.folds, cfg.data_seed, data.groups[pool] if cfg.group_copies else None)
    mean, std = _norm_stats(cfg, images[pool])
    c = images.shape[1]
    mean_t = torch.tensor(mean, device=device).view(1, c, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, c, 1, 1)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    oof_logits = np.zeros((len(pool), 2), np.float32)
    members, member_rows = [], []
    for k, val_pos in enumerate(folds):
        gen = seed_everything(cfg.seed + k)
        tr_pos = np.setdiff1d(np.arange(len(pool)), val_pos)
        parts = {"train": pool[tr_pos].tolist(), "val": pool[val_pos].tolist(), "test": test_idx}
        parts["train"], y_train = _train_part(cfg, data, parts["train"])
        model, best_epoch, history = _fit(cfg, images[parts["train"]], y_train, images[parts["val"]],
                                          labels[parts["val"]], mean_t, std_t, device, gen,
                                          f"fold {k + 1}/{cfg.folds}: val {len(val_pos)}, test {len(test_idx)}",
                                          masks=(data.masks[parts["train"]], data.mask_known[parts["train"]])
                                          if data.masks is not None else None, held_val=data.held(parts["val"]),
                                          groups_train=data.groups_of(parts["train"]))
        oof_logits[val_pos] = predict_logits(with_tta(model, cfg.tta, cfg.tta_top), images[parts["val"]], mean_t, std_t, device)
        s = _save_single(cfg, model, data, mean, std, parts, out / f"fold_{k}", device, 1, t0, best_epoch, history,
                         {"fold": k, "folds": cfg.folds, "ensemble": out.name})
        member_rows.append({"dir": f"fold_{k}", "best_epoch": best_epoch, "n_train": len(tr_pos), "n_val": len(val_pos),
                            **{f"{part}_{m}": s["metrics"][part][m] for part in s["metrics"] for m in ("fnr", "fpr", "auroc")}})
        members.append(model.eval())
        if history and history[-1].get("stop") == "interrupted":
            done = ", ".join(f"fold_{i}" for i in range(k + 1))
            raise KeyboardInterrupt(f"in fold {k + 1} of {cfg.folds}: the best epochs so far are saved in {out} "
                                    f"({done}); no ensemble (its threshold needs every fold's out-of-fold scores)")

    ensemble = Ensemble(members, [cfg.arch] * len(members)).to(device)
    temperature, policy = data.calibrated(cfg, pool, oof_logits)
    prob_oof = prob_bad_from_logits(oof_logits, temperature)
    policy["chosen_on"] = "out-of-fold predictions: each part scored by the member that did not train on it"
    thr = policy["threshold"]
    metrics = {"oof": data.metrics(pool, prob_oof, thr)}
    if test_idx:
        prob_test = prob_bad_from_logits(predict_logits(with_tta(ensemble, cfg.tta, cfg.tta_top), images[test_idx], mean_t, std_t,
                                                        device), temperature)
        metrics["test"] = data.metrics(test_idx, prob_test, thr)
    duration = time.perf_counter() - t0
    fingerprint = D.fingerprint(data.samples)
    card = ModelCard(
        arch=ENSEMBLE_ARCH, in_chans=c, color=cfg.color, img_size=cfg.img_size, mean=mean, std=std,
        input_norm=cfg.input_norm, pool=cfg.pool, tta=cfg.tta, tta_top=cfg.tta_top, frame_ref=data.frame_ref,
        background=data.background, photo_range=data.photo_range, focus_below=data.focus_below,
        threshold=thr,
        temperature=temperature,
        threshold_policy=policy, metrics=metrics,
        members=[r["dir"] for r in member_rows],
        train={"config": cfg.to_dict(), "data_root": str(data.root.resolve()), "data_fingerprint": fingerprint,
               "seed": cfg.seed, "device": str(device), "world_size": 1, "folds": cfg.folds,
               "member_archs": [cfg.arch] * len(members), "members": member_rows,
               "duration_s": round(duration, 1), "skipped": [p for p, _ in data.failed],
               "n": {"train": len(pool), "val": 0, "test": len(test_idx)}},
    )
    saved = save_model_dir(ensemble.cpu(), card, out, fp16=cfg.fp16_weights)
    fold_of = np.empty(len(pool), int)
    for k, val_pos in enumerate(folds):
        fold_of[val_pos] = k
    _write_split(saved, data, cfg.data_seed, fingerprint, {"train": pool.tolist(), "val": [], "test": test_idx},
                 folds=[[data.rel(i), int(labels[i]), int(f)] for i, f in zip(pool, fold_of, strict=True)])
    t = metrics.get("test", metrics["oof"])
    _log(f"saved ensemble of {cfg.folds} folds {saved}: threshold {thr:.4f} ({policy['method']}, out-of-fold), "
         f"T {temperature:.3f}; {'test' if 'test' in metrics else 'out-of-fold'} FNR {t['fnr']:.4f} FPR {t['fpr']:.4f} "
         f"AUROC {t['auroc']:.4f} ECE {t['ece']:.4f}; out-of-fold FNR {metrics['oof']['fnr']:.4f} "
         f"FPR {metrics['oof']['fpr']:.4f} in {duration:.0f}s")
    _log_policy(policy, "out of fold", temperature)
    return {"out": str(saved), "threshold": thr, "temperature": temperature, "metrics": metrics,
            "members": [str(saved / r["dir"]) for r in member_rows], "folds": member_rows,
            "duration_s": round(duration, 1)}
