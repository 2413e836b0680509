"""Framing on the part (--frame part): finding the part, cropping, and one path from training to overlays."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from defectcls import data as D
from defectcls import inspect as inspect_mod
from defectcls import perturb as P
from defectcls.errors import DefectclsError
from defectcls.explain import explain, overlay
from defectcls.inference import Predictor
from defectcls.train import TrainConfig, to_input, train


def _disc(side=300, cx=150.0, cy=150.0, r=70.0, fg=200, bg=20, hole=0.0, noise=3.0, seed=0) -> np.ndarray:
    """A part: a disc (with an optional bore of HOLE x r) on a plain background, with sensor noise."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    d = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy)
    img = np.where((d <= r) & (d >= hole * r), fg, bg).astype(np.float32)
    img += np.random.default_rng(seed).normal(0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fg,bg,hole", [(200, 20, 0.0), (40, 170, 0.35)])   # emblem on black; dark ring on light
def test_part_circle_finds_centre_and_size(fg, bg, hole):
    img = _disc(cx=170.0, cy=130.0, r=60.0, fg=fg, bg=bg, hole=hole)
    cx, cy, r = D.part_circle(img)
    assert cx == pytest.approx(170.0, abs=2.5) and cy == pytest.approx(130.0, abs=2.5)
    assert r == pytest.approx(60.0, rel=0.04)      # the bore is filled: the disc's own radius


def test_part_circle_on_the_synthetic_emblems():
    from defectcls.synth import BASE_RADIUS_FRAC, image_seed, render_part

    for i in range(6):
        img, _, meta = render_part(image_seed(555, "bad" if i % 2 else "good", i), bool(i % 2), size=256)
        cx, cy, r = D.part_circle(np.asarray(img.convert("L")))
        assert cx == pytest.approx(128 + meta["offset"][0], abs=1.5) and cy == pytest.approx(128 + meta["offset"][1], abs=1.5)
        assert r / (meta["scale"] * BASE_RADIUS_FRAC * 256) == pytest.approx(1.0, abs=0.05)


def test_part_circle_ignores_light_drift_and_follows_pose():
    img = _disc(fg=40, bg=170, hole=0.35, r=72.0)
    cx0, cy0, r0 = D.part_circle(img)
    for changed in (P.gamma(img, 1.4), P.gamma(img, 0.7), P.brightness(img, 1.25), P.contrast(img, 0.7),
                    P.blur(img, 1.5)):
        cx, cy, r = D.part_circle(changed)
        assert abs(cx - cx0) < 1.0 and abs(cy - cy0) < 1.0 and r == pytest.approx(r0, rel=0.02)
    cx, cy, r = D.part_circle(P.affine(img, scale=0.9, shift=(0.05, 0.0)))
    assert r == pytest.approx(0.9 * r0, rel=0.02) and cx == pytest.approx(150 + 0.9 * (cx0 - 150) + 15, abs=1.5)


def test_no_part_means_the_whole_photo():
    flat = np.full((64, 64), 128, np.uint8)
    assert D.part_circle(flat) is None and D.frame_box(flat, 0.25) is None
    np.testing.assert_array_equal(D.fit_frame(flat, 32, 0.25), D.fit_square(flat, 32))
    img = _disc()
    assert D.frame_box(img, None) is None
    np.testing.assert_array_equal(D.fit_frame(img, 64, None), D.fit_square(img, 64))
    with pytest.raises(DefectclsError, match="no round part"):
        D.estimate_frame_ref([], "gray")


def test_framing_undoes_camera_distance_and_offset():
    img = _disc(r=70.0, hole=0.35, fg=40, bg=170)
    ref = D.part_circle(img)[2] / 300
    moved = P.affine(img, scale=0.88, shift=(0.06, -0.04))
    a, b = D.fit_frame(img, 96, ref).astype(int), D.fit_frame(moved, 96, ref).astype(int)
    assert np.abs(a - b).mean() < 6                                     # the same picture again
    assert np.abs(a - D.fit_square(moved, 96).astype(int)).mean() > 3 * np.abs(a - b).mean()


def test_crop_square_fills_outside_with_the_border_median():
    img = np.full((40, 50), 90, np.uint8)
    img[10:30, 10:40] = 200
    np.testing.assert_array_equal(D.crop_square(img, (10, 5, 20)), img[5:25, 10:30])
    out = D.crop_square(img, (-10, -10, 30))
    assert out.shape == (30, 30) and (out[:10] == 90).all() and (out[:, :10] == 90).all()
    np.testing.assert_array_equal(out[10:, 10:], img[:20, :20])
    rgb = np.repeat(img[..., None], 3, axis=2)
    assert D.crop_square(rgb, (30, 30, 40)).shape == (40, 40, 3)


def test_overlay_puts_the_heat_inside_the_box():
    img = np.zeros((100, 100), np.uint8)
    cam = np.ones((32, 32), np.float32)
    out = overlay(img, cam, alpha=1.0, box=(50, 50, 40)).astype(int)
    inside, outside = out[55:85, 55:85], out[:45, :45]
    assert inside[..., 0].mean() > 100 and outside[..., 0].mean() < 10    # hot (red) in the box, cold elsewhere
    # no box: the whole photo, as before
    assert overlay(img, cam, alpha=1.0)[..., 0].mean() > 100


@pytest.fixture(scope="module")
def framed_model(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("framed") / "m"
    from defectcls.config import AugConfig

    train(TrainConfig(data=str(tiny_data), out=str(out), epochs=1, img_size=48, batch_size=16, progress=False,
                      workers=1, aug=AugConfig.none(), tta=1, epoch_size=0, frame="part", disk_cache=False))
    return out


def test_framed_training_caches_what_inference_sees(framed_model, tiny_data, tmp_path):
    card = json.loads((framed_model / "card.json").read_text())
    assert 0.2 < card["frame_ref"] < 0.6 and card["train"]["config"]["frame"] == "part"
    assert "size" in card["photo_range"] and "zoom" not in card["photo_range"]   # framed: no note on the part's size
    from defectcls.models import read_card
    from defectcls.scoring import _add_zoom

    again = dict(card["photo_range"])
    _add_zoom(again, read_card(framed_model))                                   # nor when the card is measured again
    assert again == card["photo_range"]
    pred = Predictor(framed_model, device="cpu", backend="torch")
    assert pred.prep.frame_ref == card["frame_ref"]
    samples = D.scan_folder(tiny_data)[:6]
    images, _, _ = D.decode_all(samples, 48, "gray", workers=1, use_disk_cache=False, frame_ref=card["frame_ref"])
    mean, std = torch.tensor(card["mean"]).view(1, -1, 1, 1), torch.tensor(card["std"]).view(1, -1, 1, 1)
    train_side = to_input(torch.from_numpy(images), mean, std).numpy()
    np.testing.assert_allclose(train_side, np.stack([pred.preprocess(s.path) for s in samples]), atol=1e-6)
    # the frame differs from the whole photo (the synthetic parts sit off-centre at random sizes)
    whole, _, _ = D.decode_all(samples, 48, "gray", workers=1, use_disk_cache=False)
    assert not np.array_equal(whole, images)
    # the heat-map is drawn over the square the model saw
    ex = explain(pred, samples[0].path)
    assert ex.box == pred.prep.box(pred.load(samples[0].path)) and ex.box is not None
    # and the factory line's decode keeps that square for its overlay (the part found once)
    assert inspect_mod._prepare(pred, pred.load(samples[0].path)).box == ex.box
    # a warm start keeps the framing; asking for the other one is refused
    with pytest.raises(DefectclsError, match="differs from the --init model"):
        train(TrainConfig(data=str(tiny_data), out=str(tmp_path / "x"), init=str(framed_model), frame="full",
                          epochs=1, img_size=48, progress=False))


@pytest.mark.parametrize("fg,bg,hole", [(200, 20, 0.0), (40, 170, 0.35)])   # emblem on black; dark ring on light
def test_part_outline_measures_how_oval_the_part_looks(fg, bg, hole):
    img = _disc(r=80.0, fg=fg, bg=bg, hole=hole)
    o = D.part_outline(img)
    assert o.axis_ratio > 0.97 and o.tilt_deg < 15
    assert (o.cx, o.cy, o.radius) == pytest.approx(D.part_circle(img))
    assert D.photo_notes(img) == []
    for q, angle in ((0.8, 0.0), (0.6, 60.0), (0.7, 135.0)):
        tilted = P.affine(img, squash=q, squash_angle=angle)
        o = D.part_outline(tilted)
        assert o.axis_ratio == pytest.approx(q, abs=0.03)
        assert min(abs(o.minor_deg - angle), 180 - abs(o.minor_deg - angle)) < 4
        assert o.tilt_deg == pytest.approx(math.degrees(math.acos(q)), abs=3)
        assert o.ellipse_fit > 0.97
        notes, held = D.photo_check(tilted)
        assert len(notes) == 1 and "oval" in notes[0] and f"{o.axis_ratio:.2f}" in notes[0]
        assert held and D.photo_held(tilted) and D.verdict(0.0, 0.5, held) == "bad"   # held: bad whatever P(bad)
    # a mild tilt, light drift, blur and a turn are not worth a note, and are judged by the model
    for changed in (P.affine(img, squash=0.95, squash_angle=20), P.brightness(img, 1.25), P.blur(img, 1.5),
                    P.affine(img, angle=33, scale=0.9)):
        assert D.photo_check(changed) == ([], False)
    assert D.verdict(0.0, 0.5) == D.verdict(0.49, 0.5, False) == "good" and D.verdict(0.5, 0.5) == "bad"


def test_photo_notes_say_when_no_part_stands_out():
    for blank in (np.full((120, 120), 90, np.uint8), np.zeros((64, 64, 3), np.uint8)):
        notes = D.photo_notes(blank)
        assert len(notes) == 1 and notes[0].startswith("no round part") and D.photo_held(blank)
    assert D.notes_text([]) == "" and D.notes_text(["a", "b"]) == "\n  note: a\n  note: b"


def test_an_outline_that_is_no_ellipse_says_nothing_about_the_camera():
    """A dark mark joined to the part's disc stretches the region (the casting folder's leaks into a rim
    patch); its axes are not a tilt, so no note, until the outline is far from round: then the part is
    held, and the note names no tilt. A disc split by a bright hub is still seen as a disc."""
    img = _disc(r=60.0, fg=40, bg=170)
    img[135:165, 200:245] = 40                                   # a dark patch joined to the disc's edge
    o = D.part_outline(img)
    assert D.FAR_FROM_ROUND < o.axis_ratio < D.OVAL_RATIO and o.ellipse_fit < D.ELLIPSE_FIT
    assert D.photo_check(img) == ([], False)
    img[135:165, 245:265] = 40                                   # a longer one: far from round
    half = _disc(r=80.0, fg=40, bg=170)
    half[:, 150:] = 170                                          # half a part: broken
    for far in (img, half):
        o = D.part_outline(far)
        assert o.axis_ratio < D.FAR_FROM_ROUND and o.ellipse_fit < D.ELLIPSE_FIT
        notes, held = D.photo_check(far)
        assert held and len(notes) == 1 and notes[0].startswith("the part's outline is far from round")
        assert f"axes {o.axis_ratio:.2f}" in notes[0] and "degrees" not in notes[0]
    yy, xx = np.mgrid[0:300, 0:300] - 150.0                      # an arc of a dark ring, as a brighter exposure
    arc = np.full((300, 300), 170, np.uint8)                     # can leave of the casting's inner ring: a fragment
    arc[(np.hypot(xx, yy) < 70) & (np.hypot(xx, yy) > 45) & (np.arctan2(yy, xx) < math.radians(20))] = 40
    o = D.part_outline(arc)
    assert o.axis_ratio < D.FAR_FROM_ROUND and o.surround < D.SURROUND_MIN and D.part_outline(half).surround == 1.0
    assert D.photo_check(arc) == ([], False)
    ring = _disc(r=70.0, fg=40, bg=170, hole=0.45)               # a bore in the middle: the hull closes it
    ring[:150, 148:153] = 170                                    # and a bright spoke cuts it open, as a hub can
    tilted = P.affine(ring, squash=0.7, squash_angle=0)
    o = D.part_outline(tilted)
    assert o.axis_ratio == pytest.approx(0.7, abs=0.04) and o.ellipse_fit >= D.ELLIPSE_FIT
    assert len(D.photo_notes(tilted)) == 1


def _emblems(n: int, seed: int, size: int = 384) -> list[np.ndarray]:
    from defectcls.synth import image_seed, render_part

    return [np.asarray(render_part(image_seed(seed, "good", i), False, size=size)[0].convert("L")) for i in range(n)]


def test_sharpness_follows_focus_not_light():
    for img in _emblems(3, 555):
        s0 = D.sharpness(img)
        assert 0.97 < D.sharpness(P.contrast(img, 0.7)) / s0 < 1.03          # a ratio of two detail bands
        assert 0.85 < D.sharpness(P.brightness(img, 1.25)) / s0 < 1.0        # (clipped highlights lose a little)
        assert 0.9 < D.sharpness(P.gamma(img, 1.4)) / s0 < 1.15
        assert D.sharpness(P.blur(img, 0.75)) / s0 < 0.6 and D.sharpness(P.blur(img, 1.5)) / s0 < 0.3
        assert D.sharpness(P.noise(img, 8, np.random.default_rng(0))) / s0 > 1.2
        assert D.sharpness(P.affine(img, scale=1.2)) / s0 < 0.8             # enlarged: detail moves to coarser scales


def test_photo_notes_compare_the_photo_with_the_training_photos(tmp_path):
    paths = []
    for i, img in enumerate(_emblems(16, 555)):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(img).save(paths[-1])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rng = D.estimate_photo_range([*paths, str(tmp_path / "broken.png")], seed=0, n=17)
    assert rng["n"] == 16                                                     # the unreadable one is skipped
    lo, mid, hi = rng["sharpness"]
    measured = [D.sharpness(D.load_image(p)) for p in paths]
    assert min(measured) <= lo <= mid <= hi <= max(measured) and mid == pytest.approx(np.median(measured), rel=1e-3)
    for img in _emblems(4, 777):                                             # photos it did not measure
        assert D.photo_notes(img, rng) == []
        soft = D.photo_notes(P.blur(img, 1.5), rng)
        assert len(soft) == 1 and soft[0].startswith("the photo looks softer than in training")
        assert f"{D.sharpness(P.blur(img, 1.5)):.2f}" in soft[0] and f"training {lo:.2f}-{hi:.2f}" in soft[0]
        for drift in (P.brightness(img, 1.25), P.contrast(img, 0.7), P.gamma(img, 1.4), P.jpeg(img, 30),
                      P.affine(img, angle=33, scale=0.9)):
            assert D.photo_notes(drift, rng) == []
        assert D.photo_notes(P.blur(img, 1.5)) == []                         # without a range: not checked
    tilted_soft = D.photo_notes(P.blur(P.affine(img, squash=0.6), 1.5), rng)
    assert [n.split(" (")[0] for n in tilted_soft] == ["the part looks oval", "the photo looks softer than in training"]
    assert D.estimate_photo_range([str(tmp_path / "broken.png")]) is None
    assert D.photo_notes(np.full((120, 120), 90, np.uint8), rng)[0].startswith("no round part")


def test_photo_notes_say_when_the_part_is_sized_past_what_training_showed(tmp_path):
    paths = []
    for i, img in enumerate(_emblems(12, 555)):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(img).save(paths[-1])
    rng = D.estimate_photo_range(paths, seed=0, n=12)
    sizes = [D.part_size(D.load_image(p)) for p in paths]
    lo, mid, hi = rng["size"]
    assert min(sizes) <= lo <= mid <= hi <= max(sizes) and 0.3 < mid < 0.45   # the emblem's disc, of the side
    assert D.trained_sizes(rng) is None                                        # no zoom on record: nothing said
    photos = _emblems(4, 777)                                                  # photos it did not measure
    assert all(D.photo_notes(P.affine(img, scale=0.7), rng) == [] for img in photos)
    rng["zoom"] = 0.15                                                         # trained with zoom +-15%
    assert D.trained_sizes(rng) == pytest.approx((0.85 * lo, 1.15 * hi))
    for img in photos:
        assert D.photo_notes(img, rng) == []
        for near in (P.affine(img, scale=0.88), P.affine(img, scale=1.1), P.affine(img, angle=40, scale=0.9, shift=(0.03, 0))):
            assert D.photo_notes(near, rng) == []                              # within the zoom it was trained on
        far = P.affine(img, scale=0.6)
        notes = D.photo_notes(far, rng)
        assert len(notes) == 1 and notes[0].startswith("the part's size in the photo is outside what the model was")
        assert f"radius {D.part_size(far):.3f} of the side, trained on {0.85 * lo:.3f}-{1.15 * hi:.3f}" in notes[0]
        assert D.photo_check(far, rng)[1] is False                             # a note, not a hold
        oval = D.photo_check(P.affine(img, squash=0.6), rng)                   # (a smaller area, but tilted)
        assert oval[1] is True and [n.split(" (")[0] for n in oval[0]] == ["the part looks oval"]
    # a tool's black corners around a part on a light background: the whole photo would measure as the part, so
    # the size is measured where the card's background mended them (as the model sees the photo)
    disc = _disc(fg=40, bg=170, hole=0.35)
    near = {"sharpness": [0.0, 0.0, 9.0], "size": [0.22, D.part_size(disc), 0.25], "zoom": 0.15, "n": 1}
    prep = D.Preprocessing("gray", 64, (0.5,), (0.25,), background=(170.0,), photo_range=near)
    corners = P.affine(disc, angle=30, scale=0.9, fill="black")
    assert D.photo_notes(corners, near)[0].startswith("the part's size in the photo")     # (as it came)
    assert prep.prepare(corners).notes == [] and prep.prepare(disc).notes == []
    assert prep.prepare(P.affine(disc, scale=0.6, fill="black")).notes[0].startswith("the part's size in the photo")
    assert D.photo_check(disc, near, filled=np.full_like(disc, 90)) == ([], False)   # no part where it is mended
    rng["zoom"] = 0.0                                                          # no zoom in training: the photos' own
    assert D.photo_notes(P.affine(photos[0], scale=0.8), rng)[0].startswith("the part's size in the photo")
    assert D.part_size(np.full((120, 120), 90, np.uint8)) is None


def test_restore_focus_sharpens_only_photos_softer_than_the_training_photos(tmp_path):
    img = _emblems(1, 555)[0]
    low = 0.8 * D.sharpness(img)                                            # a training range this photo is within
    assert D.restore_focus(img, low) is img and D.restore_focus(img, None) is img
    for sigma in (1.0, 1.5, 2.0):
        soft = P.blur(img, sigma)
        back = D.restore_focus(soft, low)
        assert back.shape == soft.shape and back.dtype == np.uint8
        assert D.sharpness(soft) * 1.5 < D.sharpness(back) < D.sharpness(img) * 1.2    # back towards, not past, the range
    rgb = np.stack([P.blur(img, 1.5)] * 3, axis=-1)
    assert D.restore_focus(rgb, low).shape == rgb.shape and (D.restore_focus(rgb, low)[..., 0] != rgb[..., 0]).any()
    # one path: decoding for training and scoring, and the predictors' preprocessing, sharpen alike
    path = tmp_path / "soft.png"
    Image.fromarray(P.blur(img, 1.5)).save(path)
    prep = D.Preprocessing("gray", 64, (0.5,), (0.25,), focus_below=low)
    decoded, ok, _ = D.decode_all([D.Sample(str(path), 0)], 64, "gray", workers=1, use_disk_cache=False, focus_below=low)
    assert ok == [0] and np.array_equal(decoded[0, 0], D.fit_frame(D.load_image(path), 64, focus_below=low))
    assert np.array_equal(prep.preprocess(str(path)), D.normalize(decoded[0, 0], (0.5,), (0.25,)))
    assert not np.array_equal(prep.preprocess(str(path)), D.Preprocessing("gray", 64, (0.5,), (0.25,)).preprocess(str(path)))
    assert D.cache_path([], 64, "gray", focus_below=low) != D.cache_path([], 64, "gray")


def test_prepare_gives_the_preprocessed_input_and_notes_measuring_sharpness_once(monkeypatch):
    img = _emblems(1, 555)[0]
    s0 = D.sharpness(img)
    rng = {"sharpness": [0.9 * s0, s0, 1.1 * s0], "n": 1}
    calls = []
    measure = D.sharpness
    monkeypatch.setattr(D, "sharpness", lambda a: calls.append(1) or measure(a))
    corners = P.affine(_disc(fg=40, bg=170, hole=0.35), angle=30, scale=0.8, fill="black")   # a tool's black corners
    assert D.restore_fill(corners, (160.0,)) is not corners                  # (mended on a light background)
    for focus in (None, 0.9 * s0):
        prep = D.Preprocessing("gray", 64, (0.5,), (0.25,), background=(160.0,), photo_range=rng, focus_below=focus)
        for photo in (img, P.blur(img, 1.5), corners, P.blur(corners, 1.5)):
            calls.clear()
            ready = prep.prepare(photo)
            mended = D.restore_fill(photo, prep.background) is not photo
            assert len(calls) == (1 if focus is None else 1 + mended)     # once, unless a fill changed the photo
            assert np.array_equal(ready.x, prep.preprocess(photo)) and ready.box is None
            assert ready.notes == D.photo_notes(photo, rng)
            assert ready.preprocess_ms >= 0 and ready.check_ms >= 0
    assert prep.prepare(P.blur(img, 1.5)).notes[0].startswith("the photo looks softer than in training")
    framed = D.Preprocessing("gray", 64, (0.5,), (0.25,), frame_ref=0.3, photo_range=rng, focus_below=0.9 * s0)
    for photo in (img, P.blur(img, 1.5)):                                   # the overlay's square is the input's
        assert framed.prepare(photo).box is not None and framed.prepare(photo).box == framed.box(photo)
