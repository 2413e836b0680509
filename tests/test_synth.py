"""Tests of the procedural part-photo generator (small sizes, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectcls.synth import BASE_RADIUS_FRAC, DEFECT_KINDS, PartSpec, generate, image_seed, render_part


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rho(meta: dict, size: int) -> np.ndarray:
    """Distance from the part centre in part radii, from the meta dict."""
    c = (size - 1) / 2.0
    cx, cy = c + meta["offset"][0], c + meta["offset"][1]
    r = meta["scale"] * BASE_RADIUS_FRAC * size
    yy, xx = np.mgrid[0:size, 0:size]
    return np.hypot(xx - cx, yy - cy) / r


def test_image_seed_stable_and_distinct() -> None:
    assert image_seed(0, "good", 3) == image_seed(0, "good", 3)
    seeds = {image_seed(s, lab, i) for s in (0, 1) for lab in ("good", "bad") for i in range(5)}
    assert len(seeds) == 20
    assert all(isinstance(s, int) and s >= 0 for s in seeds)


def test_partspec_is_frozen() -> None:
    spec = PartSpec.sample(np.random.default_rng(0), 64)
    with pytest.raises(AttributeError):
        spec.scale = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("size", [64, 96])
def test_render_shapes_and_meta(size: int) -> None:
    img, mask, meta = render_part(image_seed(0, "good", 0), False, size)
    assert img.mode == "RGB" and img.size == (size, size)
    assert mask is None and meta["defects"] == []
    img, mask, meta = render_part(image_seed(0, "bad", 0), True, size)
    assert img.mode == "RGB" and img.size == (size, size)
    assert mask is not None and mask.dtype == np.uint8 and mask.shape == (size, size)
    assert set(np.unique(mask).tolist()) == {0, 255}
    json.dumps(meta)
    for key in ("rotation", "offset", "scale", "color_cast", "defects"):
        assert key in meta
    assert 0.0 <= meta["rotation"] < 360.0
    assert 0.92 <= meta["scale"] <= 1.08
    assert max(abs(v) for v in meta["offset"]) <= 0.03 * size
    assert 1 <= len(meta["defects"]) <= 3
    for d in meta["defects"]:
        assert d["kind"] in DEFECT_KINDS
        assert 0.0 <= d["severity"] <= 1.0
        x0, y0, x1, y1 = d["bbox"]
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size


def test_render_deterministic() -> None:
    a = render_part(12345, True, 96)
    b = render_part(12345, True, 96)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert np.array_equal(a[1], b[1])
    assert a[2] == b[2]


def test_generate_layout_determinism_and_workers(tmp_path: Path) -> None:
    kw = dict(n_good=3, n_bad=3, seed=7, size=64, masks=True)
    s1 = generate(tmp_path / "a", **kw)
    generate(tmp_path / "b", **kw)
    generate(tmp_path / "c", workers=2, **kw)
    assert s1 == {"out": str(tmp_path / "a"), "n_good": 3, "n_bad": 3, "size": 64, "seed": 7}
    ta, tb, tc = (_tree_bytes(tmp_path / d) for d in "abc")
    expected = {f"good/good_{i:05d}.png" for i in range(3)}
    expected |= {f"bad/bad_{i:05d}.png" for i in range(3)}
    expected |= {f"masks/bad_{i:05d}.png" for i in range(3)}
    assert set(ta) == expected
    assert ta == tb == tc
    for name in ta:
        with Image.open(tmp_path / "a" / name) as im:
            assert im.size == (64, 64)
            assert im.mode == ("L" if name.startswith("masks/") else "RGB")
            assert not im.info and not im.text  # no metadata chunks
    # Image i of a class does not depend on how many images are asked for.
    generate(tmp_path / "d", n_good=2, n_bad=1, seed=7, size=64)
    td = _tree_bytes(tmp_path / "d")
    assert set(td) == {"good/good_00000.png", "good/good_00001.png", "bad/bad_00000.png"}
    assert all(td[k] == ta[k] for k in td)
    # A different seed gives different images.
    generate(tmp_path / "e", n_good=1, n_bad=0, seed=8, size=64)
    assert _tree_bytes(tmp_path / "e")["good/good_00000.png"] != ta["good/good_00000.png"]


def test_no_masks_without_flag(tmp_path: Path) -> None:
    generate(tmp_path, n_good=1, n_bad=1, size=64)
    assert not (tmp_path / "masks").exists()
    assert (tmp_path / "bad" / "bad_00000.png").is_file()


def test_masks_nonempty_inside_disc_and_bbox_consistent() -> None:
    size = 128
    for i in range(12):
        _, mask, meta = render_part(image_seed(1, "bad", i), True, size)
        assert mask is not None and (mask > 0).sum() > 0
        rho = _rho(meta, size)
        assert rho[mask > 0].max() < 1.0
        for d in meta["defects"]:
            x0, y0, x1, y1 = d["bbox"]
            assert mask[y0:y1, x0:x1].any()
        ys, xs = np.nonzero(mask)
        assert xs.min() == min(d["bbox"][0] for d in meta["defects"])
        assert ys.max() + 1 == max(d["bbox"][3] for d in meta["defects"])


def test_bad_is_good_plus_local_defects() -> None:
    size = 128
    for i in range(8):
        s = image_seed(2, "bad", i)
        good, _, gmeta = render_part(s, False, size)
        bad, mask, bmeta = render_part(s, True, size)
        assert gmeta["rotation"] == bmeta["rotation"] and gmeta["color_cast"] == bmeta["color_cast"]
        g = np.asarray(good).astype(np.int16)
        b = np.asarray(bad).astype(np.int16)
        diff = np.abs(g - b).max(axis=2)
        inside = mask > 0
        assert diff[inside].mean() > 10.0
        # Nothing changes away from the defects (bbox grown for soft edges).
        near = np.zeros_like(inside)
        for d in bmeta["defects"]:
            x0, y0, x1, y1 = d["bbox"]
            mx, my = (x1 - x0) // 3 + 3, (y1 - y0) // 3 + 3
            near[max(y0 - my, 0) : y1 + my, max(x0 - mx, 0) : x1 + mx] = True
        assert diff[~near].max() == 0


def test_background_corners_dark() -> None:
    size = 96
    for lab in ("good", "bad"):
        for i in range(6):
            img, _, meta = render_part(image_seed(3, lab, i), lab == "bad", size)
            a = np.asarray(img).astype(np.float32)
            for patch in (a[:8, :8], a[:8, -8:], a[-8:, :8], a[-8:, -8:]):
                m = patch.reshape(-1, 3).mean(axis=0)
                assert m[0] < 40.0 and m[1] < 20.0 and m[2] < 20.0, (lab, i, m)


def test_color_cast_only_on_background_and_label_free() -> None:
    size = 48
    rates = {}
    for lab in ("good", "bad"):
        n_cast = 0
        for i in range(80):
            img, _, meta = render_part(image_seed(4, lab, i), lab == "bad", size)
            a = np.asarray(img).astype(np.int16)
            part = _rho(meta, size) < 0.97
            # The part itself is always exactly gray.
            assert (a[part, 0] == a[part, 1]).all() and (a[part, 1] == a[part, 2]).all()
            bg = a[_rho(meta, size) > 1.05]
            if meta["color_cast"]:
                n_cast += 1
                assert bg[:, 0].mean() > bg[:, 1].mean() + 5.0
                assert bg[:, 1].mean() >= bg[:, 2].mean()
            else:
                assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
        rates[lab] = n_cast / 80
    assert all(0.15 <= r <= 0.45 for r in rates.values()), rates


def test_good_parts_vary() -> None:
    metas = [render_part(image_seed(5, "good", i), False, 32)[2] for i in range(10)]
    assert len({round(m["rotation"], 3) for m in metas}) == 10
    assert len({round(m["scale"], 4) for m in metas}) == 10


def test_hard_case_sets_narrow_kinds_and_severity(tmp_path: Path) -> None:
    """--defects/--subtle-share make a set of the hard cases; the defaults stay the product's mix."""
    from defectcls.cli import main
    from defectcls.errors import DefectclsError
    from defectcls.synth import SUBTLE_THRESHOLD

    metas = [render_part(image_seed(3, "bad", i), True, 64, ("scratch",), 1.0)[2] for i in range(12)]
    assert all(d["kind"] == "scratch" for m in metas for d in m["defects"])
    assert all(m["subtle"] and all(d["severity"] > SUBTLE_THRESHOLD for d in m["defects"]) for m in metas)
    mixed = [render_part(image_seed(3, "bad", i), True, 64)[2] for i in range(40)]
    assert len({d["kind"] for m in mixed for d in m["defects"]}) == len(DEFECT_KINDS)
    assert not all(m["subtle"] for m in mixed)

    out = tmp_path / "hard"
    assert main(["synth", "--out", str(out), "--good", "0", "--bad", "1", "--size", "64", "--defects", "scratch",
                 "--subtle-share", "1", "--json"]) == 0
    assert len(list((out / "bad").glob("*.png"))) == 1
    with pytest.raises(DefectclsError, match="defect kinds"):
        render_part(1, True, 64, ("dent",))
    for bad in (["--defects", "scratch,dent"], ["--subtle-share", "1.5"]):
        rc = main(["synth", "--out", str(tmp_path / "no"), "--bad", "1", "--size", "64", *bad])
        assert rc == 2 and not (tmp_path / "no").exists()
