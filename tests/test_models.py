import json
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from defectcls import models as M
from defectcls.errors import DefectclsError, ModelLoadError
from defectcls.inference import Predictor


@pytest.mark.parametrize("arch", sorted(M.ARCHS))
def test_every_arch_builds_with_one_channel_stem_and_two_classes(arch):
    model = M.build_model(arch, in_chans=1).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 64, 64))
    assert out.shape == (2, 2)
    assert isinstance(M.cam_target_layer(model, arch), torch.nn.Module)


def test_adapt_input_conv_sums_rgb_kernels():
    w = torch.randn(8, 3, 3, 3)
    np.testing.assert_allclose(M.adapt_input_conv(1, w)[:, 0], w[:, 0] + w[:, 1] + w[:, 2], rtol=1e-6)
    assert M.adapt_input_conv(3, w) is w


@pytest.mark.parametrize("arch,stem", [("mobilenet_v3_large", "features.0.0.weight"), ("resnet50", "conv1.weight")])
def test_pretrained_from_local_file_adapts_stem(tmp_path, arch, stem):
    """A locally made ImageNet-shaped state dict stands in for the download."""
    torch.manual_seed(0)
    ref = torchvision.models.get_model(arch, weights=None)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    path = tmp_path / "imagenet.safetensors"
    save_file(sd, str(path))
    model = M.build_model(arch, in_chans=1, pretrained_file=str(path))
    got = model.state_dict()
    torch.testing.assert_close(got[stem], sd[stem].sum(dim=1, keepdim=True))
    # every backbone weight beyond the stem and the 2-class head comes through unchanged
    same = [k for k in sd if k != stem and got[k].shape == sd[k].shape]
    assert len(same) >= len(sd) - 3
    for k in same:
        torch.testing.assert_close(got[k], sd[k])


def test_pretrained_offline_fails_with_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline, raising=False)
    with pytest.raises(ModelLoadError, match="offline"):
        M.build_model("mobilenet_v3_large", pretrained=True)


def test_pickled_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "model.pt"
    torch.save({"w": Evil()}, path)
    with pytest.raises(ModelLoadError, match="refused"):
        M.load_state_file(path)
    (tmp_path / "card.json").write_text(json.dumps({"arch": "resnet18"}))
    with pytest.raises(ModelLoadError, match="pickled"):
        M.load_model_dir(tmp_path)


def test_plain_state_dict_file_loads(tmp_path):
    sd = {"w": torch.ones(2)}
    torch.save(sd, tmp_path / "w.pth")
    assert torch.equal(M.load_state_file(tmp_path / "w.pth")["w"], sd["w"])


def test_save_load_round_trip_fp32_and_fp16(tmp_path, tiny_model, tiny_data):
    model, card = M.load_model_dir(tiny_model)
    card_dict = card.to_dict()
    for key in ("arch", "in_chans", "img_size", "mean", "std", "labels", "positive_label", "threshold",
                "temperature", "metrics", "train", "created", "versions"):
        assert key in card_dict
    assert card.labels == ["good", "bad"] and card.positive_label == "bad"
    p32 = M.save_model_dir(model, card, tmp_path / "m32")
    p16 = M.save_model_dir(model, card, tmp_path / "m16", fp16=True)
    m2, c2 = M.load_model_dir(p32)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v, rtol=0, atol=0)
    assert (p16 / M.WEIGHTS_FILE).stat().st_size < 0.6 * (p32 / M.WEIGHTS_FILE).stat().st_size
    assert M.read_card(p16).storage_dtype == "float16"
    files = sorted((tiny_data / "bad").glob("*.png"))[:4] + sorted((tiny_data / "good").glob("*.png"))[:4]
    a, b = Predictor(p32, device="cpu"), Predictor(p16, device="cpu")
    pa = [a.predict(f) for f in files]
    pb = [b.predict(f) for f in files]
    assert max(abs(x.prob_bad - y.prob_bad) for x, y in zip(pa, pb, strict=True)) < 5e-3
    clear = [(x.label, y.label) for x, y in zip(pa, pb, strict=True) if abs(x.prob_bad - x.threshold) > 5e-3]
    assert all(x == y for x, y in clear)  # the same verdict wherever fp16 rounding cannot cross the threshold
    assert a.model_id != b.model_id and a.model_id.startswith("m32@")


def test_bad_model_dirs(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        M.load_model_dir(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no card.json"):
        M.load_model_dir(tmp_path)
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a valid model card"):
        M.load_model_dir(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps({"arch": "vgg99"}))
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="unknown architecture"):
        M.load_model_dir(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps({"arch": "resnet18"}))
    with pytest.raises(ModelLoadError, match="safetensors"):
        M.load_model_dir(tmp_path)


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "resnet18"])
def test_image_input_norm_ignores_light_and_contrast_and_keeps_the_state_dict(arch):
    torch.manual_seed(0)
    plain = M.build_model(arch, input_norm="none").eval()
    std = M.build_model(arch, input_norm="image").eval()
    assert list(std.state_dict()) == list(plain.state_dict())   # same weights file layout
    std.load_state_dict(plain.state_dict())
    x = torch.rand(3, 1, 64, 64)
    drifted = 1.3 * x - 0.2                                       # brighter, more contrast, shifted
    def rel_change(net):   # an untrained network's logits can be tiny: compare relative to their size
        with torch.no_grad():
            a, b = net(x), net(drifted)
        return float((a - b).abs().max() / a.abs().max())

    assert rel_change(std) < 1e-3 and rel_change(plain) > 1e-2
    with pytest.raises(ModelLoadError, match="input normalisation"):
        M.build_model(arch, input_norm="per-pixel")


def test_centre_input_norm_ignores_the_corners_and_light_drift():
    torch.manual_seed(0)
    image = M.build_model("mobilenet_v3_large", input_norm="image").eval()
    centre = M.build_model("mobilenet_v3_large", input_norm="centre").eval()
    assert list(centre.state_dict()) == list(image.state_dict())
    centre.load_state_dict(image.state_dict())
    stem = lambda net: M._stem_conv(net, M.arch_spec("mobilenet_v3_large"))[2]  # noqa: E731
    assert isinstance(stem(centre), M.CentreStandardizedInputConv2d)
    x = torch.rand(3, 1, 64, 64) * 0.5 + 0.25
    filled = x.clone()
    filled[..., :6, :] = 0.0                                     # black and white strips where a turn leaves corners
    filled[..., :, -6:] = 1.0
    with torch.no_grad():
        core = slice(5, 27)                                      # of the 32 px stem output: away from the strips
        a, b = stem(centre)(x), stem(centre)(filled)
        torch.testing.assert_close(a[..., core, core], b[..., core, core])
        moved = (stem(image)(x) - stem(image)(filled))[..., core, core].abs().max()
        assert float(moved) > 0.1                                # the whole-image statistics move with the strips
        drift = (centre(x) - centre(1.3 * x - 0.2)).abs().max() / centre(x).abs().max()
    assert float(drift) < 1e-3


def test_input_norm_is_recorded_on_the_card_and_inherited_by_fine_tuning(tmp_path, tiny_model):
    from defectcls.train import TrainConfig, resolve_config

    card = M.read_card(tiny_model)
    assert card.input_norm == "image"                             # the default recipe
    model, _ = M.load_model_dir(tiny_model)
    assert isinstance(M._stem_conv(model, M.arch_spec(card.arch))[2], M.StandardizedInputConv2d)
    # a card written before the field existed loads as the plain network it was trained as
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / M.WEIGHTS_FILE).write_bytes((tiny_model / M.WEIGHTS_FILE).read_bytes())
    d = json.loads((tiny_model / M.CARD_FILE).read_text())
    d.pop("input_norm")
    (legacy / M.CARD_FILE).write_text(json.dumps(d))
    assert M.read_card(legacy).input_norm == "none"
    assert resolve_config(TrainConfig(data="d", out="o", init=str(legacy))).input_norm == "none"
    assert resolve_config(TrainConfig(data="d", out="o", init=str(legacy), input_norm="image")).input_norm == "image"
    assert resolve_config(TrainConfig(data="d", out="o")).input_norm == "image"


def test_dihedral_views_are_exact_and_merge_back_upright():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5)
    assert all(torch.equal(M.rot90(x, k), torch.rot90(x, k, dims=(-2, -1))) for k in range(-3, 5))
    for views in (4, 8):
        v = M.dihedral_views(x, views)
        assert v.shape == (views * 2, 1, 5, 5)
        torch.testing.assert_close(v[:2], x)                                   # view 0 is the photo itself
        torch.testing.assert_close(v[2:4], torch.rot90(x, 1, dims=(-2, -1)))  # v-major: view 1 of both images
        # each view holds the same pixels (exact transforms, no resampling), and all views differ
        assert all(torch.equal(v[k].flatten().sort().values, x[k % 2].flatten().sort().values) for k in range(len(v)))
        assert len({tuple(t.flatten().tolist()) for t in v[::2]}) == views
        torch.testing.assert_close(M.merge_view_maps(v[:, 0], views), x[:, 0])
    assert M.dihedral_views(x, 1) is x


def test_tta_wrapper_is_the_mean_over_views_and_cards_record_it(tmp_path, tiny_model, tiny_model_tta):
    torch.manual_seed(0)
    net = M.build_model("mobilenet_v3_large").eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        per_view = torch.stack([net(M.dihedral_views(x, 8)[k * 3:(k + 1) * 3]) for k in range(8)])
        torch.testing.assert_close(M.DihedralTTA(net, 8)(x), per_view.mean(0), atol=1e-5, rtol=0)
    assert M.with_tta(net, 1) is net and M.unwrap_tta(M.with_tta(net, 4)) is net
    with pytest.raises(ModelLoadError, match="test-time views"):
        M.with_tta(net, 3)
    assert M.read_card(tiny_model).tta == 1 and M.read_card(tiny_model_tta).tta == 8
    model = Predictor(tiny_model_tta, device="cpu", backend="torch").model    # what answers for the directory
    assert isinstance(model, M.DihedralTTA) and model.views == 8
    # the state dict does not change with views: fine-tuning and weights files stay as they were
    assert list(M.unwrap_tta(model).state_dict()) == list(M.load_model_dir(tiny_model)[0].state_dict())
    d = json.loads((tiny_model / M.CARD_FILE).read_text())
    d["tta"] = 5
    bad = tmp_path / "bad_tta"
    bad.mkdir()
    (bad / M.CARD_FILE).write_text(json.dumps(d))
    with pytest.raises(ModelLoadError, match="tta must be one of 1, 4, 8"):
        M.read_card(bad)


def test_tta_top_averages_the_views_with_the_highest_bad_margin(tmp_path, tiny_model_tta):
    """tta_top K: the image's logits are the mean over its K views whose bad-minus-good margin is highest, so its
    margin is the mean of the K highest view margins; 0, or K at least the views, is the mean over all."""
    from defectcls.bench import calibrate_bn

    torch.manual_seed(0)
    net = M.build_model("mobilenet_v3_large")
    x = torch.rand(3, 1, 64, 64)
    calibrate_bn(net, x)      # realistic activation scales: an untrained network's views would all score alike
    with torch.no_grad():
        z = net(M.dihedral_views(x, 8)).reshape(8, 3, 2)
        margins = (z[..., 1] - z[..., 0]).sort(dim=0).values          # per image, lowest view first
        assert float((margins[-1] - margins[0]).min()) > 1e-4          # the views disagree on every image
        for top in (1, 2, 4):
            out = M.DihedralTTA(net, 8, top)(x)
            torch.testing.assert_close(out[:, 1] - out[:, 0], margins[-top:].mean(0), atol=1e-5, rtol=0)
            # the logits themselves are those views' mean (the good logit too), not a margin alone
            idx = (z[..., 1] - z[..., 0]).topk(top, dim=0).indices
            torch.testing.assert_close(out[:, 0], torch.stack([z[idx[:, n], n, 0].mean() for n in range(3)]))
        torch.testing.assert_close(M.DihedralTTA(net, 8, 8)(x), z.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(M.with_tta(net, 8)(x), z.mean(0), atol=1e-5, rtol=0)
    assert M.with_tta(net, 1, 2) is net and M.DihedralTTA(net, 8, 9).top == 0
    with pytest.raises(ModelLoadError, match="tta_top"):
        M.with_tta(net, 8, -1)
    # cards: before the field, all views; stored as given where fewer than the views, else 0; a bad value refused
    assert M.read_card(tiny_model_tta).tta_top == 0
    d = json.loads((tiny_model_tta / M.CARD_FILE).read_text())
    for top, stored in ((2, 2), (8, 0)):
        (tmp_path / str(top)).mkdir()
        (tmp_path / str(top) / M.CARD_FILE).write_text(json.dumps({**d, "tta_top": top}))
        assert M.read_card(tmp_path / str(top)).tta_top == stored
    (tmp_path / "neg").mkdir()
    (tmp_path / "neg" / M.CARD_FILE).write_text(json.dumps({**d, "tta_top": -1}))
    with pytest.raises(ModelLoadError, match="tta_top"):
        M.read_card(tmp_path / "neg")
    card = M.read_card(tmp_path / "2")
    assert (M.with_views(card, 1).tta, M.with_views(card, 1).tta_top) == (1, 0)     # one view: no choice left
    assert M.with_views(card, 4).tta_top == 2 and M.with_views(card, 4, 0).tta_top == 0


@pytest.mark.parametrize("arch,expected", [("mobilenet_v3_large", 15.5), ("mobilenet_v2", 15.5), ("resnet18", 15.5),
                                           ("resnet50", 15.5), ("squeezenet1_1", 0.5)])
def test_cam_offset_matches_the_geometry_worked_by_hand(arch, expected):
    """MobileNets and ResNets halve the resolution five times with layers padded so that output i is
    centred on input 2i: CAM cell i looks at pixel 32 i, the usual half-pixel scaling draws it at
    32 i + 15.5. SqueezeNet 1.1 halves four times unpadded (output i centred on input 2i + 1: cell i
    at 16 i + 15); at 512 px its 31 cells are drawn at (i + 0.5) * 512 / 31 - 0.5, the middle one
    (i = 15) at 255.5 against 255."""
    assert M.cam_offset(arch) == (expected, expected)


def test_model_cam_offset_follows_the_views(tiny_model, tiny_model_tta):
    """One view: the architecture's offset; 4 or 8 views: each view's map turned back upright is off in
    its own direction, their mean is centred where the usual scaling puts it."""
    assert M.model_cam_offset(tiny_model, M.read_card(tiny_model)) == (15.5, 15.5)
    assert M.model_cam_offset(tiny_model_tta, M.read_card(tiny_model_tta)) == (0.0, 0.0)
    p = Predictor(tiny_model_tta, device="cpu", backend="torch")
    assert p.cam_offset == (0.0, 0.0) and p.upright_cam_offset == (15.5, 15.5)


def test_cam_offset_probe_runs_under_a_callers_inference_mode():
    with torch.inference_mode():
        assert M.cam_offset.__wrapped__("mobilenet_v3_small") == (15.5, 15.5)   # uncached: the probe itself


def test_cam_offset_probe_leaves_the_callers_random_draws_alone():
    """Training asks for the offset once per process: the probe must not move the seeded draws that follow,
    or a second training in the same process would draw differently from the first."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    M.cam_offset.__wrapped__("mobilenet_v3_small")
    assert torch.equal(torch.rand(4), expected)


def test_squeezenet_head_can_output_negative_logits():
    """torchvision's SqueezeNet ends in ReLU; a 2-class head that can only output >= 0 dies from scratch."""
    import torch

    torch.manual_seed(0)
    m = M.build_model("squeezenet1_1").eval()
    assert not any(isinstance(x, torch.nn.ReLU) for x in m.classifier)
    with torch.no_grad():
        m.classifier[1].bias.fill_(-1.0)              # a head pushed below zero still answers
        out = m(torch.rand(4, 1, 96, 96))
    assert (out < 0).any() and out.std() > 0


def test_avgmax_pool_keeps_a_small_spot_that_average_pooling_dilutes():
    x = torch.zeros(2, 3, 12, 12)
    x[0, 1, 5, 7] = 4.0                       # one hot cell of 144: a pin mark's response
    pooled = M.AvgMaxPool2d()(x)
    assert pooled.shape == (2, 3, 1, 1)
    torch.testing.assert_close(pooled, 0.5 * (x.mean((2, 3), keepdim=True) + x.amax((2, 3), keepdim=True)))
    assert float(pooled[0, 1]) > 60 * float(torch.nn.AdaptiveAvgPool2d(1)(x)[0, 1])


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "resnet18", "squeezenet1_1"])
def test_avgmax_pool_swaps_the_pooling_only(arch):
    torch.manual_seed(0)
    avg = M.build_model(arch, pool="avg").eval()
    avgmax = M.build_model(arch, pool="avgmax").eval()
    assert list(avgmax.state_dict()) == list(avg.state_dict())   # no weights of its own: same file layout
    assert sum(isinstance(m, M.AvgMaxPool2d) for m in avgmax.modules()) == 1
    assert not any(isinstance(m, M.AvgMaxPool2d) for m in avg.modules())
    avgmax.load_state_dict(avg.state_dict())
    with torch.no_grad():
        x = torch.rand(2, 1, 64, 64)
        # untrained logits can be ~1e-11: compare relative to their size
        assert avgmax(x).shape == (2, 2) and not torch.allclose(avgmax(x), avg(x), rtol=1e-3, atol=0)


def test_unknown_or_unsupported_pool_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="unknown pooling"):
        M.build_model("resnet18", pool="max")
    with pytest.raises(ModelLoadError, match="--pool avgmax is not available for mobilenet_v2"):
        M.build_model("mobilenet_v2", pool="avgmax")


def test_pool_is_recorded_on_the_card_rebuilt_on_load_and_inherited(tmp_path, tiny_data, tiny_model):
    from defectcls.train import TrainConfig, resolve_config, train

    assert M.read_card(tiny_model).pool == "avg"                 # the default; cards before the field load as avg
    d = json.loads((tiny_model / M.CARD_FILE).read_text())
    d.pop("pool")
    assert M.ModelCard.from_dict(d).pool == "avg"
    out = tmp_path / "m"
    train(TrainConfig(data=str(tiny_data), out=str(out), arch="mobilenet_v3_small", epochs=1, img_size=32,
                      batch_size=16, progress=False, workers=1, disk_cache=False, epoch_size=0, pool="avgmax", tta=1))
    assert M.read_card(out).pool == "avgmax"
    model, _ = M.load_model_dir(out)
    assert isinstance(model.avgpool, M.AvgMaxPool2d)
    assert resolve_config(TrainConfig(data="d", out="o", init=str(out))).pool == "avgmax"   # fine-tuning keeps it
    assert resolve_config(TrainConfig(data="d", out="o", init=str(out), pool="avg")).pool == "avg"
    with pytest.raises(DefectclsError, match="--pool"):
        resolve_config(TrainConfig(data="d", out="o", pool="max"))
