"""Training loop: imbalance-aware, FNR-first early stopping, calibration and threshold, DDP-ready."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from .augment import AugConfig, augment
from .config import resolve_device, seed_everything
from .errors import DefectclsError
from .evaluate import choose_threshold, compute_metrics, fit_temperature, fpr_at_fnr, prob_bad_from_logits
from .models import ModelCard, build_model, save_model_dir

SPLIT_FILE = "split.json"


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "mobilenet_v3_large"
    epochs: int = 15
    img_size: int = 224
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    color: str = "gray"
    seed: int = 0
    device: str = "auto"
    target_fnr: float = 0.01
    threshold_method: str = "conformal"
    patience: int = 6
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    balance: str = "loss"             # loss | sampler | none
    pretrained: bool = False
    pretrained_file: str | None = None
    extra_labels: str | None = None
    max_per_class: tuple[int, int] | None = None  # seeded subset (good, bad) of the training part
    fp16_weights: bool = False
    workers: int | None = None
    disk_cache: bool = True
    progress: bool = True
    aug: AugConfig = field(default_factory=AugConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["split"] = list(self.split)
        return d


# ---------------------------------------------------------------- distributed helpers

def _dist_info() -> tuple[int, int, bool]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, world > 1


def _log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(msg, flush=True)


def to_input(batch_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NxCxHxW -> normalised float (the tensor twin of data.normalize)."""
    return (batch_u8.float() / 255.0 - mean) / std


@torch.inference_mode()
def predict_logits(model: nn.Module, images_u8: np.ndarray, mean: torch.Tensor, std: torch.Tensor,
                   device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Logits for cached uint8 images, no augmentation."""
    model.eval()
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = to_input(torch.from_numpy(images_u8[i:i + batch_size]).to(device), mean, std)
        out.append(model(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 2), np.float32)


def _selection_score(y: np.ndarray, prob: np.ndarray, loss: float, target_fnr: float) -> tuple[float, float]:
    """Lower is better: FPR at the threshold meeting the target FNR on validation, then loss."""
    return (fpr_at_fnr(y, prob, target_fnr), loss)


def _subset(idx: list[int], labels: np.ndarray, max_per_class: tuple[int, int], seed: int) -> list[int]:
    rng = np.random.default_rng(seed + 1)
    out = []
    for cls, cap in enumerate(max_per_class):
        members = [i for i in idx if labels[i] == cls]
        out += rng.permutation(members)[:cap].tolist() if len(members) > cap else members
    return sorted(out)


def train(cfg: TrainConfig) -> dict:
    """Train a model on CFG.data and write a model directory to CFG.out; returns a summary."""
    rank, world, distributed = _dist_info()
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

    # ---- data
    root = Path(cfg.data)
    samples = D.scan_folder(root)
    if cfg.extra_labels:
        samples, overridden, added = D.merge_labels(samples, D.read_label_csv(cfg.extra_labels))
        _log(f"extra labels {cfg.extra_labels}: {overridden} overridden, {added} added", rank)
    if distributed and rank != 0:
        torch.distributed.barrier()  # let rank 0 decode and fill the disk cache first
    images, ok, failed = D.decode_all(samples, cfg.img_size, cfg.color, cfg.workers, cfg.disk_cache,
                                      progress=cfg.progress and rank == 0)
    if distributed and rank == 0:
        torch.distributed.barrier()
    for _path, reason in failed:
        _log(f"skipped unreadable image: {reason}", rank)
    samples = [samples[i] for i in ok]
    labels = np.array([s.label for s in samples])
    if len(np.unique(labels)) < 2:
        raise DefectclsError("training needs readable images of both classes (good/ and bad/)")
    parts = D.stratified_split(labels.tolist(), tuple(cfg.split), cfg.seed)
    train_idx = parts["train"]
    if cfg.max_per_class:
        train_idx = _subset(train_idx, labels, cfg.max_per_class, cfg.seed)
    val_idx, test_idx = parts["val"], parts["test"]
    if not val_idx:
        raise DefectclsError("validation part is empty: need at least 3 images of each class")
    x_train, y_train = images[train_idx], labels[train_idx]
    x_val, y_val = images[val_idx], labels[val_idx]

    c = images.shape[1]
    if cfg.pretrained or cfg.pretrained_file:
        mean = [0.449] * c if c == 1 else [0.485, 0.456, 0.406]
        std = [0.226] * c if c == 1 else [0.229, 0.224, 0.225]
    else:
        f = x_train.astype(np.float32) / 255.0
        mean = f.mean(axis=(0, 2, 3)).round(4).tolist()
        std = np.maximum(f.std(axis=(0, 2, 3)), 1e-3).round(4).tolist()
        del f
    mean_t = torch.tensor(mean, device=device).view(1, c, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, c, 1, 1)

    # ---- model
    model = build_model(cfg.arch, in_chans=c, num_classes=2, pretrained=cfg.pretrained,
                        pretrained_file=cfg.pretrained_file).to(device).to(memory_format=torch.channels_last)
    net: nn.Module = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    n_bad, n_good = int((y_train == 1).sum()), int((y_train == 0).sum())
    class_w = torch.tensor([len(y_train) / (2 * n_good), len(y_train) / (2 * n_bad)], device=device) \
        if cfg.balance == "loss" else None
    steps_per_epoch = max(1, math.ceil(len(train_idx) / (cfg.batch_size * world)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.15)
    _log(f"training {cfg.arch} ({cfg.color}, {cfg.img_size}px) on {device}, world {world}: "
         f"train {len(train_idx)} ({n_good} good / {n_bad} bad), val {len(val_idx)}, test {len(test_idx)}", rank)

    best_score, best_state, best_epoch, history = (math.inf, math.inf), None, -1, []
    stale = 0
    for epoch in range(cfg.epochs):
        model.train()
        perm_gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        if cfg.balance == "sampler":
            w = np.where(y_train == 1, 0.5 / n_bad, 0.5 / n_good)
            order = torch.multinomial(torch.tensor(w), len(y_train), replacement=True, generator=perm_gen)
        else:
            order = torch.randperm(len(y_train), generator=perm_gen)
        order = order[rank::world]
        bar = range(0, len(order), cfg.batch_size)
        if cfg.progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(bar, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        losses = []
        for i in bar:
            idx = order[i:i + cfg.batch_size].numpy()
            if len(idx) < 2:  # BatchNorm cannot train on a single sample
                continue
            xb = torch.from_numpy(x_train[idx]).to(device).float() / 255.0
            xb = augment(xb, cfg.aug, gen)
            xb = ((xb - mean_t) / std_t).contiguous(memory_format=torch.channels_last)
            yb = torch.from_numpy(y_train[idx]).to(device)
            loss = F.cross_entropy(net(xb), yb, weight=class_w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
            losses.append(loss.item())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        stop = torch.zeros(1)
        if rank == 0:
            logits = predict_logits(model, x_val, mean_t, std_t, device)
            val_loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_val)))
            prob = prob_bad_from_logits(logits)
            m = compute_metrics(y_val, prob, 0.5)
            score = _selection_score(y_val, prob, val_loss, cfg.target_fnr)
            history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
                            "val_fnr": m["fnr"], "val_fpr": m["fpr"], "val_auroc": m["auroc"],
                            "val_fpr_at_target_fnr": score[0]})
            improved = score < best_score
            if improved:
                best_score, best_epoch, stale = score, epoch + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            _log(f"epoch {epoch + 1}/{cfg.epochs} loss {np.mean(losses):.4f} | val loss {val_loss:.4f} "
                 f"FNR {m['fnr']:.3f} FPR {m['fpr']:.3f} AUROC {m['auroc']:.4f} "
                 f"FPR@FNR<={cfg.target_fnr:g} {score[0]:.3f}{' *' if improved else ''}")
            stop[0] = float(stale >= cfg.patience)
        if distributed:
            torch.distributed.broadcast(stop, 0)
        if stop.item():
            _log(f"early stop: no better validation score for {cfg.patience} epochs", rank)
            break

    summary: dict = {}
    if rank == 0:
        model.load_state_dict(best_state)
        logits_val = predict_logits(model, x_val, mean_t, std_t, device)
        temperature = fit_temperature(logits_val, y_val)
        prob_val = prob_bad_from_logits(logits_val, temperature)
        policy = choose_threshold(y_val, prob_val, cfg.target_fnr, cfg.threshold_method)
        thr = policy["threshold"]
        metrics = {"val": compute_metrics(y_val, prob_val, thr)}
        if test_idx:
            prob_test = prob_bad_from_logits(predict_logits(model, images[test_idx], mean_t, std_t, device), temperature)
            metrics["test"] = compute_metrics(labels[test_idx], prob_test, thr)
        duration = time.perf_counter() - t0
        card = ModelCard(
            arch=cfg.arch, in_chans=c, color=cfg.color, img_size=cfg.img_size, mean=mean, std=std,
            threshold=thr, temperature=temperature, threshold_policy=policy, metrics=metrics,
            train={"config": cfg.to_dict(), "data_root": str(root.resolve()),
                   "data_fingerprint": D.fingerprint(samples), "seed": cfg.seed, "device": str(device),
                   "world_size": world, "best_epoch": best_epoch, "epochs_run": len(history),
                   "duration_s": round(duration, 1), "history": history, "skipped": [p for p, _ in failed],
                   "n": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)}},
        )
        out = save_model_dir(model.cpu().to(memory_format=torch.contiguous_format), card, cfg.out,
                             fp16=cfg.fp16_weights)
        rel = lambda i: os.path.relpath(samples[i].path, root)  # noqa: E731
        split = {"data_root": str(root.resolve()), "data_fingerprint": card.train["data_fingerprint"],
                 "seed": cfg.seed, **{k: [[rel(i), int(labels[i])] for i in v]
                                      for k, v in (("train", train_idx), ("val", val_idx), ("test", test_idx))}}
        (out / SPLIT_FILE).write_text(json.dumps(split) + "\n", encoding="utf-8")
        summary = {"out": str(out), "threshold": thr, "temperature": temperature, "metrics": metrics,
                   "best_epoch": best_epoch, "duration_s": round(duration, 1)}
        t = metrics.get("test", metrics["val"])
        _log(f"saved {out}: threshold {thr:.4f} ({policy['method']}), T {temperature:.3f}; "
             f"{'test' if 'test' in metrics else 'val'} FNR {t['fnr']:.4f} FPR {t['fpr']:.4f} AUROC {t['auroc']:.4f} "
             f"ECE {t['ece']:.4f} in {duration:.0f}s")
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary
