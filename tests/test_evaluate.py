import numpy as np
import pytest
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

from defectcls import data as D
from defectcls import evaluate as E
from tests.helpers import share_threshold


def _scores(seed=0, n=400):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    return y, p


def test_metrics_match_scikit_learn():
    y, p = _scores()
    m = E.compute_metrics(y, p, 0.45)
    tn, fp, fn, tp = confusion_matrix(y, p >= 0.45).ravel()
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)
    assert m["fnr"] == pytest.approx(fn / (fn + tp)) and m["fpr"] == pytest.approx(fp / (fp + tn))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["ap"] == pytest.approx(average_precision_score(y, p))
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
    for key in ("n", "tp", "fp", "tn", "fn", "fnr", "fpr", "auroc", "ece", "threshold"):
        assert key in m


def test_one_decision_rule_a_score_at_the_threshold_is_bad():
    assert D.verdict(0.25, 0.25) == "bad" and D.verdict(np.nextafter(0.25, 0), 0.25) == "good"
    y, p = _scores(seed=3)
    thr = float(np.sort(p)[150])                 # a threshold equal to one of the scores
    c = E.confusion(y, p, thr)
    labels = [D.verdict(v, thr) for v in p]
    assert c["tp"] + c["fp"] == labels.count("bad") and c["tn"] + c["fn"] == labels.count("good")
    assert c["tp"] == sum(lab == "bad" and t == 1 for lab, t in zip(labels, y, strict=True))


def test_ece_is_zero_when_calibrated_and_large_when_not():
    y = np.array([1] * 8 + [0] * 2 + [0] * 8 + [1] * 2)
    p = np.array([0.8] * 10 + [0.2] * 10)
    assert E.expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)
    assert E.expected_calibration_error(y, np.where(p > 0.5, 0.99, 0.01)) == pytest.approx(0.19, abs=1e-9)


def test_conformal_threshold_meets_target_on_new_scores():
    """Over many validation/test draws the miss rate on new bad parts stays at or below the target."""
    rng = np.random.default_rng(0)
    misses = total = 0
    for _ in range(200):
        val_bad = rng.beta(5, 2, 199)
        t = E.choose_threshold(np.ones(199, int), val_bad, target_fnr=0.05)
        assert t["guaranteed_fnr"] <= 0.05
        test_bad = rng.beta(5, 2, 200)
        misses += int((test_bad < t["threshold"]).sum())
        total += 200
    assert misses / total <= 0.05 + 0.005


def test_threshold_with_few_bad_parts_reports_its_real_guarantee():
    y = np.array([0] * 50 + [1] * 10)
    p = np.concatenate([np.linspace(0, 0.3, 50), np.linspace(0.6, 1, 10)])
    t = E.choose_threshold(y, p, target_fnr=0.01)
    assert t["threshold"] < 0.6 and t["val_fnr"] == 0
    assert t["guaranteed_fnr"] == pytest.approx(1 / 11)
    emp = E.choose_threshold(y, p, target_fnr=0.01, method="empirical")
    assert emp["threshold"] == pytest.approx(0.6)


def test_copies_of_one_shot_count_once_in_the_threshold_and_its_guarantee():
    """Ten bad shots of ten copies each: a 5% target is 5 of 101 photos, but 0 of 11 shots, so with the groups the
    policy falls back to no miss and its guarantee is 1/11; the lowest copy of each shot is what counts."""
    y = np.array([0] * 100 + [1] * 100)
    shot_low = np.linspace(0.2, 0.9, 10)
    bad = np.concatenate([low + np.linspace(0, 0.05, 10) for low in shot_low])
    p = np.concatenate([np.linspace(0, 0.1, 100), bad])
    groups = np.concatenate([np.arange(100), 1000 + np.repeat(np.arange(10), 10)])
    photos = E.choose_threshold(y, p, target_fnr=0.05, no_miss_min_fpr=0)
    shots = E.choose_threshold(y, p, target_fnr=0.05, no_miss_min_fpr=0, groups=groups)
    assert photos["threshold"] > 0.2 and photos["guaranteed_fnr"] == pytest.approx(5 / 101)
    assert shots["threshold"] == pytest.approx(0.2 * E.NO_MISS_SHARE) and shots["val_fnr"] == 0
    assert shots["guaranteed_fnr"] == pytest.approx(1 / 11)
    assert shots["n_bad_groups_val"] == 10 and shots["n_bad_val"] == 100 and "n_bad_groups_val" not in photos
    # 2 shots of 11 for a 20% target: the threshold is the second shot's lowest copy, not the 20th photo
    twenty = E.choose_threshold(y, p, target_fnr=0.2, groups=groups)
    assert twenty["threshold"] == pytest.approx(shot_low[1]) and twenty["guaranteed_fnr"] == pytest.approx(2 / 11)


def test_threshold_names_the_bad_part_it_rests_on_and_warns_when_it_is_a_lone_outlier():
    y = np.array([0] * 6 + [1] * 4)
    names = [f"good/{i}.png" for i in range(6)] + ["bad/a.png", "bad/slanted.png", "bad/c.png", "bad/d.png"]
    p = np.array([0.001, 0.002, 0.004, 0.01, 0.03, 0.05, 0.9, 0.00003, 0.02, 0.95])
    t = E.choose_threshold(y, p, target_fnr=0.0, names=names)
    assert t["set_by"] == {"name": "bad/slanted.png", "prob_bad": 0.00003, "next_prob_bad": 0.02}
    assert t["threshold"] == pytest.approx(0.00003 * E.NO_MISS_SHARE) and t["val_fpr"] == 1.0   # one photo: every good part
    warning = E.lone_threshold_warning(t)
    assert "bad/slanted.png" in warning and "0.02" in warning
    p[7] = 0.015                                             # the lowest close to the next: no warning
    t = E.choose_threshold(y, p, target_fnr=0.0, names=names)
    assert t["set_by"]["name"] == "bad/slanted.png" and E.lone_threshold_warning(t) is None
    assert E.choose_threshold(y, p, target_fnr=0.0)["set_by"]["name"] is None      # no names given
    assert E.lone_threshold_warning({"threshold": 0.5}) is None                   # cards from before set_by
    # the ratio is taken at the scale the policy was chosen at: 0.33 and 0.55 there, 17 times apart at a card's
    # sharper temperature (4.4 times sharper), is no lone outlier
    at_nll = {"threshold": 0.08, "set_by": {"name": "bad/a.png", "prob_bad": 0.33, "next_prob_bad": 0.55}}
    moved = E.policy_at_temperature(at_nll, 0.93, 0.21)
    assert moved["set_by"]["next_prob_bad"] > E.LONE_RATIO * moved["set_by"]["prob_bad"]
    assert E.lone_threshold_warning(moved, 0.21) is None and E.lone_threshold_warning(at_nll) is None
    one = E.choose_threshold(np.array([0, 1]), np.array([0.1, 0.5]), target_fnr=0.0)
    assert one["set_by"]["next_prob_bad"] is None and E.lone_threshold_warning(one) is None


def test_no_miss_share_sets_the_margin_under_the_lowest_bad_score_and_only_for_target_0():
    from defectcls.config import TrainConfig

    y = np.array([0] * 5 + [1] * 4)
    p = np.array([0.001, 0.004, 0.01, 0.02, 0.06, 0.05, 0.3, 0.8, 0.9])
    for share in (0.25, E.NO_MISS_SHARE, 0.5, 1.0):
        t = E.choose_threshold(y, p, target_fnr=0.0, no_miss_share=share)
        assert t["threshold"] == pytest.approx(0.05 * share) and t["no_miss_share"] == share
    assert E.choose_threshold(y, p, 0.0)["val_fpr"] == pytest.approx(2 / 5)   # 0.0175: 0.02 and 0.06 rejected
    assert E.choose_threshold(y, p, 0.0, no_miss_share=1.0)["val_fpr"] == pytest.approx(1 / 5)
    big = np.concatenate([np.zeros(10, int), np.ones(200, int)])
    pb = np.concatenate([np.linspace(0.0, 0.1, 10), np.linspace(0.2, 1.0, 200)])
    above = E.choose_threshold(big, pb, 0.02, no_miss_share=0.1)        # k = 4: the 4th lowest, no share
    assert above["threshold"] == pytest.approx(pb[10 + 3]) and "no_miss_share" not in above
    assert above["tradeoff"][0]["threshold"] == pytest.approx(0.1 * 0.2)   # its target-0 row takes the share
    assert "no_miss_share" not in E.choose_threshold(y, p, 0.0, method="empirical")
    for bad_share in (0.0, -0.1, 1.2):
        with pytest.raises(ValueError, match="no-miss share"):
            E.choose_threshold(y, p, 0.0, no_miss_share=bad_share)
    assert TrainConfig(data="", out="").no_miss_share == E.NO_MISS_SHARE   # train's default is the policy's


def test_no_miss_threshold_rejects_at_least_the_least_fpr_of_good_parts():
    """Validation that drew none of the few bad parts a network scores among its good ones (pin marks at the good
    parts' top 5%) puts its lowest bad score far above them: a share of it would pass them all. The floor keeps the
    threshold at or under the good part whose rejection makes the least FPR."""
    from defectcls.config import TrainConfig

    good = np.linspace(0.0, 0.1, 100)                     # 100 good parts, the top 8 at 0.0929-0.1
    y = np.array([0] * 100 + [1] * 50)
    p = np.concatenate([good, np.linspace(0.9, 1.0, 50)])   # no pin mark drawn: the lowest bad 0.9
    names = [f"good/{i}" for i in range(100)] + [f"bad/{i}" for i in range(50)]
    t = E.choose_threshold(y, p, 0.0, names=names)
    assert t["threshold"] == pytest.approx(good[92]) and good[92] < 0.9 * E.NO_MISS_SHARE   # the 8th highest: 8 rejected
    assert t["val_fpr"] == pytest.approx(E.NO_MISS_MIN_FPR) and t["no_miss_min_fpr"] == E.NO_MISS_MIN_FPR
    assert t["floor_by"] == {"name": "good/92", "prob_bad": pytest.approx(good[92])}
    assert t["tradeoff"][0]["threshold"] == t["threshold"]                      # the target-0 row takes it too
    note = E.floor_note(t)
    assert "0.25 x 0.9" in note and "good/92" in note and "8% of the validation good parts" in note
    a = E.choose_threshold(y, p, 0.0, no_miss_min_fpr=0.035)   # ceil(3.5) = 4 of 100: at least the share
    assert a["threshold"] == pytest.approx(good[96]) and a["val_fpr"] == pytest.approx(0.04)
    off = E.choose_threshold(y, p, 0.0, no_miss_min_fpr=0.0)
    assert off["threshold"] == pytest.approx(0.9 * E.NO_MISS_SHARE) and "floor_by" not in off
    assert E.floor_note(off) is None
    pin = p.copy()
    pin[100] = 0.05                                             # a pin mark drawn: its share sets it, under the floor
    drawn = E.choose_threshold(y, pin, 0.0, names=names)
    assert drawn["threshold"] == pytest.approx(0.05 * E.NO_MISS_SHARE) and "floor_by" not in drawn
    assert drawn["val_fpr"] > E.NO_MISS_MIN_FPR
    held = np.zeros(150, bool)
    held[95:100] = True                                         # held good parts are rejected anyway: the floor counts the rest
    h = E.choose_threshold(y, p, 0.0, held=held, names=names)
    assert h["floor_by"]["name"] == f"good/{94 - 7}"            # ceil(0.08 x 95) = 8th highest of the 95 judged
    lone = p.copy()
    lone[100] = 0.5                                             # a lone low bad part, but the floor sets the threshold
    assert E.lone_threshold_warning(E.choose_threshold(y, lone, 0.0, names=names)) is None
    assert "no_miss_min_fpr" not in E.choose_threshold(y, p, 0.02) and "floor_by" not in E.choose_threshold(y, p, 0.02)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="least FPR"):
            E.choose_threshold(y, p, 0.0, no_miss_min_fpr=bad)
    assert TrainConfig(data="", out="").no_miss_min_fpr == E.NO_MISS_MIN_FPR   # train's default is the policy's


def test_held_photos_are_judged_bad_and_left_out_of_the_threshold_choice():
    """A photo the model cannot judge (a slanted camera: ``data.photo_check``) is bad whatever its score, so
    the threshold only has the other bad parts to catch, and the metrics count it as the product judges it."""
    y = np.array([0] * 6 + [1] * 4)
    p = np.array([0.001, 0.002, 0.004, 0.01, 0.03, 0.05, 0.9, 0.00003, 0.02, 0.95])
    held = np.array([False] * 5 + [True] + [False, True, False, False])   # a slanted good part and a slanted bad one
    t = E.choose_threshold(y, p, target_fnr=0.0, names=[str(i) for i in range(10)], held=held)
    assert t["threshold"] == pytest.approx(0.02 * E.NO_MISS_SHARE) and t["set_by"]["name"] == "8"   # under the lowest not held
    assert t["n_bad_val"] == 3 and t["held_bad_val"] == 1 and t["val_fnr"] == 0.0
    assert t["val_fpr"] == pytest.approx(3 / 6)         # 0.01 and 0.03 over the threshold, 0.05 held
    m = E.compute_metrics(y, p, t["threshold"], held)
    assert (m["fn"], m["tp"], m["fp"], m["tn"]) == (0, 4, 3, 3) and (m["held_bad"], m["held_good"]) == (1, 1)
    assert m["auroc"] == E.compute_metrics(y, p, t["threshold"])["auroc"]     # the scores' own, holds aside
    assert E.compute_metrics(y, p, 0.5)["fn"] == 2 and E.compute_metrics(y, p, 0.5, held)["fn"] == 1
    everything = E.choose_threshold(y, p, target_fnr=0.0, held=y == 1)    # no bad part left to judge
    assert everything["threshold"] == 0.5 and everything["held_bad_val"] == 4 and "not held" in everything["note"]


def test_threshold_policy_shows_what_each_fnr_target_costs():
    """A few bad parts far below the rest (pin marks the network hardly learnt): a target of no miss rejects most
    good parts, a target of 5% none. The policy shows the whole trade-off, each row chosen as its own target would be."""
    y = np.array([0] * 200 + [1] * 300)
    p = np.concatenate([np.linspace(0, 0.3, 200), np.linspace(0.9, 1, 294), [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]])
    t = E.choose_threshold(y, p, target_fnr=0.0)
    rows = t["tradeoff"]
    assert [r["target_fnr"] for r in rows] == list(E.TRADEOFF_TARGETS)
    for r in rows:
        alone = E.choose_threshold(y, p, target_fnr=r["target_fnr"])
        assert {k: alone[k] for k in r} == r
    # the 95% bound: the miss rate left by the k-th lowest of n bad scores is Beta(k, n+1-k)
    from scipy.stats import beta
    assert rows[2]["fnr_upper95"] == pytest.approx(beta.ppf(0.95, 3, 298))        # 1%: k = floor(0.01 x 301) = 3
    assert rows[0]["fnr_upper95"] == pytest.approx(1 - 0.05 ** (1 / 300))         # no miss in 300
    assert all(r["guaranteed_fnr"] < r["fnr_upper95"] for r in rows)
    low = 0.01 * E.NO_MISS_SHARE                                                   # a share of the lowest bad score
    assert rows[0]["threshold"] == t["threshold"] == pytest.approx(low)
    assert rows[0]["val_fpr"] == pytest.approx(np.mean(np.linspace(0, 0.3, 200) >= low)) and rows[0]["val_fpr"] > 0.95
    assert rows[-1]["val_fpr"] == 0 and rows[-1]["val_fnr"] == pytest.approx(14 / 300)   # 5%: 15 bad parts under it
    assert [r["val_fpr"] for r in rows] == sorted((r["val_fpr"] for r in rows), reverse=True)
    text = E.tradeoff_text(t)
    assert text.count("(chosen)") == 1
    assert text.startswith(f"0 -> threshold {low:.3g}, FNR 0.0% (95% bound 1.0%), FPR {rows[0]['val_fpr']:.1%} (chosen)")
    assert "0.05 -> threshold 0.903, FNR 4.7% (95% bound 7.2%), FPR 0.0%" in text

    own = E.choose_threshold(y, p, target_fnr=0.03)                  # a target of its own joins the rows
    assert [r["target_fnr"] for r in own["tradeoff"]] == [0.0, 0.005, 0.01, 0.02, 0.03, 0.05]
    held = np.zeros(len(y), bool)
    held[-6:] = True                                                 # the six low ones held: no miss costs little
    rows = E.choose_threshold(y, p, 0.0, held=held)["tradeoff"]
    assert rows[0]["threshold"] == pytest.approx(0.9 * E.NO_MISS_SHARE)
    assert rows[0]["val_fpr"] == pytest.approx(np.mean(np.linspace(0, 0.3, 200) >= 0.9 * E.NO_MISS_SHARE))
    assert rows[0]["val_fpr"] < 0.3
    assert all(r["val_fpr"] == 0 for r in rows[1:])
    assert E.tradeoff_text({"threshold": 0.5}) is None               # cards from before the trade-off


def test_temperature_recovers_known_scale():
    rng = np.random.default_rng(1)
    n = 4000
    z = rng.normal(0, 2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    logits = np.stack([np.zeros(n), z * 3.0], 1)  # over-confident by 3x
    assert E.fit_temperature(logits, y) == pytest.approx(3.0, rel=0.1)


def test_brier_temperature_recovers_known_scale_and_is_not_flattened_by_a_few_confident_errors():
    rng = np.random.default_rng(1)
    n = 4000
    z = rng.normal(0, 2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    logits = np.stack([np.zeros(n), z * 3.0], 1)
    assert E.fit_temperature(logits, y, "brier") == pytest.approx(3.0, rel=0.1)
    # a network twice as cautious as it should be (the right T is 0.5) on most parts, and 2% of bad parts it scores as
    # clearly good: NLL flattens every score to pay for those few, squared error keeps the bulk's scale
    def draw(n=1000, k=20):
        zt = rng.normal(0, 6, n)
        yb = (rng.random(n) < 1 / (1 + np.exp(-zt))).astype(int)
        zn = np.concatenate([zt / 2, rng.normal(-3, 0.3, k)])
        return np.stack([np.zeros(len(zn)), zn], 1), np.concatenate([yb, np.ones(k, int)])

    logits2, y2 = draw()
    t_nll, t_brier = E.fit_temperature(logits2, y2), E.fit_temperature(logits2, y2, "brier")
    assert t_brier == pytest.approx(0.5, abs=0.1) and t_nll > 0.65
    fresh, y3 = draw()
    ece = {t: E.expected_calibration_error(y3, E.prob_bad_from_logits(fresh, t)) for t in (t_nll, t_brier)}
    assert ece[t_brier] < ece[t_nll]
    assert E.threshold_temperatures(logits2, y2) == pytest.approx((t_brier, t_nll))   # its validation ECE is lower
    # on a part where the NLL fit leaves the lower ECE, the card keeps it
    logits4, y4 = logits2.copy(), y2.copy()
    logits4[:1000, 1] *= 2                                                   # the bulk as sure as it should be
    t4_nll, t4_brier = E.fit_temperature(logits4, y4), E.fit_temperature(logits4, y4, "brier")
    ece4 = {t: E.expected_calibration_error(y4, E.prob_bad_from_logits(logits4, t)) for t in (t4_nll, t4_brier)}
    assert E.threshold_temperatures(logits4, y4)[0] == (t4_brier if ece4[t4_brier] < ece4[t4_nll] else t4_nll)
    # one wrong part among many sure right ones: squared error sharpens without end, no fit (the NLL fit stays)
    z5 = np.concatenate([rng.normal(3, 0.5, 500), rng.normal(-3, 0.5, 500), [-40.0]])
    logits5, y5 = np.stack([np.zeros(len(z5)), z5], 1), np.array([1] * 500 + [0] * 500 + [1])
    assert E.fit_temperature(logits5, y5, "brier") is None
    assert E.threshold_temperatures(logits5, y5) == (E.fit_temperature(logits5, y5),) * 2
    with pytest.raises(ValueError, match="temperature loss"):
        E.fit_temperature(logits2, y2, "hinge")


def test_a_policy_moved_to_another_temperature_keeps_every_part_on_its_side():
    rng = np.random.default_rng(3)
    y = np.array([0] * 300 + [1] * 100)
    z = np.concatenate([rng.normal(-10, 1.5, 300), rng.normal(6, 1.5, 100)])
    z[300:302] = [-3.0, -2.0]                                # two bad parts near the good ones
    logits = np.stack([np.zeros(len(z)), z], 1)
    t_from, t_to = 1.7, 0.4
    for share, least in ((0.25, 0.0), (0.25, 0.08)):          # the share sets it, then the floor of good parts does
        pol = E.choose_threshold(y, E.prob_bad_from_logits(logits, t_from), 0.0, no_miss_share=share,
                                 no_miss_min_fpr=least)
        moved = E.policy_at_temperature(pol, t_from, t_to)
        assert ("floor_by" in pol) == (least > 0)
        assert moved["chosen_at_temperature"] == t_from and "chosen_at_temperature" not in pol
        m = E.compute_metrics(y, E.prob_bad_from_logits(logits, t_to), moved["threshold"])
        assert (m["fpr"], m["fnr"]) == (pol["val_fpr"], pol["val_fnr"])
        assert moved["set_by"]["prob_bad"] == pytest.approx(E.at_temperature(pol["set_by"]["prob_bad"], t_from, t_to))
        assert [r["val_fpr"] for r in moved["tradeoff"]] == [r["val_fpr"] for r in pol["tradeoff"]]
        if least:   # the good part the floor rests on scores the threshold itself: still rejected at the new scale
            assert moved["floor_by"]["prob_bad"] >= moved["threshold"]
    assert E.at_temperature(0.5, 2.0, 0.1) == pytest.approx(0.5) and E.at_temperature(0.0, 1.0, 0.5) == 0.0
    assert E.policy_at_temperature(pol, 1.0, 1.0)["threshold"] == pol["threshold"]


def test_fpr_at_fnr():
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.9, 0.5, 0.95])
    assert E.fpr_at_fnr(y, p, 0.0) == pytest.approx(0.5)
    assert E.fpr_at_fnr(y, p, 0.5) == pytest.approx(0.0)  # missing one of two bad parts is allowed
    # a held bad part needs no threshold; a held good part is rejected whatever it scores
    assert E.fpr_at_fnr(y, p, 0.0, held=[False] * 4 + [True, False]) == pytest.approx(0.0)
    assert E.fpr_at_fnr(y, p, 0.0, held=[True] + [False] * 3 + [True, False]) == pytest.approx(0.25)


def test_fpr_at_no_miss_is_the_rankings_floor_whatever_the_threshold():
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.9, 0.5, 0.95])
    # the lowest bad part scores 0.5: two of four good parts score at or above it, at any card threshold
    for thr in (0.05, 0.5, 0.97):
        assert E.compute_metrics(y, p, thr)["fpr_at_no_miss"] == pytest.approx(0.5)
    assert E.compute_metrics(y, p, 0.97)["fpr"] == 0.0 and E.compute_metrics(y, p, 0.97)["fn"] == 2
    # the held bad part is caught without a threshold, so the next one (0.95) sets the floor; a held good part
    # is rejected whatever it scores
    assert E.compute_metrics(y, p, 0.5, held=[False] * 4 + [True, False])["fpr_at_no_miss"] == pytest.approx(0.0)
    assert E.compute_metrics(y, p, 0.5, held=[True] + [False] * 3 + [True, False])["fpr_at_no_miss"] == \
        pytest.approx(0.25)
    assert np.isnan(E.compute_metrics([0, 0], [0.1, 0.2], 0.5)["fpr_at_no_miss"])   # no bad part: no floor


def test_report_files(tmp_path):
    y, p = _scores()
    m = E.compute_metrics(y, p, 0.5)
    files = E.write_report(tmp_path, y, p, m, "t")
    assert {f.split("/")[-1] for f in files} == {"roc.png", "confusion.png", "reliability.png", "metrics.json"}
    assert all((tmp_path / f.split("/")[-1]).stat().st_size > 1000 for f in files if f.endswith(".png"))


def test_calibrate_sets_a_new_threshold_from_the_model_own_validation_part(tiny_model, tiny_data, tmp_path, capsys):
    import json
    import shutil

    from defectcls.cli import main
    from defectcls.errors import DefectclsError
    from defectcls.scoring import evaluate_model, recalibrate

    m = tmp_path / "m"
    shutil.copytree(tiny_model, m)
    card0 = json.loads((m / "card.json").read_text())
    dry = recalibrate(m, 0.5, data_root=tiny_data, write=False)
    assert json.loads((m / "card.json").read_text()) == card0                   # a dry run changes nothing

    assert main(["calibrate", "--model", str(m), "--target-fnr", "0.5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    card = json.loads((m / "card.json").read_text())
    assert res["threshold"] == dry["threshold"] == card["threshold"] and card["threshold_policy"]["target_fnr"] == 0.5
    assert res["before"]["threshold"] == card0["threshold"] and card["temperature"] == card0["temperature"]
    for part in ("val", "test"):                                                # metrics = scoring that part anew
        fresh = evaluate_model(m, tiny_data, split=part)["metrics"]
        assert {k: card["metrics"][part][k] for k in ("fn", "fp", "tn", "tp")} == {k: fresh[k] for k in ("fn", "fp", "tn", "tp")}
    bad_val = sorted(p for y, p in zip(*[evaluate_model(m, tiny_data, split="val")[k] for k in ("y_true", "prob_bad")],
                                       strict=True) if y == 1)
    k = int(0.5 * (len(bad_val) + 1))                                            # conformal: the k-th lowest bad score
    assert card["threshold"] == pytest.approx(bad_val[k - 1], rel=1e-6)

    # a card written before the photos' background was recorded gets it from its training part
    legacy = json.loads((m / "card.json").read_text())
    recorded = legacy.pop("background")
    (m / "card.json").write_text(json.dumps(legacy))
    assert recalibrate(m, 0.5, data_root=tiny_data, write=False)["background"] == recorded   # what train chose
    assert "background" not in json.loads((m / "card.json").read_text())                  # dry run: not written
    assert main(["calibrate", "--model", str(m), "--target-fnr", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "background [" in out
    chosen = [r for r in json.loads((m / "card.json").read_text())["threshold_policy"]["tradeoff"] if r["target_fnr"] == 0.5]
    assert chosen[0]["threshold"] == card["threshold"]
    assert "by FNR target: 0 -> threshold" in out and f"0.5 -> threshold {card['threshold']:.3g}" in out
    assert json.loads((m / "card.json").read_text())["background"] == recorded

    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    sorted((other / "bad").glob("*.png"))[0].unlink()                           # not the folder it was trained on
    with pytest.raises(DefectclsError, match="does not hold the files"):
        recalibrate(m, 0.1, data_root=other)
    with pytest.raises(DefectclsError, match="target FNR"):
        recalibrate(m, 1.5)
    with pytest.raises(DefectclsError, match="no-miss share"):
        recalibrate(m, 0.0, no_miss_share=0.0)

    # target 0: the threshold is the chosen share of the lowest validation bad score, recorded on the card
    assert main(["calibrate", "--model", str(m), "--target-fnr", "0", "--no-miss-share", "0.8"]) == 0
    assert "0.8 of the lowest validation bad score" in capsys.readouterr().out
    now = json.loads((m / "card.json").read_text())
    pol = now["threshold_policy"]
    assert pol["no_miss_share"] == 0.8 and pol["threshold"] == pytest.approx(share_threshold(now, 0.8), rel=1e-6)
    assert pol["set_by"]["prob_bad"] == pytest.approx(bad_val[0], rel=1e-6)      # the lowest, as scored anew
    # by default the share the model was trained with, today's for a card from before the option
    assert recalibrate(m, 0.0, write=False)["threshold_policy"]["no_miss_share"] == E.NO_MISS_SHARE   # train's default
    trained = json.loads((m / "card.json").read_text())
    trained["train"]["config"]["no_miss_share"] = 0.6
    (m / "card.json").write_text(json.dumps(trained))
    assert recalibrate(m, 0.0, write=False)["threshold_policy"]["no_miss_share"] == 0.6
    del trained["train"]["config"]["no_miss_share"]
    (m / "card.json").write_text(json.dumps(trained))
    assert recalibrate(m, 0.0, write=False)["threshold_policy"]["no_miss_share"] == E.NO_MISS_SHARE
    assert main(["calibrate", "--model", str(m), "--target-fnr", "0", "--no-miss-share", "1.5"]) == 2
    assert "--no-miss-share must be in (0, 1]" in capsys.readouterr().err
    # the good parts' floor likewise: as trained, today's for a card from before it, or as asked
    assert recalibrate(m, 0.0, write=False)["threshold_policy"]["no_miss_min_fpr"] == E.NO_MISS_MIN_FPR
    trained["train"]["config"]["no_miss_min_fpr"] = 0.5
    (m / "card.json").write_text(json.dumps(trained))
    pol = recalibrate(m, 0.0, write=False)["threshold_policy"]
    assert pol["no_miss_min_fpr"] == 0.5 and pol["val_fpr"] >= 0.5                       # at least half the good parts
    assert recalibrate(m, 0.0, write=False, no_miss_min_fpr=0.25)["threshold_policy"]["no_miss_min_fpr"] == 0.25
    with pytest.raises(DefectclsError, match="least FPR"):
        recalibrate(m, 0.0, no_miss_min_fpr=1.0)
    assert main(["calibrate", "--model", str(m), "--target-fnr", "0", "--no-miss-min-fpr", "1"]) == 2
    assert "--no-miss-min-fpr must be in [0, 1)" in capsys.readouterr().err

    (m / "split.json").unlink()
    with pytest.raises(DefectclsError, match="no split.json"):
        recalibrate(m, 0.1)


def test_calibrate_tta_changes_the_views_refits_temperature_and_marks_exports_stale(tiny_model, tiny_data, tmp_path,
                                                                                   capsys):
    import json
    import shutil

    from defectcls.cli import main
    from defectcls.errors import ModelLoadError
    from defectcls.evaluate import compute_metrics, fit_temperature, threshold_temperatures
    from defectcls.export import export_onnx
    from defectcls.inference import Predictor
    from defectcls.scoring import evaluate_model

    m = tmp_path / "m"
    shutil.copytree(tiny_model, m)
    export_onnx(m, n_check=4)
    card0 = json.loads((m / "card.json").read_text())
    assert card0["tta"] == 1 and Predictor(m, device="cpu").backend == "onnx"
    assert main(["calibrate", "--model", str(m), "--target-fnr", "0", "--tta", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    card = json.loads((m / "card.json").read_text())
    assert card["tta"] == res["tta"] == 4 and res["before"]["tta"] == 1 and res["stale_exports"] == ["model.onnx"]
    # the temperature is the one that fits the validation logits over 4 views
    pred = Predictor(m, device="cpu", backend="torch")
    val = evaluate_model(m, tiny_data, split="val", predictor=pred)
    from defectcls import data as D
    from defectcls.scoring import select_split
    samples, _ = select_split(m, tiny_data, D.scan_folder(tiny_data), "val")
    images, ok, _ = D.decode_all(samples, card["img_size"], card["color"], use_disk_cache=False)
    logits, labels = pred.logits_cached(images), [samples[i].label for i in ok]
    assert (card["temperature"], card["threshold_policy"]["chosen_at_temperature"]) == \
        pytest.approx(threshold_temperatures(logits, labels), rel=1e-6)
    assert card["threshold_policy"]["chosen_at_temperature"] == pytest.approx(fit_temperature(logits, labels), rel=1e-6)
    assert card["metrics"]["val"]["fp"] == compute_metrics(val["y_true"], val["prob_bad"], card["threshold"])["fp"]
    # the model.onnx exported with one view no longer answers for this card: refused, or torch with a warning
    with pytest.raises(ModelLoadError, match="1 test-time view"):
        Predictor(m, device="cpu", backend="onnx")
    with pytest.warns(UserWarning, match="export again"):
        assert Predictor(m, device="cpu").backend == "torch"
    export_onnx(m, n_check=4)
    assert Predictor(m, device="cpu").backend == "onnx"
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", str(m), "--target-fnr", "0", "--tta", "3"])
    assert "invalid choice" in capsys.readouterr().err


def test_calibrate_tta_top_counts_the_most_suspicious_views_and_refits(tiny_model_tta, tiny_data, tmp_path, capsys):
    """--tta-top K: the card counts its K most suspicious views from then on; temperature and threshold are chosen
    anew on validation scored so, and the model directory answers with those scores."""
    import json
    import shutil

    from defectcls.cli import main
    from defectcls.evaluate import threshold_temperatures
    from defectcls.inference import Predictor
    from defectcls.scoring import evaluate_model

    m = tmp_path / "m"
    shutil.copytree(tiny_model_tta, m)
    assert main(["calibrate", "--model", str(m), "--target-fnr", "0", "--tta-top", "2"]) == 0
    out = capsys.readouterr().out
    assert "test-time views 8 -> 8 (the 2 most suspicious counted)" in out
    card = json.loads((m / "card.json").read_text())
    assert (card["tta"], card["tta_top"]) == (8, 2)
    pred = Predictor(m, device="cpu", backend="torch")
    assert pred.model.top == 2
    val = evaluate_model(m, tiny_data, split="val", predictor=pred)
    assert card["temperature"] == pytest.approx(threshold_temperatures(val["logits"], val["y_true"])[0], rel=1e-6)
    every = evaluate_model(m, tiny_data, split="val", predictor=Predictor(m, device="cpu", backend="torch", tta_top=0))
    assert np.abs(np.array(val["logits"]) - np.array(every["logits"])).max() > 1e-4
    assert main(["calibrate", "--model", str(m), "--target-fnr", "0", "--tta-top", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["before"]["tta_top"], res["tta_top"]) == (2, 0)
    assert json.loads((m / "card.json").read_text())["tta_top"] == 0
    before = (m / "card.json").read_text()
    assert main(["calibrate", "--model", str(m), "--target-fnr", "0", "--tta-top", "-1"]) == 2
    assert "tta_top" in capsys.readouterr().err and (m / "card.json").read_text() == before


def test_calibrate_refits_an_old_cards_temperature_and_keeps_its_verdicts(tiny_model, tmp_path, capsys):
    """A card from before the confidence was fitted by squared error: its temperature was the NLL fit, and so the
    scale of its policy. --refit-temperature gives it today's confidence and the same verdicts."""
    import json
    import shutil

    from defectcls.cli import main

    m = tmp_path / "m"
    shutil.copytree(tiny_model, m)
    today = json.loads((m / "card.json").read_text())
    old = json.loads(json.dumps(today))
    t_nll = old["threshold_policy"].pop("chosen_at_temperature")
    old["temperature"] = t_nll
    (m / "card.json").write_text(json.dumps(old))
    assert main(["calibrate", "--model", str(m), "--target-fnr", "0", "--json"]) == 0     # kept: the old scale
    kept = json.loads((m / "card.json").read_text())
    assert kept["temperature"] == t_nll and kept["threshold_policy"]["chosen_at_temperature"] == t_nll
    capsys.readouterr()
    assert main(["calibrate", "--model", str(m), "--target-fnr", "0", "--refit-temperature"]) == 0
    assert "temperature" in capsys.readouterr().out
    card = json.loads((m / "card.json").read_text())
    assert card["temperature"] == pytest.approx(today["temperature"], rel=1e-3)
    assert card["threshold_policy"]["chosen_at_temperature"] == pytest.approx(t_nll, rel=1e-3)
    for part in ("val", "test"):
        assert [card["metrics"][part][k] for k in ("fp", "fn")] == [kept["metrics"][part][k] for k in ("fp", "fn")]
    assert main(["calibrate", "--model", str(m), "--photos-only", "--refit-temperature"]) == 2
    assert "--refit-temperature" in capsys.readouterr().err


def test_calibrate_records_the_training_photos_look_on_cards_without_it(tiny_model, tiny_data, tmp_path, capsys):
    import json
    import shutil

    from defectcls import data as D
    from defectcls.cli import main
    from defectcls.scoring import recalibrate, record_photo_range

    m = tmp_path / "m"
    shutil.copytree(tiny_model, m)
    card0 = json.loads((m / "card.json").read_text())
    recorded = card0.pop("photo_range")                                          # a card written before it
    measured = D.estimate_photo_range([s.path for s in D.scan_folder(tiny_data)], "gray", seed=0)
    assert recorded == {**measured, "training_files": True, "zoom": 0.0}        # trained without augmentation
    (m / "card.json").write_text(json.dumps(card0))
    assert record_photo_range(m, write=False)["photo_range"] == recorded
    assert main(["calibrate", "--model", str(m), "--photos-only", "--dry-run"]) == 0
    assert "[dry run: not written]" in capsys.readouterr().out
    assert json.loads((m / "card.json").read_text()) == card0                  # a dry run changes nothing
    assert main(["calibrate", "--model", str(m), "--photos-only"]) == 0
    out = capsys.readouterr().out
    assert "training photos' look none -> sharpness" in out and f"({recorded['n']} photos)" in out
    card = json.loads((m / "card.json").read_text())
    assert card.pop("photo_range") == recorded and card == card0               # nothing else changed
    assert card["focus_below"] == recorded["sharpness"][0]                     # training sharpens softer photos back
    assert main(["calibrate", "--model", str(m), "--photos-only", "--focus-restore", "off"]) == 0
    assert "focus restore: below" in capsys.readouterr().out and json.loads((m / "card.json").read_text())["focus_below"] is None
    assert main(["calibrate", "--model", str(m), "--photos-only", "--focus-restore", "on", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["focus_below"] == recorded["sharpness"][0]
    assert json.loads((m / "card.json").read_text())["focus_below"] == recorded["sharpness"][0]
    # a threshold calibration records it too, on a card without it
    (m / "card.json").write_text(json.dumps(card0))
    res = recalibrate(m, 0.5, data_root=tiny_data)
    assert res["photo_range"] == recorded and res["before"]["photo_range"] is None
    assert json.loads((m / "card.json").read_text())["photo_range"] == recorded
    # what cannot be done is said, and changes nothing
    for argv, why in ((["--photos-only", "--target-fnr", "0.1"], "drop --target-fnr"),
                      ([], "needs --target-fnr"), (["--target-fnr", "0.1", "--focus-restore", "on"], "with --photos-only")):
        assert main(["calibrate", "--model", str(m), *argv]) == 2
        assert why in capsys.readouterr().err
    # photos like the training ones stand in for them where those are gone, and the card says so
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    sorted((other / "good").glob("*.png"))[0].unlink()
    assert main(["calibrate", "--model", str(m), "--photos-only", "--data", str(other)]) == 0
    assert "does not hold the files the model was trained on" in capsys.readouterr().out
    stand_in = json.loads((m / "card.json").read_text())["photo_range"]
    assert stand_in["training_files"] is False and stand_in["n"] == recorded["n"] - 1
    assert main(["calibrate", "--model", str(m), "--photos-only", "--data", str(tmp_path / "gone")]) == 2
    assert "not found" in capsys.readouterr().err
    (m / "split.json").unlink()                                                 # no training folder on record
    assert main(["calibrate", "--model", str(m), "--photos-only"]) == 2
    assert "pass --data" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(m), "--photos-only", "--data", str(tiny_data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["photo_range"] == {**recorded, "training_files": False}
