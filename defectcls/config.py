"""Dataclass configs (training recipe, augmentation), seeding and device selection.

Imports no torch at module level, so the command line builds its parsers fast and
an edge box without PyTorch can still run `defectcls inspect` on ONNX models.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import asdict, dataclass, field, replace

import numpy as np


def seed_everything(seed: int):
    """Seed Python, NumPy and torch; return a torch Generator for augmentation."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters
MALLOC_KEEP = 1 << 30


def tune_malloc() -> bool:
    """Keep up to 1 GiB of freed memory in the process instead of handing every large tensor back to the kernel.

    glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh pages that the kernel zeroes each
    time: scoring a 448 px network with 8 views on the CPU spent as much time in the kernel as computing
    (docs/benchmarks-speed.md). Linux with glibc only; elsewhere, or with DEFECTCLS_MALLOC=default, nothing
    changes. Returns whether it applied.
    """
    if os.environ.get("DEFECTCLS_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MALLOC_KEEP)) and bool(mallopt(M_TRIM_THRESHOLD, MALLOC_KEEP))


def resolve_device(device: str = "auto"):
    """'auto' picks CUDA when present, else CPU; anything else is passed to torch."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import DefectclsError

        raise DefectclsError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def env_path(name: str, default: str) -> str:
    """A directory setting from the environment (DEFECTCLS_MODELS_DIR, DEFECTCLS_REVIEW_DIR)."""
    return os.environ.get(name) or default


def models_dir() -> str:
    return env_path("DEFECTCLS_MODELS_DIR", "models")


def review_dir() -> str:
    return env_path("DEFECTCLS_REVIEW_DIR", "review_queue")


# With target 0 the threshold is this share of the lowest validation bad score. A new part's lowest bad score falls
# below validation's about half the time; on the casting photos, over six networks of the default recipe, the log of
# (lowest test / lowest validation) had a spread that puts it under log 0.25 about one time in 17 (Student t, the ratio
# symmetric as the two parts are exchangeable; docs/benchmarks.md, section 3, "How far under the lowest").
NO_MISS_SHARE = 0.25
# ... and never above the score that rejects this share of the validation good parts. The lowest validation bad score
# says nothing when validation drew none of the few bad parts a network scores among its good ones (on the casting
# photos 2-8 pin marks per network, dealt between validation and test at random): then a share of it sits above them
# all. Re-splitting seven networks' held-out photos 1000 times (``defectcls experiment threshold``), the chance of a
# clean miss on the test part fell from 7.5% to 2.2% (mean over the seven) and the mean false alarms rose from 30.5%
# to 31.2% (docs/benchmarks.md, section 3, "When validation draws none of the hard parts").
NO_MISS_MIN_FPR = 0.08


def no_miss_problem(share: float | None, min_fpr: float | None,
                    names: tuple[str, str] = ("no-miss share", "no-miss least FPR")) -> str | None:
    """What is wrong with a no-miss share (in (0, 1]) and least FPR (in [0, 1)), NAMES as the caller calls them;
    None when both are fine (None stands for "as the model was trained")."""
    if share is not None and not 0.0 < share <= 1.0:
        return f"{names[0]} must be in (0, 1], got {share:g}"
    if min_fpr is not None and not 0.0 <= min_fpr < 1.0:
        return f"{names[1]} must be in [0, 1), got {min_fpr:g}"
    return None


@dataclass
class AugConfig:
    rotate: bool = True          # any angle: the part is round
    flip: bool = True            # horizontal and vertical
    scale: float = 0.15          # zoom in [1-scale, 1+scale]           (perturb: scale0.9, scale1.1)
    shift: float = 0.06          # translation, fraction of the side     (perturb: +-5%)
    fill_border_p: float = 0.3   # share of the batch filled with the nearest border pixel instead of the border median
    fill_reflect_p: float = 0.0  # share filled with the photo's mirror image across its edge
    fill_const_p: float = 0.0    # share filled with a constant: black, white or a random grey, a third each
                                 # (perturb group ``fills``: the same poses with those fills)
    brightness: float = 0.45     # gain in [1-b, 1+b], clipped at white  (perturb: +-25%, stronger: +-40%)
    contrast: float = 0.35       # contrast factor in [1-c, 1+c]         (perturb: -30%, +25%)
    gamma: float = 0.7           # gamma log-uniform in [1/(1+g), 1+g]   (perturb: 0.7, 1.4; stronger: 0.55, 1.7)
    blur_p: float = 0.25         # share of the batch that gets a Gaussian blur
    blur_sigma: float = 1.7      # max blur sigma in pixels of a 300 px image, scaled to the working size (perturb: 1.5)
    noise: float = 0.028         # max Gaussian noise sigma (of 1.0) at working size (perturb: 8/255 at native size,
                                 # which resizing 300 -> 192 px averages down to about 5/255)
    jpeg_p: float = 0.25         # share of the batch re-encoded as JPEG
    jpeg_quality: int = 25       # lowest JPEG quality (uniform up to 95)  (perturb: 30)
    bad_degrade: float = 0.75    # blur sigma and JPEG quality loss on bad parts, as a share of the above
                                 # (why 0.75: augment.photometric)
    ramp_start: float = 0.3      # share of training with pose augmentation only (learns the defects first)
    ramp: float = 0.6            # share of training after which light/sensor/zoom augmentation is at full strength
    paint_bad: float = 0.0       # share of the good parts in a batch given a painted dark blotch on the part's ring and
                                 # trained as bad (``augment.paint_defects``); 0: off. Not scaled by the ramp

    def to_dict(self) -> dict:
        return asdict(self)

    def at_strength(self, s: float) -> AugConfig:
        """This recipe with every magnitude except rotation and flips scaled by S in [0, 1].

        Training starts with pose augmentation only (it learns the defects first), ramps the
        other ranges up between ``ramp_start`` and ``ramp`` of its steps, then trains at full
        strength (it learns to ignore the line's drifts).
        """
        s = float(min(max(s, 0.0), 1.0))
        if s >= 1.0:
            return self
        scaled = {k: getattr(self, k) * s for k in ("scale", "shift", "brightness", "contrast", "gamma", "blur_p",
                                                     "noise", "jpeg_p")}
        return replace(self, **scaled, jpeg_quality=round(95 - (95 - self.jpeg_quality) * s))

    def strength(self, progress: float) -> float:
        """Augmentation strength at PROGRESS (0 at the first step, 1 after the last) of training."""
        if self.ramp <= 0:
            return 1.0
        start = min(max(self.ramp_start, 0.0), self.ramp)
        if progress <= start:
            return 0.0
        return 1.0 if self.ramp <= start else min(1.0, (progress - start) / (self.ramp - start))

    @classmethod
    def preset(cls, name: str) -> AugConfig:
        """'full' (the default recipe), 'light' (pose and mild light only), or 'none'."""
        presets = {"full": cls, "light": cls.light, "none": cls.none}
        if name not in presets:
            raise ValueError(f"unknown augmentation preset {name!r}; choose one of {', '.join(presets)}")
        return presets[name]()

    @classmethod
    def light(cls) -> AugConfig:
        """Pose (any rotation, flips, small zoom and shift) and mild light changes: learns fastest on clean data."""
        return cls(scale=0.1, shift=0.04, brightness=0.2, contrast=0.2, gamma=0.2, blur_p=0, noise=0, jpeg_p=0,
                   ramp_start=0, ramp=0)

    @classmethod
    def none(cls) -> AugConfig:
        return cls(rotate=False, flip=False, scale=0, shift=0, fill_border_p=0, brightness=0, contrast=0, gamma=0,
                   blur_p=0, blur_sigma=0, noise=0, jpeg_p=0, ramp_start=0, ramp=0)


MIXED = ("bad", "keep", "drop")   # what a shot filed under both labels trains as (TrainConfig.mixed)


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "mobilenet_v3_large"
    epochs: int = 10
    epoch_size: int = 4096            # samples per epoch at least: a smaller training set is repeated (reshuffled
                                      # each pass), so a 1350-image set gets the steps of a full-size one; 0: one pass
    img_size: int = 192
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    color: str = "gray"
    seed: int = 0                     # the network's start, the order of its photos and their augmentation
    split_seed: int | None = None     # which photos go to train / val / test (and the folds, the --max-per-class
                                      # subset); None: SEED. Two runs of one split seed and two seeds tell the
                                      # network's luck from the split's draw
    device: str = "auto"
    target_fnr: float = 0.0            # 0: no missed defect (threshold under every validation bad part)
    threshold_method: str = "conformal"
    no_miss_share: float = NO_MISS_SHARE  # target 0: the threshold is this share of the lowest validation bad score,
    no_miss_min_fpr: float = NO_MISS_MIN_FPR  # and rejects at least this share of the validation good parts
    patience: int = 6
    max_minutes: float | None = None  # wall-clock budget of the training loop: no epoch starts that would, at the
                                      # mean epoch length so far, end past it; the best epoch is kept
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    group_copies: bool = True         # copies of one photo (turned, mirrored, zoomed, relit: ``copies.copy_groups``)
                                      # kept in one part of the split (and one fold), so no part scores the
                                      # network on a photo it trained on
    mixed: str = "bad"                # (MIXED) a shot filed under both labels (copies labelled good and bad), in training:
                                      # bad (every copy trains as bad) | keep (each copy as filed) | drop (left out)
    balance: str = "loss"             # loss | sampler | background | shots | none
    hard_share: float = 0.25          # share of each epoch (after the first) drawn again by the photos' recent
                                      # loss (hard examples); 0: off
    rank_weight: float = 0.0          # > 0: beside the class loss, this weight times the mean over a batch's good
                                      # parts of softplus(good margin - a low bad margin), summed over the batch's
    rank_k: int = 1                   # this many lowest-scored bad parts (rank_loss)
    pretrained: bool = False
    pretrained_file: str | None = None
    extra_labels: str | None = None
    init: str | None = None           # start from this model directory's weights (same arch and colour mode)
    input_norm: str | None = None     # "image" (each image standardised in the network), "none"; None: the
                                      # --init model's, else "image"
    pool: str | None = None           # global pooling "avg" or "avgmax"; None: the --init model's, else the default
    frame: str | None = None          # "part": each photo cropped to a square centred on the part, scaled so the
                                      # part has the training photos' median size; "full": the whole photo;
                                      # None: the --init model's, else "full"
    masks: str | None = None          # folder of defect masks named like the bad images (``synth --masks``):
                                      # the last feature map learns, cell by cell, where the defects are
    mask_weight: float = 1.0          # weight of that mask loss beside the class loss
    ema: float = 0.0                  # > 0: validate and keep an exponential moving average of the weights
                                      # with this decay per step (0.995: about the last 200 steps)
    tta: int = 8                      # test-time views the saved model answers with (1, 4, 8): the threshold and
                                      # temperature are chosen on its validation scores over the same views
    tta_top: int = 0                  # of those, the views with the highest bad margin that are averaged
                                      # (``models.top_views``); 0: all of them. 2 missed fewer new shots on
                                      # the full casting set but did worse on 1350 photos (docs/benchmarks.md,
                                      # section 7, "The two most suspicious views")
    max_per_class: tuple[int, int] | None = None  # seeded subset (good, bad) of the training part
    folds: int = 1                    # K > 1: K-fold cross-validation, K members + their ensemble (train_folds)
    focus_restore: bool = True        # photos softer than the training photos' low end are sharpened back before the
                                      # model sees them (``data.restore_focus``; the card's ``focus_below``)
    fp16_weights: bool = False
    workers: int | None = None
    disk_cache: bool = True
    progress: bool = True
    aug: AugConfig = field(default_factory=AugConfig)

    @property
    def data_seed(self) -> int:
        """The seed of the split, the folds and the --max-per-class subset."""
        return self.seed if self.split_seed is None else self.split_seed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["split"] = list(self.split)
        return d
