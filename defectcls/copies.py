"""Copies of one photo in a folder: turned, mirrored, zoomed or relit versions of the same shot.

Augmented datasets ship such copies side by side (the public casting folder holds a dozen of
many of its bad parts, docs/benchmarks.md, "Copies of one photo"). A split that puts one copy
in training and another in validation or test scores the network on photos it has seen, so
its test metrics and the threshold set on validation are optimistic for new parts.
``copy_groups`` finds the copies, so that ``data.stratified_split`` keeps each group in one part.

Each photo becomes a fingerprint of its part, unrolled around the part's centre
(``data.part_circle``) with radii relative to the part's own, band-passed so that light drift
and the part's round outline (common to every part) drop out: what is left is the part's own
marks, in a frame where a turn is a circular shift and a mirror image a reversal. Candidates
come from a turn- and mirror-free summary (the magnitude of each ring's Fourier series); each
candidate pair is then compared at its best turn, mirror and a small change of zoom, and pairs
that correlate at ``LINK`` or more are linked. Groups are the linked components.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from . import data as D
from .errors import DefectclsError

PARTS = ("train", "val", "test")

RINGS = 48          # radii sampled, from 0.3 to 1.3 of the part's radius
ANGLES = 256        # angles sampled per ring
ZOOMS = (0.985, 1.0, 1.015)   # a copy's part radius is found to within about 1%: compared at these zooms
BAND = (1.0, 4.0)   # difference of Gaussians (sigma in pixels of a 300 px photo): a part's marks, not its light
LINK = 0.99         # correlation at which two photos are copies. Casting folder (docs/benchmarks.md): a bad part's
                    # copies 0.99-0.999, other bad parts under 0.97 but for a few; good parts, whose marks are few,
                    # 0.98-0.995 for many, so some groups of good parts join different parts (a stricter split)
CANDIDATES = 24     # nearest photos by the summary that are compared at their best turn
HARMONICS = 64      # Fourier terms per ring in the summary


def fingerprint(arr: np.ndarray) -> np.ndarray | None:
    """The Fourier series (complex64, ZOOMS x RINGS x ANGLES//2+1) of ARR's part unrolled at each zoom; None
    where no part stands out (``data.part_circle``)."""
    gray = arr.astype(np.float32).mean(axis=2) if arr.ndim == 3 else arr.astype(np.float32)
    step = max(gray.shape) // 300
    if step > 1:   # a large photo is reduced to about 300 px first: the marks compared are that coarse anyway
        gray = np.asarray(Image.fromarray(gray).reduce(step), dtype=np.float32)
    found = D.part_circle(gray)
    if found is None:
        return None
    cx, cy, r = found
    s = max(gray.shape) / 300.0
    band = ndi.gaussian_filter(gray, BAND[0] * s) - ndi.gaussian_filter(gray, BAND[1] * s)
    theta = np.linspace(0, 2 * math.pi, ANGLES, endpoint=False)[None, :]
    out = []
    for z in ZOOMS:
        rr = np.linspace(0.3, 1.3, RINGS)[:, None] * r * z
        ring = ndi.map_coordinates(band, [cy - 0.5 + rr * np.sin(theta), cx - 0.5 + rr * np.cos(theta)], order=1)
        ring = ring - ring.mean(axis=1, keepdims=True)   # the part's round outline is every part's: out
        ring /= np.linalg.norm(ring) + 1e-12
        out.append(np.fft.rfft(ring, axis=1))
    return np.stack(out).astype(np.complex64)


def _fingerprint_one(args: tuple[str, str]) -> np.ndarray | None:
    path, color = args
    try:
        return fingerprint(D.load_image(path, color))
    except Exception:   # an unreadable photo is nobody's copy
        return None


def match(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of fingerprints A and B (``fingerprint``) at B's best turn, mirror image and zoom: about 1 for
    copies of one photo."""
    fa = a[len(ZOOMS) // 2]
    # b mirrored is b's series conjugated (up to a one-step turn, which the search over turns covers)
    prods = np.concatenate([fa[None] * np.conj(b), fa[None] * b])
    return float(np.fft.irfft(prods.sum(axis=1), n=ANGLES, axis=-1).max())


def copy_groups(paths: Sequence[str], color: str = "gray", link: float = LINK, workers: int | None = None,
                progress: bool = False) -> np.ndarray:
    """A group number per photo of PATHS; copies of one photo (``match`` >= LINK, linked in chains) share one.
    A photo without a part that stands out, or unreadable, is a group of its own. Holds every photo's
    fingerprint at once, about 150 kB a photo (1 GB for the 6633 casting photos); about 45 s for those on 2 cores."""
    fps = D._map_photos(_fingerprint_one, [(str(p), color) for p in paths], workers, progress)
    n = len(fps)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    ok = [i for i, f in enumerate(fps) if f is not None]
    if len(ok) > 1:
        summary = np.stack([np.abs(fps[i][len(ZOOMS) // 2][:, 1:HARMONICS + 1]).ravel() for i in ok])
        summary /= np.linalg.norm(summary, axis=1, keepdims=True) + 1e-12
        k = min(CANDIDATES, len(ok) - 1)
        for start in range(0, len(ok), 512):   # nearest candidates, a block of rows at a time
            sim = summary[start:start + 512] @ summary.T
            for r in range(sim.shape[0]):
                sim[r, start + r] = -np.inf
            near = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            for r, row in enumerate(near):
                i = ok[start + r]
                for c in row:
                    j = ok[int(c)]
                    if find(i) != find(j) and match(fps[i], fps[j]) >= link:
                        parent[find(i)] = find(j)
    roots = [find(i) for i in range(n)]
    _, groups = np.unique(roots, return_inverse=True)
    return groups.astype(int)


def split_groups(split: dict, names: Sequence[str]) -> list[int] | None:
    """The group number of each of NAMES (paths relative to the training folder) as a model's split.json kept
    them (its ``copy_groups``); a name it does not list stands alone. None for a split made photo by photo."""
    kept = dict(split.get("copy_groups", []))
    return [kept.get(x, -1 - i) for i, x in enumerate(names)] if kept else None


def mixed_groups(paths: list[str], labels: np.ndarray, groups: np.ndarray) -> list[dict]:
    """The groups of copies whose photos carry both labels: one shot called good and bad (a label to check), or
    clean parts linked too loosely. Each: its number and its photos of each class, the largest groups first."""
    out = []
    for g in sorted(D.mixed_shots(labels, groups)):
        members = np.flatnonzero(groups == g)
        out.append({"group": int(g), **{name: [paths[i] for i in members if labels[i] == c]
                                        for c, name in enumerate(D.LABELS)}})
    return sorted(out, key=lambda m: -sum(len(m[name]) for name in D.LABELS))


def report(data: str | os.PathLike, model: str | os.PathLike | None = None, color: str = "gray",
           workers: int | None = None, csv_path: str | os.PathLike | None = None, progress: bool = False,
           against: str | os.PathLike | None = None) -> dict:
    """The copies in folder DATA (good/, bad/): how many groups, how large; with MODEL (a model directory with its
    split.json, trained on DATA), how many of its validation and test photos have a copy in its training part,
    i.e. were scored as photos the network had seen. AGAINST: a second labelled folder (new photos to score):
    how many of its photos are copies of a photo of DATA (with MODEL: of its training part), so a score on it
    is known to measure shots the network saw, or new ones. CSV_PATH: each photo's path, label and group."""
    root = Path(data)
    samples = D.scan_folder(root)
    extra = D.scan_folder(Path(against)) if against is not None else []
    groups = copy_groups([s.path for s in samples + extra], color, workers=workers, progress=progress)
    groups, extra_groups = groups[:len(samples)], groups[len(samples):]
    labels = np.array([s.label for s in samples])
    sizes = np.bincount(groups)   # within DATA
    res = {"data": str(root), "n": len(samples), "groups": int((sizes > 0).sum()), "largest": int(sizes.max()),
           "with_copy": int((sizes[groups] > 1).sum()),
           "groups_by_class": {name: len(set(groups[labels == c].tolist())) for c, name in enumerate(D.LABELS)},
           "mixed": mixed_groups([str(s.path) for s in samples], labels, groups)}
    if csv_path:
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "group"])
            for s, g in zip(samples + extra, np.r_[groups, extra_groups], strict=True):
                w.writerow([s.path, D.LABELS[s.label], int(g)])
        res["csv"] = str(csv_path)
    known_groups = set(groups.tolist())
    if model is not None:
        split_file = Path(model) / "split.json"
        if not split_file.is_file():
            raise DefectclsError(f"--model {model}: no split.json (not a model directory trained by defectcls train)")
        split = json.loads(split_file.read_text(encoding="utf-8"))
        group_of = {os.path.relpath(s.path, root): int(g) for s, g in zip(samples, groups, strict=True)}
        known = {name: [(rel, lab) for rel, lab in split.get(name, []) if rel in group_of] for name in PARTS}
        if not any(known.values()):
            raise DefectclsError(f"--model {model}: its split.json names none of the photos in {root}")
        seen = {group_of[rel] for rel, _ in known["train"]}
        known_groups = seen
        res["model"] = str(model)
        res["seen_in_training"] = {
            name: {D.LABELS[c]: [sum(group_of[rel] in seen for rel, lab in known[name] if lab == c),
                                    sum(lab == c for _, lab in known[name])] for c in range(len(D.LABELS))}
            for name in ("val", "test") if known[name]}
    if against is not None:
        res["against"] = str(against)
        res["against_seen"] = {name: [sum(int(g) in known_groups for s, g in zip(extra, extra_groups, strict=True)
                                          if s.label == c), sum(s.label == c for s in extra)]
                               for c, name in enumerate(D.LABELS)}
    return res


def report_text(res: dict) -> str:
    """``report``'s findings as lines for a terminal."""
    by = ", ".join(f"{v} {k}" for k, v in res["groups_by_class"].items())
    lines = [f"{res['n']} photos in {res['groups']} groups of copies ({by}); the largest holds {res['largest']}; "
             f"{res['with_copy']} photos have at least one copy"]
    for m in res.get("mixed", []):
        lines.append(f"group {m['group']} is labelled both ways (check its labels): "
                     + "; ".join(f"{len(m[k])} {k}, e.g. {m[k][0]}" for k in D.LABELS))
    for name, counts in res.get("seen_in_training", {}).items():
        parts = "; ".join(f"{k} {a} of {b}" for k, (a, b) in counts.items())
        lines.append(f"{res['model']} {name} part: a copy in its training part: {parts}")
    if "against" in res:
        parts = "; ".join(f"{k} {a} of {b}" for k, (a, b) in res["against_seen"].items())
        where = f"{res['model']}'s training part" if "model" in res else res["data"]
        lines.append(f"{res['against']}: a copy in {where}: {parts}")
    if "csv" in res:
        lines.append(f"groups written to {res['csv']}")
    return "\n".join(lines)
