import numpy as np
import pytest
import torch
from PIL import Image

from defectcls import data as D
from defectcls.errors import DefectclsError, ImageLoadError
from defectcls.inference import Predictor
from defectcls.train import to_input

from .badfiles import invalid_files, valid_files
from .parts import part_photo

EXPECTED_REASON = {
    "empty.png": "empty",
    "text.png": "not a recognised image",
    "page.png": "not a recognised image",
    "truncated.png": "truncated",
    "truncated.jpg": "truncated",
    "tiny_1x1.png": "1x1",
    "thin_3x400.png": "3x400",
    "vector.svg": "not a recognised image",
    "bomb.png": "pixels",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_REASON))
def test_invalid_inputs_get_a_one_line_reason(name, tmp_path):
    data = invalid_files()[name]
    path = tmp_path / name
    path.write_bytes(data)
    for src in (path, data):
        with pytest.raises(ImageLoadError) as err:
            D.load_image(src)
        msg = str(err.value)
        assert "\n" not in msg
        assert EXPECTED_REASON[name] in msg
    if data:
        assert str(path) in str(pytest.raises(ImageLoadError, D.load_image, path).value)


@pytest.mark.parametrize("name", sorted(valid_files()))
@pytest.mark.parametrize("color", ["gray", "rgb"])
def test_valid_odd_images_decode(name, color):
    arr = D.load_image(valid_files()[name], color)
    assert arr.dtype == np.uint8
    assert arr.ndim == (2 if color == "gray" else 3)
    # the synthetic part is bright in the middle and dark in the corner, whatever the encoding
    h, w = arr.shape[:2]
    assert arr[h // 2, w // 2].mean() > 100 and arr[0, 0].mean() < 40


@pytest.mark.parametrize("color", ["gray", "rgb"])
def test_fast_png_decoder_matches_pillow(color, monkeypatch):
    """The libspng path returns Pillow's exact pixels, and the same errors, on the whole corpus."""
    if D._spng is None:
        pytest.skip("pyspng is not installed on this platform")
    import io

    from defectcls.synth import render_part

    part, _, _ = render_part(3, True, 256)
    files = dict(valid_files())
    for mode in ("RGB", "L"):
        buf = io.BytesIO()
        part.convert(mode).save(buf, format="PNG", compress_level=6)
        files[f"part_{mode}.png"] = buf.getvalue()
    fast = {k: D.load_image(v, color) for k, v in files.items()}
    fast_errors = {k: str(pytest.raises(ImageLoadError, D.load_image, v, color).value)
                   for k, v in invalid_files().items()}
    calls = []
    real = D._spng.load
    monkeypatch.setattr(D._spng, "load", lambda b: calls.append(1) or real(b))
    again = D.load_image(files["part_RGB.png"], color)
    assert calls, "a plain RGB PNG must take the fast path"
    np.testing.assert_array_equal(again, fast["part_RGB.png"])
    monkeypatch.setattr(D, "_spng", None)
    for k, v in files.items():
        np.testing.assert_array_equal(fast[k], D.load_image(v, color), err_msg=k)
    for k, v in invalid_files().items():
        assert fast_errors[k] == str(pytest.raises(ImageLoadError, D.load_image, v, color).value)


def test_sixteen_bit_keeps_range_and_exif_is_applied():
    a8 = D.load_image(valid_files()["gray.png"])
    a16 = D.load_image(valid_files()["gray16.png"])
    assert np.abs(a8.astype(int) - a16.astype(int)).max() <= 1
    img = Image.new("L", (40, 20), 0)
    img.paste(255, (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    rotated = D.load_image(buf.getvalue())
    assert rotated.shape == (40, 20)  # displayed orientation


def test_fit_square_pads_with_black_and_resizes():
    arr = np.full((20, 40), 200, np.uint8)
    out = D.fit_square(arr, 16)
    assert out.shape == (16, 16)
    assert out[0, 8] < 10 and out[8, 8] > 190


def test_scan_folder_errors(tmp_path):
    with pytest.raises(DefectclsError, match="does not exist"):
        D.scan_folder(tmp_path / "nope")
    (tmp_path / "good").mkdir()
    with pytest.raises(DefectclsError, match="bad/"):
        D.scan_folder(tmp_path)
    (tmp_path / "bad").mkdir()
    with pytest.raises(DefectclsError, match="no images"):
        D.scan_folder(tmp_path)


def test_stratified_split_is_seeded_disjoint_and_stratified():
    labels = [0] * 100 + [1] * 35
    a = D.stratified_split(labels, (0.7, 0.15, 0.15), seed=1)
    b = D.stratified_split(labels, (0.7, 0.15, 0.15), seed=1)
    c = D.stratified_split(labels, (0.7, 0.15, 0.15), seed=2)
    assert a == b and a != c
    allidx = a["train"] + a["val"] + a["test"]
    assert sorted(allidx) == list(range(135))  # every image once, no leakage between parts
    for part, n in (("val", 15 + 5), ("test", 15 + 5)):
        ys = [labels[i] for i in a[part]]
        assert len(ys) == n and ys.count(1) == 5
    assert [labels[i] for i in a["train"]].count(1) == 25


def test_decode_all_skips_unreadable_by_name(tmp_path, tiny_data):
    bad = tmp_path / "good"
    bad.mkdir()
    (tmp_path / "bad").mkdir()
    (bad / "broken.png").write_bytes(b"nope")
    samples = D.scan_folder(tiny_data)[:5] + D.scan_folder(tmp_path)
    images, ok, failed = D.decode_all(samples, 32, "gray", workers=1, use_disk_cache=False)
    assert images.shape == (5, 1, 32, 32) and ok == [0, 1, 2, 3, 4]
    assert failed[0][0].endswith("broken.png") and "not a recognised image" in failed[0][1]


def test_disk_cache_round_trip(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("DEFECTCLS_CACHE_DIR", str(tmp_path / "cache"))
    samples = D.scan_folder(tiny_data)[:6]
    first = D.decode_all(samples, 32, "gray", workers=1)
    assert list((tmp_path / "cache").glob("decoded-*.npz"))
    second = D.decode_all(samples, 32, "gray", workers=1)
    assert np.array_equal(first[0], second[0]) and first[1] == second[1]


def test_training_eval_and_inference_preprocessing_are_identical(tiny_model, tiny_data):
    """The cached training path (decode_all -> to_input) gives the same tensor as Predictor.preprocess."""
    pred = Predictor(tiny_model, device="cpu")
    c = pred.card
    samples = D.scan_folder(tiny_data)[:4]
    assert c.background is not None and len(c.background) == c.in_chans   # training records the photos' background
    images, _, _ = D.decode_all(samples, c.img_size, c.color, workers=1, use_disk_cache=False, background=c.background)
    mean = torch.tensor(c.mean).view(1, -1, 1, 1)
    std = torch.tensor(c.std).view(1, -1, 1, 1)
    train_side = to_input(torch.from_numpy(images), mean, std).numpy()
    infer_side = np.stack([pred.preprocess(s.path) for s in samples])
    np.testing.assert_allclose(train_side, infer_side, atol=1e-6)
    from_bytes = pred.preprocess(open(samples[0].path, "rb").read())
    np.testing.assert_array_equal(from_bytes, infer_side[0])


@pytest.mark.parametrize("pose", [dict(angle=37), dict(scale=0.9), dict(angle=20, scale=0.92, shift=(-0.03, 0))])
def test_restore_fill_gives_a_tools_corners_the_photos_background(pose):
    from defectcls.perturb import affine

    img = part_photo(bg=165, part=40, noise=6)               # a grainy background, as photographed
    ours = affine(img, **pose).astype(int)                     # training's own fill: the photo's background
    for fill in ("black", "white"):
        filled = affine(img, fill=fill, **pose)
        restored = D.restore_fill(filled, [165.0])
        assert np.abs(filled.astype(int) - ours).mean() > 10   # the corners as the tool left them
        assert np.abs(restored.astype(int) - ours).mean() < 1.5
        rgb = D.restore_fill(np.repeat(filled[..., None], 3, axis=2), [165.0] * 3)
        assert all(np.array_equal(rgb[..., k], restored) for k in range(3))
    assert D.restore_fill(filled, None) is filled              # cards before it: the photo as it is
    assert D.restore_fill(img, [165.0]) is img                 # nothing filled: nothing copied
    black = affine(img, fill="black", **pose)
    assert D.restore_fill(black, [5.0]) is black               # black on a part shot on black is background


def test_restore_fill_leaves_light_clipped_to_white_by_a_brighter_exposure():
    from defectcls.perturb import affine, brightness

    # light falling off across the photo, clipped on its bright side: no step onto the white
    lit = part_photo(bg=165, part=40, noise=3).astype(float) + np.linspace(-40, 70, 120)[None, :]
    side = brightness(np.clip(lit, 0, 255).astype(np.uint8), 1.2)
    assert (side[:, -1] == 255).all() and (side == 255).mean() > 0.05
    assert D.restore_fill(side, [165.0]) is side
    rgb = np.repeat(side[..., None], 3, axis=2)
    assert D.restore_fill(rgb, [165.0] * 3) is rgb
    # white that wraps round the part, with a step onto it: inside the hull of what is left of the photo
    wrap = part_photo(bg=255, part=40)
    wrap[:, :12] = 150                                          # unclipped background down one side
    white = wrap == 255
    assert D._is_fill(white, wrap, 255) is False
    assert D.restore_fill(wrap, [165.0]) is wrap
    # a tool's corners, for contrast: outside the footprint of the turned photo
    from scipy import ndimage as ndi

    turned = affine(part_photo(bg=165, part=40, noise=6), angle=37, fill="white")
    lab, _ = ndi.label(turned >= 249)
    assert D._is_fill(lab == lab[0, 0], turned, 255) is True


def test_preprocessing_restores_fills_by_the_cards_background(tiny_data):
    from defectcls.perturb import affine

    img = part_photo(bg=165, part=40, noise=6)               # a grainy background, as photographed
    plain = D.Preprocessing("gray", 32, (0.5,), (0.25,))
    card = {"color": "gray", "img_size": 32, "mean": [0.5], "std": [0.25], "background": [165.0]}
    prep = D.Preprocessing.from_card(card)
    assert prep.background == (165.0,)
    ours, black = affine(img, angle=37), affine(img, angle=37, fill="black")
    assert np.abs(prep.preprocess(black) - prep.preprocess(ours)).mean() < 0.05
    assert np.abs(plain.preprocess(black) - plain.preprocess(ours)).mean() > 0.3   # 17% of it black
    assert np.array_equal(prep.preprocess(img), plain.preprocess(img))
    bg = D.estimate_background([str(s.path) for s in D.scan_folder(tiny_data)], "gray", n=12)
    assert len(bg) == 1 and bg[0] < 40                          # the synthetic emblems lie on black
    assert D.estimate_background([], "gray") is None
    paths = [str(s.path) for s in D.scan_folder(tiny_data)]                  # training's one pass over the photos
    assert D.estimate_look(paths, "gray", n=12, seed=4) == (D.estimate_background(paths, "gray", n=12, seed=4),
                                                           D.estimate_photo_range(paths, "gray", n=12, seed=4))
    assert D.estimate_look([], "gray") == (None, None)


def test_label_csv_merge(tmp_path, tiny_data):
    samples = D.scan_folder(tiny_data)
    target = samples[0]
    assert target.label == 0
    new = tmp_path / "new.png"
    new.write_bytes(open(samples[1].path, "rb").read())
    csv = tmp_path / "labels.csv"
    csv.write_text(f"path,label,sha256\n{target.path},bad,x\nnew.png,good,y\n")
    merged, over, added = D.merge_labels(samples, D.read_label_csv(csv))
    assert (over, added) == (1, 1)
    assert merged[0].label == 1 and merged[-1].path == str(new)
    csv.write_text("path,label\na.png,maybe\n")
    with pytest.raises(DefectclsError, match="good' or 'bad"):
        D.read_label_csv(csv)
