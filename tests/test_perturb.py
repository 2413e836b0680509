import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from defectcls import perturb as P
from defectcls.augment import PAINT_RADIUS, AugConfig, augment, border_median, geometric, paint_defects
from defectcls.errors import DefectclsError

from .parts import part_photo as _part


def _disc_mask(img: np.ndarray, bg: int = 190) -> np.ndarray:
    g = img if img.ndim == 2 else img[..., 0]
    return g < bg - 40


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("rgb", [False, True])
def test_every_perturbation_keeps_shape_and_dtype_and_changes_the_image(rgb):
    img = _part(rgb=rgb)
    for name, fn in P.PERTURBATIONS.items():
        out = fn(img, _rng())
        assert out.shape == img.shape and out.dtype == np.uint8, name
        assert not np.array_equal(out, img), name


def test_registry_covers_the_issue_magnitudes():
    names = set(P.PERTURBATIONS)
    for need in ("brightness+25%", "brightness-25%", "contrast-30%", "contrast+25%", "gamma0.7", "gamma1.4", "blur1.5",
                 "jpeg30", "noise8", "rotate37", "rotate90", "rotate200", "rotate_any", "scale0.9", "scale1.1",
                 "shift_x+5%", "shift_y-5%", "brightness+20%+noise6", "blur1+jpeg40", "rotate_any+scale0.92+shift_x-3%"):
        assert need in names
    assert all("," not in n for n in names)          # --perturb-names is comma-separated
    assert P.resolve_names("noise8, rotate90,noise8") == ["noise8", "rotate90"]
    # the default is the line's set; the stronger group is asked for by name, alone or with others
    assert P.resolve_names(None) == list(P.LINE) and "blur2" not in P.LINE
    assert P.resolve_names("stronger") == list(P.STRONGER) and "brightness+40%" in P.STRONGER
    assert P.resolve_names("noise8,stronger")[:2] == ["noise8", "brightness-40%"]
    assert P.resolve_names("all") == list(P.PERTURBATIONS)
    with pytest.raises(DefectclsError, match="unknown perturbation"):
        P.resolve_names(["noise8", "fog"])


def test_brightness_contrast_gamma_move_the_part_as_named():
    img = _part()
    part = _disc_mask(img)
    up, down = P.PERTURBATIONS["brightness+25%"](img, _rng()), P.PERTURBATIONS["brightness-25%"](img, _rng())
    assert up[part].mean() == pytest.approx(img[part].mean() * 1.25, abs=1)
    assert down[part].mean() == pytest.approx(img[part].mean() * 0.75, abs=1)
    low = P.PERTURBATIONS["contrast-30%"](img, _rng()).astype(float)
    assert low.std() == pytest.approx(img.std() * 0.7, rel=0.02) and low.mean() == pytest.approx(img.mean(), abs=1)
    assert P.PERTURBATIONS["gamma0.7"](img, _rng())[part].mean() > img[part].mean()
    assert P.PERTURBATIONS["gamma1.4"](img, _rng())[part].mean() < img[part].mean()


def test_blur_sigma_is_given_at_300px_and_scales_with_the_side():
    from scipy.ndimage import gaussian_filter

    for side in (150, 300, 600):
        img = _part(side=side)
        ref = np.clip(np.rint(gaussian_filter(img.astype(np.float32), 1.5 * side / 300, mode="nearest")), 0, 255)
        assert np.array_equal(P.PERTURBATIONS["blur1.5"](img, _rng()), ref.astype(np.uint8))
    img = _part()
    edge = lambda a: (np.diff(a.astype(float), axis=1) ** 2).sum()  # noqa: E731
    assert edge(P.PERTURBATIONS["blur1.5"](img, _rng())) < edge(P.PERTURBATIONS["blur0.75"](img, _rng())) < edge(img)


def test_jpeg_lower_quality_costs_more():
    img = np.asarray(np.random.default_rng(1).integers(0, 255, (96, 96)), np.uint8)
    e50 = np.abs(P.PERTURBATIONS["jpeg50"](img, _rng()).astype(int) - img).mean()
    e30 = np.abs(P.PERTURBATIONS["jpeg30"](img, _rng()).astype(int) - img).mean()
    assert 0 < e50 < e30


def test_noise_is_seeded_and_has_the_named_sigma():
    img = np.full((200, 200), 128, np.uint8)
    a = P.PERTURBATIONS["noise8"](img, _rng(5))
    assert np.array_equal(a, P.PERTURBATIONS["noise8"](img, _rng(5)))
    assert not np.array_equal(a, P.PERTURBATIONS["noise8"](img, _rng(6)))
    assert (a.astype(float) - 128).std() == pytest.approx(8, rel=0.05)
    r1 = P.perturbation_rng(0, "noise8", "a.png").normal()
    assert r1 == P.perturbation_rng(0, "noise8", "a.png").normal() != P.perturbation_rng(0, "noise8", "b.png").normal()


@pytest.mark.parametrize("rgb", [False, True])
def test_quarter_turn_is_rot90_and_other_angles_fill_with_the_background(rgb):
    img = _part(rgb=rgb, off=(9, -5))
    assert np.array_equal(P.PERTURBATIONS["rotate90"](img, _rng()), np.rot90(img))
    assert np.array_equal(P.affine(img, angle=180), np.rot90(img, 2))
    for angle in (37, 200):
        out = P.PERTURBATIONS[f"rotate{angle}"](img, _rng())
        assert (out[0, 0] == 190).all() and (out[-1, -1] == 190).all()   # corners: the light background, not black
        assert _disc_mask(out).sum() == pytest.approx(_disc_mask(img).sum(), rel=0.03)
    dark = 255 - _part(rgb=rgb)                                           # a dark background stays dark
    assert (P.affine(dark, angle=45)[0, 0] == 65).all()
    assert P.background(img).tolist() == [190.0] * (3 if rgb else 1)


def test_scale_and_shift_move_the_part_and_pad_with_the_background():
    img = _part(side=200)
    area = _disc_mask(img).sum()
    small, large = P.PERTURBATIONS["scale0.9"](img, _rng()), P.PERTURBATIONS["scale1.1"](img, _rng())
    assert _disc_mask(small).sum() == pytest.approx(area * 0.81, rel=0.03)
    assert _disc_mask(large).sum() == pytest.approx(area * 1.21, rel=0.03)
    shifted = P.PERTURBATIONS["shift_x+5%"](img, _rng())
    cx = lambda m: np.mgrid[:200, :200][1][m].mean()  # noqa: E731
    assert cx(_disc_mask(shifted)) - cx(_disc_mask(img)) == pytest.approx(10, abs=0.6)
    assert (shifted[:, :10] == 190).all()
    up = P.PERTURBATIONS["shift_y-5%"](img, _rng())
    cy = lambda m: np.mgrid[:200, :200][0][m].mean()  # noqa: E731
    assert cy(_disc_mask(up)) - cy(_disc_mask(img)) == pytest.approx(-10, abs=0.6)


@pytest.mark.parametrize("rgb", [False, True])
def test_affine_fills_the_uncovered_strip_as_asked(rgb):
    img = np.random.default_rng(0).integers(0, 256, (60, 80, 3) if rgb else (60, 80), dtype=np.uint8)
    k = 4                                                     # 5% of the 80 px width
    assert (P.affine(img, shift=(0.05, 0.0), fill="black")[:, :k] == 0).all()
    assert (P.affine(img, shift=(0.05, 0.0), fill="white")[:, :k] == 255).all()
    mirrored = P.affine(img, shift=(0.05, 0.0), fill="reflect")
    assert np.array_equal(mirrored[:, :k], img[:, k:0:-1]) and np.array_equal(mirrored[:, k:], img[:, :-k])
    assert np.array_equal(P.affine(img, shift=(0.05, 0.0), fill="edge")[:, :k], np.repeat(img[:, :1], k, axis=1))
    assert np.array_equal(P.affine(img, shift=(0.05, 0.0)), P.affine(img, shift=(0.05, 0.0), fill="background"))
    with pytest.raises(DefectclsError, match="unknown fill"):
        P.affine(img, angle=10, fill="noise")


def test_the_fills_group_repeats_pose_changes_with_other_fills():
    names = P.resolve_names("fills")
    assert names == list(P.FILLED) and len(names) == 3 * 4 and not set(names) & set(P.LINE)
    assert set(names) <= set(P.resolve_names("all"))
    img = _part(off=(9, -5))
    black, white = P.apply("rotate37_black", img, _rng()), P.apply("rotate37_white", img, _rng())
    assert black[0, 0] == 0 and white[0, 0] == 255
    # the part itself is turned the same whatever fills the corners
    inside = _disc_mask(P.apply("rotate37", img, _rng()))
    assert np.array_equal(black[inside], white[inside])


def _aspect(mask: np.ndarray) -> tuple[float, float]:
    """Minor / major axis of a mask's second moments, and the direction of the minor axis (degrees, image x)."""
    ys, xs = np.nonzero(mask)
    ev, vec = np.linalg.eigh(np.cov(np.stack([xs, ys]).astype(float)))
    minor = vec[:, 0]
    return float(np.sqrt(ev[0] / ev[1])), float(np.degrees(np.arctan2(-minor[1], minor[0])) % 180)


def test_slant_squashes_the_part_along_the_named_direction():
    img = _part(side=200)
    assert _aspect(_disc_mask(img))[0] > 0.98
    assert np.array_equal(P.affine(img, squash=1.0, squash_angle=30), P.affine(img))
    for q, angle in ((0.65, 0.0), (0.8, 90.0), (0.65, 45.0)):
        ratio, minor = _aspect(_disc_mask(P.affine(img, squash=q, squash_angle=angle)))
        assert ratio == pytest.approx(q, abs=0.02)
        assert min(abs(minor - angle), 180 - abs(minor - angle)) < 3
    names = P.resolve_names("slant")
    assert names == list(P.SLANTED) and not set(names) & set(P.LINE) and set(names) <= set(P.resolve_names("all"))
    # a random direction per photo, the same for the same photo and seed
    a, b = P.apply("slant0.65", img, _rng(1)), P.apply("slant0.65", img, _rng(2))
    assert _aspect(_disc_mask(a))[0] == pytest.approx(0.65, abs=0.02) and not np.array_equal(a, b)
    assert np.array_equal(a, P.apply("slant0.65", img, _rng(1)))


def _corner_fills(cfg: AugConfig, n: int = 1200) -> torch.Tensor:
    x = torch.full((n, 1, 32, 32), 0.5)                     # a flat photo: only the fill can change a corner
    return geometric(x, cfg, torch.Generator().manual_seed(0))[:, 0, 0, 0]


def test_geometric_augmentation_fills_at_the_asked_shares():
    turn = dict(rotate=True, flip=False, scale=0.0, shift=0.0)
    assert torch.allclose(_corner_fills(AugConfig(**turn, fill_border_p=0.0)), torch.tensor(0.5))
    const = _corner_fills(AugConfig(**turn, fill_border_p=0.0, fill_const_p=1.0))
    # black, white and a random grey, a third each (a corner a turn leaves covered keeps the photo's 0.5)
    for share in ((const == 0).float().mean(), (const == 1).float().mean()):
        assert 0.25 < float(share) < 0.42
    grey = const[(const > 0) & (const < 1) & ((const - 0.5).abs() > 1e-3)]
    assert len(grey) > 200 and float(grey.std()) > 0.2
    mixed = _corner_fills(AugConfig(**turn, fill_border_p=0.2, fill_reflect_p=0.2, fill_const_p=0.3))
    changed = float(((mixed - 0.5).abs() > 1e-3).float().mean())
    assert 0.24 < changed < 0.36                            # the constant share (0.3), less the few covered corners


def test_fill_shares_beyond_one_are_refused(tiny_data, tmp_path):
    from defectcls.cli import main

    rc = main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "m"), "--epochs", "1",
               "--aug-set", "fill_reflect_p=0.6", "fill_const_p=0.6"])
    assert rc == 2 and not (tmp_path / "m").exists()


def test_training_augmentation_spans_the_perturbations():
    """The recipe's augmentation covers every single perturbation's magnitude, in the same units."""
    a = AugConfig()
    assert a.brightness >= 0.25 and a.contrast >= 0.3 and a.scale >= 0.1 and a.shift >= 0.05
    assert 1 / (1 + a.gamma) <= 0.7 and 1 + a.gamma >= 1.4
    assert a.blur_p > 0 and a.blur_sigma >= 1.5 and a.jpeg_p > 0 and a.jpeg_quality <= 30
    # noise is added at working size: 8/255 at 300 px shrinks by ~sqrt of the area ratio when resized to 192 px
    assert a.noise * 255 >= 8 * 192 / 300 and a.rotate


def test_augmentation_ramp_scales_every_magnitude_but_pose():
    a = AugConfig()
    assert a.strength(0.0) == 0.0 and a.strength(a.ramp_start) == 0.0 and a.strength(a.ramp) == 1.0
    assert a.strength((a.ramp_start + a.ramp) / 2) == pytest.approx(0.5)
    assert a.strength(0.99) == 1.0 and AugConfig.light().strength(0.0) == 1.0  # light has no ramp
    assert a.at_strength(1.0) == a
    zero = a.at_strength(0.0)
    assert zero.rotate and zero.flip  # pose always: the part is round
    assert zero.scale == zero.shift == zero.brightness == zero.contrast == zero.gamma == 0
    assert zero.blur_p == zero.noise == zero.jpeg_p == 0 and zero.jpeg_quality == 95
    half = a.at_strength(0.5)
    assert half.brightness == pytest.approx(a.brightness / 2) and half.noise == pytest.approx(a.noise / 2)
    assert a.jpeg_quality < half.jpeg_quality < 95
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    # at strength 0 only rotations/flips act: the image's values are kept up to interpolation
    y = augment(x, zero, torch.Generator().manual_seed(1))
    assert abs(float(y.mean() - x.mean())) < 0.05


def test_geometric_augmentation_fills_with_the_border_median_not_black():
    x = torch.full((3, 1, 64, 64), 0.75)
    x[:, :, 16:48, 16:48] = 0.2
    assert torch.allclose(border_median(x).flatten(), torch.full((3,), 0.75))
    cfg = AugConfig(rotate=True, flip=False, scale=0.2, shift=0.0, fill_border_p=0.0)
    out = geometric(x, cfg, torch.Generator().manual_seed(0))
    corners = torch.stack([out[:, 0, 0, 0], out[:, 0, -1, -1], out[:, 0, 0, -1], out[:, 0, -1, 0]])
    assert torch.allclose(corners, torch.full_like(corners, 0.75), atol=1e-4)
    y = augment(x, AugConfig(jpeg_p=1.0), torch.Generator().manual_seed(1))
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1


def test_evaluate_perturbed_has_a_row_per_perturbation_and_clean_equals_plain_evaluation(tiny_model, tiny_data):
    from defectcls.scoring import evaluate_model

    res = P.evaluate_perturbed(tiny_model, tiny_data)
    assert [r["name"] for r in res["rows"]] == ["clean", *P.LINE]
    assert res["split"] == "test" and res["n"] > 0
    for r in res["rows"]:
        assert set(P.ROW_KEYS) <= set(r) and r["n_bad"] + r["n_good"] == res["n"]
    plain = evaluate_model(tiny_model, tiny_data)["metrics"]
    clean = res["rows"][0]
    assert (clean["fn"], clean["fp"], clean["n_bad"], clean["n_good"]) == \
        (plain["fn"], plain["fp"], plain["n_bad"], plain["n_good"])
    assert clean["auroc"] == pytest.approx(plain["auroc"], abs=1e-6)
    assert clean["fpr_at_no_miss"] == pytest.approx(plain["fpr_at_no_miss"], abs=1e-9)
    assert "| FPR at no miss |" in P.format_table(res)
    assert res["worst"]["fnr"]["value"] == max(r["fnr"] for r in res["rows"][1:])
    again = P.evaluate_perturbed(tiny_model, tiny_data, names="noise8,rotate_any")
    assert again["rows"][1:] == [r for r in res["rows"] if r["name"] in ("noise8", "rotate_any")]


def test_registered_names_compose_to_the_same_pixels():
    img = _part()
    composed = 0
    for name, fn in P.PERTURBATIONS.items():
        if name == "rot+scale0.88+shift5%":      # the one registered name outside the grammar
            continue
        for seed in (0, 7):
            assert np.array_equal(P.compose(name)(img, _rng(seed)), fn(img, _rng(seed))), name
        composed += 1
    assert composed == len(P.PERTURBATIONS) - 1


def test_composed_names_reach_any_magnitude_and_combination():
    img = _part()
    assert np.array_equal(P.get("blur2.5+jpeg25")(img, _rng()), P.jpeg(P.blur(img, 2.5), 25))
    assert np.array_equal(P.get("brightness-50%+contrast+10%")(img, _rng()),
                          P.contrast(P.brightness(img, 0.5), 1.1))
    assert np.array_equal(P.get("gamma2.2")(img, _rng()), P.gamma(img, 2.2))
    # neighbouring pose steps are one resampling, the fill at the end applies to it
    assert np.array_equal(P.get("rotate_any+scale0.8+shift_y+6%_black")(img, _rng(3)),
                          P.affine(img, angle=float(_rng(3).uniform(0.0, 360.0)), scale=0.8, shift=(0.0, 0.06),
                                   fill="black"))
    assert np.array_equal(P.get("rotate15+shift_xy-4%")(img, _rng()), P.affine(img, angle=15, shift=(-0.04, -0.04)))
    # photometric steps after a pose keep their order; the fill still belongs to the pose before them
    assert np.array_equal(P.get("rotate37+blur1_white")(img, _rng()), P.blur(P.affine(img, angle=37, fill="white"), 1))
    # the noise is drawn from the photo's generator: repeatable, and stronger than the registered noise12
    n16 = P.get("noise16")(img, _rng(5))
    assert np.array_equal(n16, P.get("noise16")(img, _rng(5)))
    spread = [np.abs(P.get(n)(img, _rng(5)).astype(int) - img).mean() for n in ("noise12", "noise16")]
    assert spread[1] > spread[0] > 0
    assert P.resolve_names("noise8,blur2.5+jpeg25,stronger")[:3] == ["noise8", "blur2.5+jpeg25", "brightness-40%"]
    assert np.array_equal(P.apply("blur2.5+jpeg25", img, _rng()), P.jpeg(P.blur(img, 2.5), 25))


@pytest.mark.parametrize("name, says", [
    ("fog", "no step at 'fog'"),
    ("jpeg0", "JPEG quality"),
    ("blur0", "blur sigma"),
    ("brightness-100%", "cannot fall by 100%"),
    ("scale0.1", "scale from 0.2 to 5"),
    ("slant1.2", "0 < Q <= 1"),
    ("shift_x+60%", "under 50%"),
    ("rotate10+rotate20", "rotate given twice"),
    ("blur1_black", "needs a pose step"),
    ("scale0.9_black+blur1", "a fill goes at the end"),
    ("blur1+", "steps are joined by '+'"),
    ("blur1++jpeg30", "no step at '+jpeg30'"),
])
def test_a_bad_composed_name_says_what_is_wrong(name, says):
    with pytest.raises(DefectclsError, match="unknown perturbation|perturbation step|perturbation '") as err:
        P.resolve_names(["noise8", name])
    assert says in str(err.value) and name in str(err.value)


def test_cli_evaluate_perturb_writes_the_report(tiny_model, tiny_data, tmp_path, capsys):
    from defectcls.cli import main

    rc = main(["evaluate", "--model", str(tiny_model), "--data", str(tiny_data), "--perturb-names",
               "rotate90,jpeg30,slant0.65,blur2.5+jpeg25", "--report-dir", str(tmp_path), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    # a composed name (not registered) is scored like a registered one
    assert [r["name"] for r in out["rows"]] == ["clean", "rotate90", "jpeg30", "slant0.65", "blur2.5+jpeg25"]
    # a camera 49 degrees off the part's axis: photos the model cannot judge are held, bad whatever they score
    slant = out["rows"][3]
    assert slant["held_bad"] + slant["held_good"] >= out["n"] // 2 and slant["fp"] >= slant["held_good"]
    assert all(r["held_bad"] == r["held_good"] == 0 for r in out["rows"][:3])
    assert out["rows"][4]["n_bad"] + out["rows"][4]["n_good"] == out["n"]
    md = (tmp_path / "perturb.md").read_text()
    assert "| rotate90 |" in md and "| clean |" in md and "held bad / good" in md
    assert json.loads((tmp_path / "perturb.json").read_text())["model_id"] == out["model_id"]
    assert "scores" not in out   # the per-photo scores go to the CSV, not to stdout
    # each photo's P(bad) per perturbation: the CSV's counts at the threshold are the table's
    import csv

    with open(tmp_path / "perturb_scores.csv", newline="") as fh:
        photos = list(csv.DictReader(fh))
    assert len(photos) == out["n"] and set(photos[0]) == {"path", "label", "clean", "rotate90", "jpeg30", "slant0.65",
                                                          "slant0.65 held", "blur2.5+jpeg25"}
    assert all(Path(r["path"]).is_file() and r["label"] in ("good", "bad") for r in photos)
    for row in out["rows"]:
        flagged = [r["label"] for r in photos
                   if float(r[row["name"]]) >= out["threshold"] or r.get(f"{row['name']} held") == "yes"]
        assert (flagged.count("good"), row["n_bad"] - flagged.count("bad")) == (row["fp"], row["fn"])
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(tiny_data), "--perturb-names", "fog"]) == 2
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(tiny_data), "--perturb-names", "jpeg0"]) == 2
    assert "JPEG quality" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(tiny_data), "--perturb-names", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["perturbations"] == list(P.PERTURBATIONS) and listed["groups"]["stronger"] == list(P.STRONGER)
    assert "blur2.5+jpeg25" in listed["compose"]


def test_blur_and_jpeg_reach_bad_parts_at_the_bad_degrade_share_noise_reaches_both_alike():
    # a pin-sized dark dot on a flat part: the smallest defect the casting photos have
    x = torch.full((8, 1, 48, 48), 0.7)
    x[:, :, 24, 24] = 0.2
    labels = torch.tensor([0, 1] * 4)
    sensor_only = dict(rotate=False, flip=False, scale=0, shift=0, fill_border_p=0, brightness=0, contrast=0,
                       gamma=0, blur_p=1.0, blur_sigma=15.0, noise=0.05, jpeg_p=1.0, jpeg_quality=25)

    def dot_contrast(bad_degrade):
        y = augment(x, AugConfig(**sensor_only, bad_degrade=bad_degrade), torch.Generator().manual_seed(0), labels)
        return (0.7 - y[:, 0, 24, 24]).abs()

    spared, equal = dot_contrast(0.0), dot_contrast(1.0)
    # bad parts keep their dot (under noise and a JPEG pass at quality 95), good parts lose it to the blur
    assert float(spared[labels == 1].min()) > 0.35 and float(spared[labels == 0].max()) < 0.2
    # at share 1 bad parts are degraded as much as good ones: the dot is blurred away on both
    assert float(equal[labels == 1].max()) < 0.2
    # without labels every part is degraded alike, as at share 1
    y0 = augment(x, AugConfig(**sensor_only, bad_degrade=0.0), torch.Generator().manual_seed(0))
    y1 = augment(x, AugConfig(**sensor_only, bad_degrade=1.0), torch.Generator().manual_seed(0), labels)
    assert torch.equal(y0, y1)
    # noise alone is the same draw for both classes whatever the share (no "noisy means good" shortcut)
    noise_only = {**sensor_only, "blur_p": 0.0, "jpeg_p": 0.0}
    n0 = augment(x, AugConfig(**noise_only, bad_degrade=0.0), torch.Generator().manual_seed(5), labels)
    n1 = augment(x, AugConfig(**noise_only, bad_degrade=1.0), torch.Generator().manual_seed(5), labels)
    assert torch.equal(n0, n1) and float((n0 - x).abs().mean()) > 0.005


def test_paint_defects_darkens_the_ring_of_the_chosen_good_parts_and_calls_them_bad():
    x = torch.full((64, 1, 192, 192), 0.8)   # the recipe's working size
    labels = torch.tensor([0, 1] * 32)
    before = x.clone()
    out, lab, painted = paint_defects(x, labels, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(x, before) and torch.equal(labels, torch.tensor([0, 1] * 32))   # inputs left as they were
    assert bool(painted.any()) and not bool(painted[labels == 1].any())   # only good parts are painted
    assert 8 <= int(painted.sum()) <= 24                                  # about half of the 32 good ones
    assert torch.equal(lab, torch.where(painted, 1, labels))             # painted ones are bad now, no other changed
    diff = (before - out)[:, 0]
    assert torch.equal(out[~painted], before[~painted])
    for i in torch.nonzero(painted).flatten().tolist():
        d = diff[i]
        assert 0.8 * 0.25 < float(d.max()) <= 0.8 * 0.85 + 1e-6   # a dark core (depth 0.5-0.85 of the light, a
                                                                   # lobe's centre up to half a pixel off the grid)
        assert float((d > 0.1).float().mean()) < 0.05             # a blotch, not a veil: under 5% of the image
        yy, xx = torch.nonzero(d == d.max())[0].tolist()
        r = math.hypot(xx - 95.5, yy - 95.5) / 192
        assert PAINT_RADIUS[0] - 0.05 < r < PAINT_RADIUS[1] + 0.05   # on the part's ring (lobes sit up to a sigma off)
    # share 0 changes nothing and draws nothing from the generator
    g = torch.Generator().manual_seed(1)
    same, lab0, none = paint_defects(x, labels, 0.0, g)
    assert same is x and lab0 is labels and not bool(none.any())
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(1)))


def _blob_batch(n: int = 24, size: int = 48, background: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """N images of an off-centre bright blob on BACKGROUND (border included) and the blob's masks."""
    g = torch.Generator().manual_seed(5)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        cy, cx = (torch.rand(2, generator=g) * size * 0.5 + size * 0.25).tolist()
        masks[i, 0] = (((yy - cy) ** 2 + (xx - cx) ** 2) < 25).float()
    return background + (1 - background) * masks, masks


def test_geometric_moves_masks_with_their_images_under_every_fill():
    """Defect masks take the pose of their images (mirror and edge fills included) and the same random draws."""
    x, masks = _blob_batch()
    cfg = AugConfig(rotate=True, flip=True, scale=0.15, shift=0.06, fill_border_p=0.3, fill_reflect_p=0.3)
    out, moved = geometric(x, cfg, torch.Generator().manual_seed(1), masks)
    # the image is its mask here (black background), so both must come out alike, moved off the originals
    assert torch.allclose(out, moved, atol=1e-6) and not torch.allclose(moved, masks, atol=0.1)
    assert torch.equal(out, geometric(x, cfg, torch.Generator().manual_seed(1)))
    x_aug, m_aug = augment(x, cfg, torch.Generator().manual_seed(2), masks=masks)
    assert m_aug.shape == masks.shape and torch.allclose(m_aug, geometric(x, cfg, torch.Generator().manual_seed(2), masks)[1])


def test_a_constant_fill_leaves_the_mask_empty_there():
    """On a grey photo the image's fill is its grey, the mask's is 0 (no defect where the tool filled)."""
    x, masks = _blob_batch(background=0.5)
    cfg = AugConfig(rotate=True, flip=False, scale=0.15, shift=0.06, fill_border_p=0.0)
    out, moved = geometric(x, cfg, torch.Generator().manual_seed(3), masks)
    assert torch.allclose(moved, (out - 0.5) * 2, atol=1e-5) and float(moved.sum()) > 0
