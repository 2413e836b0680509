"""Metrics (FNR first), threshold policy, temperature calibration and report plots."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .config import NO_MISS_MIN_FPR, NO_MISS_SHARE, no_miss_problem
from .data import LABELS, verdict


def _held(held: Sequence[bool] | None, n: int) -> np.ndarray:
    """HELD as a bool array of N (none held when None)."""
    return np.zeros(n, bool) if held is None else np.asarray(held, dtype=bool)


def _judged_bad(y: np.ndarray, p: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Indices of the bad parts a threshold has to catch (those not held), by ascending score."""
    judged = (y == 1) & ~h
    return np.flatnonzero(judged)[np.argsort(p[judged], kind="stable")]


def confusion(y_true: Sequence[int], prob_bad: Sequence[float], threshold: float,
              held: Sequence[bool] | None = None) -> dict[str, int]:
    """Counts with 'bad' as the positive class; a part is bad when prob_bad >= threshold or its photo is
    HELD (``data.verdict``)."""
    y = np.asarray(y_true, dtype=int)
    pred = (np.asarray(prob_bad, dtype=float) >= threshold) | _held(held, len(y))
    return {"tp": int(np.sum(pred & (y == 1))), "fp": int(np.sum(pred & (y == 0))),
            "tn": int(np.sum(~pred & (y == 0))), "fn": int(np.sum(~pred & (y == 1)))}


def expected_calibration_error(y_true: Sequence[int], prob_bad: Sequence[float], bins: int = 10) -> float:
    """ECE over equal-width bins of the confidence in the predicted class."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob_bad, dtype=float)
    if len(y) == 0:
        return float("nan")
    pred = (p >= 0.5).astype(int)
    conf = np.where(pred == 1, p, 1 - p)
    correct = (pred == y).astype(float)
    edges = np.linspace(0.5, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def clopper_pearson_upper(k: int, n: int, conf: float = 0.95) -> float:
    """One-sided upper confidence bound on a rate after K events in N trials."""
    if n == 0:
        return 1.0
    if k >= n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(conf, k + 1, n - k))


def shot_counts(groups, y, p, thr: float, held=None) -> dict:
    """Copies of one photo (GROUPS: each photo's group) counted once: the bad shots and how many have a copy
    missed at THR, as the card's bound counts them; the good shots and how many have a copy rejected (held photos
    are rejected), with the 95% upper bound on the share of new good shots rejected (Clopper-Pearson over shots:
    on a part of a few dozen good shots one shot is a few percent of the photos, and a photo FPR under that
    cannot be told from it)."""
    g, y, p = np.asarray(groups), np.asarray(y), np.asarray(p, dtype=float)
    held = _held(held, len(y))
    missed = (y == 1) & ~held & (p < thr)
    rejected = (y == 0) & (held | (p >= thr))
    good_shots, rejected_shots = int(len(np.unique(g[y == 0]))), int(len(np.unique(g[rejected])))
    return {"bad_shots": int(len(np.unique(g[y == 1]))), "missed_shots": int(len(np.unique(g[missed]))),
            "good_shots": good_shots, "rejected_shots": rejected_shots,
            **({"rejected_shots_upper95": clopper_pearson_upper(rejected_shots, good_shots)} if good_shots else {})}


def count_text(k: int, n: int, k_shots: int | None = None, n_shots: int | None = None) -> str:
    """'41/431', or '41/431 (4/24 shots)' when the counts by shot (``shot_counts``) are given."""
    return f"{k}/{n}" + ("" if n_shots is None else f" ({k_shots}/{n_shots} shots)")


def compute_metrics(y_true: Sequence[int], prob_bad: Sequence[float], threshold: float,
                    held: Sequence[bool] | None = None) -> dict:
    """FNR, FPR, precision, recall, AUROC, AP, ECE and the confusion matrix of the verdicts at THRESHOLD
    (HELD photos judged bad, ``data.verdict``); AUROC, AP and ECE are the model's scores' own, and so is
    ``fpr_at_no_miss``: the FPR of the best threshold that misses none of these bad parts, chosen on these
    very photos (the floor the ranking sets for any no-miss policy, not a rate a policy can promise)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob_bad, dtype=float)
    h = _held(held, len(y))
    c = confusion(y, p, threshold, h)
    n_bad, n_good = c["tp"] + c["fn"], c["tn"] + c["fp"]
    both = n_bad > 0 and n_good > 0
    out = {
        "n": int(len(y)), "n_bad": n_bad, "n_good": n_good, **c,
        "threshold": float(threshold), "held_bad": int(np.sum(h & (y == 1))), "held_good": int(np.sum(h & (y == 0))),
        "fnr": c["fn"] / n_bad if n_bad else float("nan"),
        "fpr": c["fp"] / n_good if n_good else float("nan"),
        "precision": c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else float("nan"),
        "recall": c["tp"] / n_bad if n_bad else float("nan"),
        "accuracy": (c["tp"] + c["tn"]) / len(y) if len(y) else float("nan"),
        "auroc": float(roc_auc_score(y, p)) if both else float("nan"),
        "ap": float(average_precision_score(y, p)) if both else float("nan"),
        "ece": expected_calibration_error(y, p),
        "fnr_upper95": clopper_pearson_upper(c["fn"], n_bad),
        "fpr_at_no_miss": fpr_at_fnr(y, p, 0.0, h) if both else float("nan"),
        "confusion_matrix": [[c["tn"], c["fp"]], [c["fn"], c["tp"]]],
    }
    return out


def fpr_at_fnr(y_true: Sequence[int], prob_bad: Sequence[float], target_fnr: float,
               held: Sequence[bool] | None = None) -> float:
    """Lowest FPR among thresholds whose FNR on these scores is at most TARGET_FNR; HELD parts are bad
    whatever their score (``data.verdict``): their bad parts need no threshold, their good parts are rejected."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob_bad, dtype=float)
    h = _held(held, len(y))
    bad = p[_judged_bad(y, p, h)]
    if len(bad) == 0:
        return float("nan")
    k = int(math.floor(target_fnr * len(bad)))
    t = bad[k]
    good = (p >= t)[y == 0] | h[y == 0]
    return float(np.mean(good)) if len(good) else float("nan")


TRADEOFF_TARGETS = (0.0, 0.005, 0.01, 0.02, 0.05)   # the FNR targets a policy's ``tradeoff`` shows beside its own


def choose_threshold(y_true: Sequence[int], prob_bad: Sequence[float], target_fnr: float = 0.01,
                     method: str = "conformal", names: Sequence[str] | None = None,
                     held: Sequence[bool] | None = None, no_miss_share: float = NO_MISS_SHARE,
                     no_miss_min_fpr: float = NO_MISS_MIN_FPR, groups: Sequence[int] | None = None) -> dict:
    """Pick the decision threshold on validation scores so that FNR on *new* parts meets TARGET_FNR.

    method='conformal': split-conformal on the bad-class scores. With n validation bad
    parts sorted ascending s_1..s_n, the threshold t = s_k with k = floor(target*(n+1))
    guarantees P(new bad part scored below t) <= k/(n+1) <= target (exchangeability).
    When n is too small for the target (k = 0) no threshold above 0 carries the
    guarantee; we then take NO_MISS_SHARE x s_1 (a margin under the lowest bad score: a new
    part's lowest can fall below it) and report the guarantee that holds, 1/(n+1). That threshold
    is also kept at or under the score of the validation good part that makes NO_MISS_MIN_FPR of
    them rejected (the ceil(share x m)-th highest of m): when validation drew none of the few bad
    parts a network scores among its good ones, s_1 says nothing about them (``config``).
    method='empirical': the largest threshold with validation FNR <= target (optimistic).
    HELD: parts whose photos are held (``data.photo_check``): judged bad whatever their score, so the
    threshold has only the others to catch; their bad parts are left out of the choice (a photo taken
    at a slant can score near 0 and would set every false alarm) and counted in ``held_bad_val``.
    GROUPS (copies of one shot share a number: ``copies.copy_groups``): the exchangeable unit is then the shot,
    not the photo, so the bad scores above are each shot's lowest (its copies are not new draws) and n counts
    shots (``n_bad_groups_val``): the guarantee and the bound hold for new shots, and a target above 0 needs
    1 / target shots where it needed as many photos.
    Returns {threshold, method, target_fnr, guaranteed_fnr, fnr_upper95, n_bad_val (those not held), held_bad_val,
    no_miss_share and no_miss_min_fpr (conformal with k = 0: the share of s_1 taken, and the share of good parts
    the threshold rejects at least), floor_by (conformal with k = 0 where that floor set the threshold: the good
    part, its name from NAMES, and its score),
    val_fnr, val_fpr (of the verdicts), set_by, tradeoff}: GUARANTEED_FNR bounds the miss rate on average over
    validation draws; FNR_UPPER95 with 95% confidence over that draw (the Clopper-Pearson bound of the validation
    misses: the miss rate left by the k-th lowest of n scores is Beta(k, n+1-k), whose 95% quantile that is for
    k-1 misses, so for a target above 0 it is the margin the test part's FNR can show over the target). SET_BY
    is the validation bad part the threshold rests on (its name from NAMES, its score) and the score
    of the next one up (``lone_threshold_warning``); TRADEOFF, what the same method gives at each target of
    TRADEOFF_TARGETS and TARGET_FNR ([{target_fnr, threshold, guaranteed_fnr, fnr_upper95, val_fnr, val_fpr}];
    ``tradeoff_text``): where a few bad parts score far below the rest, a target of no miss can cost most good
    parts and 1% next to none.
    """
    if problem := no_miss_problem(no_miss_share, no_miss_min_fpr):
        raise ValueError(problem)
    policy = _choose_threshold(y_true, prob_bad, target_fnr, method, names, held, no_miss_share, no_miss_min_fpr,
                               groups)
    if "set_by" in policy:
        keys = ("target_fnr", "threshold", "guaranteed_fnr", "fnr_upper95", "val_fnr", "val_fpr")
        policy["tradeoff"] = [{k: alt[k] for k in keys} for alt in
                              (policy if t == target_fnr else
                               _choose_threshold(y_true, prob_bad, t, method, held=held, no_miss_share=no_miss_share,
                                                 no_miss_min_fpr=no_miss_min_fpr, groups=groups)
                               for t in sorted({*TRADEOFF_TARGETS, target_fnr}))]
    return policy


def tradeoff_text(policy: dict) -> str | None:
    """A policy's ``tradeoff`` as one line: each FNR target's threshold, and the FNR and FPR it gives where it was
    chosen (None without one)."""
    rows = policy.get("tradeoff")
    if not rows:
        return None
    return "; ".join(f"{r['target_fnr']:g} -> threshold {r['threshold']:.3g}, FNR {r['val_fnr']:.1%}"
                     + (f" (95% bound {r['fnr_upper95']:.1%})" if "fnr_upper95" in r else "")
                     + f", FPR {r['val_fpr']:.1%}" + (" (chosen)" if r["target_fnr"] == policy["target_fnr"] else "")
                     for r in rows if r["val_fpr"] is not None)


def _choose_threshold(y_true: Sequence[int], prob_bad: Sequence[float], target_fnr: float, method: str,
                      names: Sequence[str] | None = None, held: Sequence[bool] | None = None,
                      no_miss_share: float = NO_MISS_SHARE, no_miss_min_fpr: float = NO_MISS_MIN_FPR,
                      groups: Sequence[int] | None = None) -> dict:
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob_bad, dtype=float)
    h = _held(held, len(y))
    order = _judged_bad(y, p, h)
    n_photos = len(order)
    if groups is not None:   # each shot once, by its lowest-scored copy (order is ascending: the first seen)
        g = np.asarray(groups)[order]
        order = order[np.sort(np.unique(g, return_index=True)[1])]
    bad = p[order]
    n = len(bad)
    if n == 0:
        return {"threshold": 0.5, "method": "default", "target_fnr": target_fnr, "guaranteed_fnr": None,
                "n_bad_val": 0, "held_bad_val": int((h & (y == 1)).sum()),
                "note": "no bad parts in validation" + (" that are not held" if h.any() else "")
                        + ": threshold left at 0.5"}
    floor_by = None
    if method == "conformal":
        k = int(math.floor(target_fnr * (n + 1)))
        guaranteed = max(k, 1) / (n + 1)
        # s_k is 1-indexed; k=0 falls back to s_1 with a margin below it
        t = bad[max(k, 1) - 1]
        if k == 0:
            t = t * no_miss_share
            good = np.flatnonzero((y == 0) & ~h)
            if no_miss_min_fpr > 0 and len(good):
                top = good[np.argsort(-p[good], kind="stable")]
                g = top[math.ceil(no_miss_min_fpr * len(good)) - 1]   # rejecting it and those above: >= the share
                if p[g] < t:
                    t = float(p[g])
                    floor_by = {"name": None if names is None else str(names[g]), "prob_bad": float(p[g])}
        at = max(k, 1) - 1
    elif method == "empirical":
        k = int(math.floor(target_fnr * n))
        t = bad[k]
        at = k
        guaranteed = None
    else:
        raise ValueError(f"unknown threshold method {method!r}")
    t = float(min(max(t, 1e-6), 1.0))
    c = confusion(y, p, t, h)
    n_good = c["tn"] + c["fp"]
    set_by = {"name": None if names is None else str(names[order[at]]), "prob_bad": float(bad[at]),
              "next_prob_bad": float(bad[at + 1]) if at + 1 < n else None}
    return {"threshold": t, "method": method, "target_fnr": target_fnr, "guaranteed_fnr": guaranteed,
            "fnr_upper95": clopper_pearson_upper(int(np.sum(bad < t)), n), "n_bad_val": n_photos,
            **({"n_bad_groups_val": n} if groups is not None else {}),
            "held_bad_val": int((h & (y == 1)).sum()), "val_fnr": c["fn"] / (c["fn"] + c["tp"]),
            "val_fpr": c["fp"] / n_good if n_good else None, "set_by": set_by,
            **({"no_miss_share": no_miss_share, "no_miss_min_fpr": no_miss_min_fpr}
               if method == "conformal" and k == 0 else {}),
            **({"floor_by": floor_by} if floor_by else {})}


LONE_RATIO = 10.0   # the next validation bad part scoring this many times the one a threshold rests on: a lone outlier


def lone_threshold_warning(policy: dict, temperature: float | None = None) -> str | None:
    """A warning when the threshold rests on one validation bad part scored far below the next one up: that
    one photo then sets the false alarms (on the casting photos, one photo taken 42 degrees off the part's
    axis scored 0.00003 against 0.021 for the next, and a seed-regime model rejected 92% of good parts:
    docs/benchmarks.md, section 4). None otherwise. TEMPERATURE: the card's, whose scale the policy's scores are at;
    the ratio is taken at the scale the policy was chosen at (``chosen_at_temperature``), where LONE_RATIO was set."""
    sb = policy.get("set_by") or {}
    if policy.get("floor_by"):
        return None   # the good parts' floor set the threshold, under the share of that part's score
    low, nxt = sb.get("prob_bad"), sb.get("next_prob_bad")
    if low is None or nxt is None:
        return None
    t_pol = policy.get("chosen_at_temperature", temperature) if temperature is not None else None
    lo_pol, nxt_pol = (low, nxt) if t_pol is None else (at_temperature(low, temperature, t_pol),
                                                        at_temperature(nxt, temperature, t_pol))
    if nxt_pol < LONE_RATIO * max(lo_pol, 1e-12):   # the ratio at the policy's scale, the text at the card's
        return None
    who = sb.get("name") or "one validation bad part"
    return (f"the threshold rests on {who}, P(bad) {low:.3g}; the next validation bad part scores {nxt:.3g}. "
            "Every good part above the threshold is a false alarm: look at that photo (a slanted camera, a "
            "mislabel, another kind of defect); if the line will not see its like, correct or remove it and train again")


def floor_note(policy: dict) -> str | None:
    """A line when the good parts' floor set a no-miss threshold (``choose_threshold``'s ``floor_by``), else None."""
    fb = policy.get("floor_by")
    if not fb:
        return None
    sb = policy.get("set_by") or {}
    return (f"threshold lowered from {policy['no_miss_share']:g} x {sb.get('prob_bad', float('nan')):.3g} (the lowest "
            f"validation bad part) to {fb['prob_bad']:.3g}, the score of {fb.get('name') or 'a validation good part'}, "
            f"so that it rejects at least {policy['no_miss_min_fpr']:.0%} of the validation good parts: bad parts scored "
            "among them that validation did not draw would pass a share of the lowest (--no-miss-min-fpr)")


def fit_temperature(logits: np.ndarray, y_true: Sequence[int], loss: str = "nll") -> float | None:
    """Temperature T (scalar, > 0) of softmax(logits / T) fitted on validation.

    LOSS "nll": minimising the negative log-likelihood, the classic fit and the scale the threshold policy's share
    and floor were measured in (``threshold_temperatures``). A few confidently wrong parts (a pin-mark bad part
    scored 0.01) dominate it, so on a validation part that drew some it flattens every score. "brier": minimising the
    mean squared error of P(bad), bounded per part, so that the bulk of parts sets T; None where it runs to the end
    of its range (``_fit_brier_temperature``). ``threshold_temperatures`` picks between the two for the card.
    """
    import torch

    if loss not in ("nll", "brier"):
        raise ValueError(f"unknown temperature loss {loss!r}")
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y_true), dtype=torch.long)
    if len(y) == 0 or len(torch.unique(y)) < 2:
        return 1.0
    if loss == "brier":
        return _fit_brier_temperature(z, y)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and 0.01 < t < 100 else 1.0


def _fit_brier_temperature(z, y) -> float | None:
    """The T in (0.01, 100) minimising the mean of (P(bad) - y)^2: a grid over log T, then golden sections within
    the best grid point's neighbours (the loss need not be convex in T; the grid finds the basin). None when the
    best is an end of the range: on a validation part whose few wrong parts cost at most 1 each, squared error can
    always gain by sharpening the rest, and a T at the end of the range is that degenerate answer, not a fit."""
    import torch

    d = (z[:, 1] - z[:, 0]).double()
    yf = (y == 1).double()

    def brier(log_t: float) -> float:
        return float(((torch.sigmoid(d / math.exp(log_t)) - yf) ** 2).mean())

    grid = np.linspace(math.log(0.01), math.log(100.0), 161)
    losses = [brier(g) for g in grid]
    i = int(np.argmin(losses))
    if i in (0, len(grid) - 1):
        return None
    lo, hi = grid[i - 1], grid[i + 1]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = brier(a), brier(b)
    for _ in range(60):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = brier(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = brier(b)
    best = min(((fa, a), (fb, b), (losses[i], grid[i])))[1]
    return float(math.exp(best))


def threshold_temperatures(logits: np.ndarray, y_true: Sequence[int]) -> tuple[float, float]:
    """(the card's temperature, the threshold policy's) from validation LOGITS. The policy's is the NLL fit, the
    scale its share and floor were measured in. The card's, the confidence a user reads, is whichever of the NLL
    and the squared-error fit (``fit_temperature``) leaves the lower validation ECE (the NLL fit on a tie, or when
    the squared-error fit runs to the end of its range): neither fit is the better one on every network
    (docs/benchmarks.md, section 3, "Confidence fitted by squared error")."""
    t_nll = fit_temperature(logits, y_true)
    t_brier = fit_temperature(logits, y_true, "brier")
    if t_brier is None or t_brier == t_nll:
        return t_nll, t_nll
    ece = {t: expected_calibration_error(y_true, prob_bad_from_logits(logits, t)) for t in (t_nll, t_brier)}
    return (t_brier if ece[t_brier] < ece[t_nll] else t_nll), t_nll


def at_temperature(prob_bad, t_from: float, t_to: float):
    """P(bad) given at temperature T_FROM, at T_TO instead: the same logits, so the same order and the same side of a
    threshold moved alike (``policy_at_temperature``). A float for a float; PROB_BAD as it is when T_FROM == T_TO."""
    from scipy.special import expit, logit

    if t_from == t_to:
        return float(prob_bad) if np.ndim(prob_bad) == 0 else np.asarray(prob_bad, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore"):
        out = expit(logit(np.asarray(prob_bad, dtype=np.float64)) * (t_from / t_to))
    return float(out) if np.ndim(out) == 0 else out


def policy_at_temperature(policy: dict, t_from: float, t_to: float) -> dict:
    """POLICY (``choose_threshold``'s, its scores P(bad) at temperature T_FROM) with every score at T_TO: the
    threshold, the parts it rests on and the trade-off's thresholds. Each validation part stays on its side of the
    threshold (the threshold is nudged down by a billionth, so that a part scored at it, rejected, stays rejected
    after rounding), so the rates are unchanged. Records T_FROM as ``chosen_at_temperature``: the share and the floor
    were taken at that scale. T_FROM == T_TO returns POLICY with the record alone."""
    out = json.loads(json.dumps(policy))
    out["chosen_at_temperature"] = float(t_from)
    if t_from == t_to or "threshold" not in out:
        return out

    def move(p):
        return None if p is None else at_temperature(p, t_from, t_to)

    def thr(p):
        return max(move(p) * (1 - 1e-9), np.finfo(np.float64).tiny)

    out["threshold"] = thr(out["threshold"])
    for key in ("set_by", "floor_by"):
        for k in ("prob_bad", "next_prob_bad"):
            if isinstance(out.get(key), dict) and k in out[key]:
                out[key][k] = move(out[key][k])
    for row in out.get("tradeoff") or ():
        row["threshold"] = thr(row["threshold"])
    return out


def calibrated_policy(logits: np.ndarray, y_true: Sequence[int], target_fnr: float, method: str = "conformal",
                      **choose) -> tuple[float, dict]:
    """(the card's temperature, its threshold policy) from validation LOGITS: the temperatures of
    ``threshold_temperatures``, the policy chosen at the NLL one (``choose_threshold`` with CHOOSE's keywords) and
    moved to the card's (``policy_at_temperature``)."""
    temperature, t_policy = threshold_temperatures(logits, y_true)
    policy = choose_threshold(y_true, prob_bad_from_logits(logits, t_policy), target_fnr, method, **choose)
    return temperature, policy_at_temperature(policy, t_policy, temperature)


def policy_temperature(card) -> float:
    """The temperature a card's threshold policy was chosen at (``chosen_at_temperature``; a card from before it:
    its own temperature)."""
    return float((card.threshold_policy or {}).get("chosen_at_temperature", card.temperature))


def prob_bad_from_logits(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Calibrated P(bad) from 2-class logits."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return np.exp(-np.logaddexp(0.0, -(z[:, 1] - z[:, 0])))   # sigmoid, without overflow for confident logits


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def to_json(obj) -> str:
    """JSON with NaN/inf written as null."""
    return json.dumps(_jsonable(obj))


def write_scores_csv(path: str | os.PathLike, paths: Sequence[str], labels: Sequence[int],
                     columns: dict[str, Sequence]) -> None:
    """One row per photo: path, label (good/bad), then each of COLUMNS (numbers at full precision)."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", *columns])
        for i, (pth, y) in enumerate(zip(paths, labels, strict=True)):
            w.writerow([pth, LABELS[int(y)],
                        *(v if isinstance(v := col[i], str) else repr(float(v)) for col in columns.values())])


def write_report(report_dir: str | os.PathLike, y_true: Sequence[int], prob_bad: Sequence[float],
                 metrics: dict, title: str = "", paths: Sequence[str] | None = None,
                 held: Sequence[bool] | None = None) -> list[str]:
    """ROC, confusion-matrix and reliability plots (PNG) plus metrics.json, and with PATHS (the photos
    in the order of Y_TRUE) scores.csv: each photo's P(bad), whether it is HELD, and its verdict.
    Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob_bad, dtype=float)
    files = []

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2, label=f"AUROC {metrics.get('auroc', float('nan')):.4f}")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="false positive rate (good parts rejected)", ylabel="true positive rate (bad parts caught)",
           title=f"ROC {title}".strip())
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    files.append(str(out / "roc.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4, 4))
    cm = np.asarray(metrics["confusion_matrix"])
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14, color="black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["good", "bad"], yticklabels=["good", "bad"],
           xlabel="predicted", ylabel="true", title=f"threshold {metrics['threshold']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    files.append(str(out / "confusion.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    edges = np.linspace(0, 1, 11)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, 9)
    xs, ys, ns = [], [], []
    for b in range(10):
        m = idx == b
        if m.any():
            xs.append(p[m].mean())
            ys.append(y[m].mean())
            ns.append(int(m.sum()))
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.plot(xs, ys, "o-", label=f"ECE {metrics.get('ece', float('nan')):.4f}")
    ax.set(xlabel="predicted P(bad)", ylabel="observed share of bad parts", title="reliability")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=100)
    files.append(str(out / "reliability.png"))
    plt.close(fig)

    (out / "metrics.json").write_text(to_json(metrics) + "\n", encoding="utf-8")
    files.append(str(out / "metrics.json"))
    if paths is not None:
        h = _held(held, len(y))
        write_scores_csv(out / "scores.csv", paths, y,
                         {"p_bad": p, "held": ["yes" if v else "no" for v in h],
                          "verdict": [verdict(v, metrics["threshold"], hv) for v, hv in zip(p, h, strict=True)]})
        files.append(str(out / "scores.csv"))
    return files
