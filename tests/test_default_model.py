"""The shipped default model: loads offline from safetensors, fits a Space, judges the bundled examples."""

import json
from pathlib import Path

from defectcls.inference import Predictor

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_shipped_model_card_and_size(default_model_dir):
    weights = default_model_dir / "model.safetensors"
    assert weights.stat().st_size < 10 * 1024 * 1024  # no LFS needed on a Space
    card = json.loads((default_model_dir / "card.json").read_text())
    assert card["arch"] == "mobilenet_v3_large" and card["in_chans"] == 1 and card["color"] == "gray"
    assert card["name"] == "mobilenet_v3_large_gray" and card["storage_dtype"] == "float16"
    assert {"val", "test"} <= set(card["metrics"]) and card["threshold_policy"]["method"] == "conformal"
    assert not list(default_model_dir.glob("*.pt*"))  # weights only, no pickles


def test_shipped_model_judges_the_examples(default_model_dir):
    pred = Predictor(default_model_dir, device="cpu", backend="torch")
    files = sorted(EXAMPLES.glob("*.png"))
    assert len(files) >= 4
    for f in files:
        r = pred.predict(f)
        assert 0.0 <= r.prob_bad <= 1.0 and r.model_id.startswith("mobilenet_v3_large_gray@")
        if f.name.startswith(("good_", "bad_")):   # the borderline example may go either way
            assert r.label == f.name.split("_")[0], (f.name, r.prob_bad, r.threshold)


def test_shipped_model_screens_with_one_view_and_judges_like_all_views(default_model_dir):
    """The shipped card looks at one view first (``Predictor`` screen); the parts it is unsure of get all 8."""
    card = json.loads((default_model_dir / "card.json").read_text())
    sc = card["screen"]
    assert card["tta"] == 8 and sc["views"] == 1 and 0 < sc["below"] < card["threshold"] <= sc["above"] < 1
    screened = Predictor(default_model_dir, device="cpu", backend="torch")
    full = Predictor(default_model_dir, device="cpu", backend="torch", screen=False)
    assert screened.screen_below == sc["below"] and full.screen_below is None
    for f in sorted(EXAMPLES.glob("*.png")):
        a, b, one = screened.predict(f), full.predict(f), screened._screen.predict(f)
        assert a.label == b.label, (f.name, a.prob_bad, b.prob_bad)
        # decided by the screen: its one-view answer; else all 8 views'
        at_once = one.prob_bad < sc["below"] or one.prob_bad > sc["above"]
        assert abs(a.prob_bad - (one.prob_bad if at_once else b.prob_bad)) < 1e-5
