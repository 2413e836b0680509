"""The Gradio app: handlers called directly, then the launched app through gradio_client."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import httpx
import numpy as np
import pytest
from PIL import Image

from defectcls.inference import Predictor
from tests.badfiles import invalid_files, valid_files

REPO = Path(__file__).resolve().parents[2]


def load_app():
    """app.py (it sits at the repo root, outside the package)."""
    if "defectcls_app" in sys.modules:
        return sys.modules["defectcls_app"]
    spec = importlib.util.spec_from_file_location("defectcls_app", REPO / "app.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["defectcls_app"] = mod
    spec.loader.exec_module(mod)
    return mod


def handler(demo: gr.Blocks, name: str):
    """An event's function, by api_name or function name."""
    for f in demo.fns.values():
        if f.api_name == name or f.name == name:
            return f.fn
    raise KeyError(name)


def part_png(seed: int, size: int = 80) -> bytes:
    from defectcls.synth import render_part

    img, _, _ = render_part(seed, bad=bool(seed % 2), size=size)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("app_models")
    dirs = []
    for name in ("mobilenet_v3_large_gray", "second_model"):
        shutil.copytree(tiny_model, root / name)
        dirs.append(root / name)
    return dirs


@pytest.fixture()
def built(models, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    app = load_app()
    demo = app.build_demo(model_dirs=models, review_root=tmp_path / "rq", device="cpu", auth_enabled=False)
    return app, demo, tmp_path


def upload(tmp_path: Path, name: str, data: bytes) -> dict:
    """What gr.Image hands an unpreprocessed handler: a FileData dict with a server path and the original name."""
    d = tmp_path / "uploads" / hashlib.sha1(name.encode() + data).hexdigest()[:8]
    d.mkdir(parents=True, exist_ok=True)
    p = d / "file.bin"
    p.write_bytes(data)
    return {"path": str(p), "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def files_outside(root: Path, allowed: list[Path]) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not any(a in p.parents for a in allowed)]


def test_inspect_handler_verdict_heatmap_details_and_queue(built, models):
    app, demo, tmp = built
    inspect = handler(demo, "inspect")
    data = part_png(1)
    label, heat, details = inspect(upload(tmp, "part.png", data), "gradcam", None)
    ref = Predictor(models[0], device="cpu").predict(data)
    assert label["verdict"] == ref.label and abs(label["confidences"]["bad"] - ref.prob_bad) < 1e-4
    assert set(details) >= {"verdict", "p_bad", "threshold", "model_id", "sha256", "timings_ms", "cam_method"}
    assert details["sha256"] == hashlib.sha256(data).hexdigest() and details["model_id"] == ref.model_id
    assert details["model"] == "mobilenet_v3_large_gray"
    assert heat.dtype == np.uint8 and heat.ndim == 3 and heat.shape[2] == 3
    assert {"decode", "overlay", "queue", "total"} <= set(details["timings_ms"])
    # the Label heading is the thresholded verdict
    ld = app.verdict_label().postprocess(label)
    assert ld.label == ref.label and [c.label for c in ld.confidences] == ["bad", "good"]
    assert not (REPO / "app.pyi").exists()                  # nothing written next to the app
    for m in ("gradcam++", "eigencam"):
        _, h2, d2 = inspect(upload(tmp, "part.png", data), m, "second_model")
        assert h2.shape == heat.shape and d2["cam_method"] == m and d2["model"] == "second_model"
    q = demo.review_queue
    assert [i["sha256"] for i in q.items(status="pending")] == [details["sha256"]]   # one item, stored once
    assert "# " in handler(demo, "summary")(details)


def test_bad_input_corpus_gets_clear_errors_and_nothing_leaks(built):
    app, demo, tmp = built
    inspect = handler(demo, "inspect")
    bad, good = invalid_files(), valid_files()
    refused, judged = {}, {}
    for name, data in bad.items():
        with pytest.raises(gr.Error) as exc:
            inspect(upload(tmp, name, data), "gradcam", None)
        refused[name] = exc.value.message
        assert exc.value.message.startswith(f"{name}: ") and "\n" not in exc.value.message
        assert str(tmp) not in exc.value.message          # no server paths in messages
    for name, data in good.items():
        label, heat, details = inspect(upload(tmp, name, data), "gradcam", None)
        judged[name] = label["verdict"]
    assert len(refused) == len(bad) and len(judged) == len(good)
    assert "empty" in refused["empty.png"] and ("bomb" in refused["bomb.png"] or "pixels" in refused["bomb.png"])
    for weird in ("../../etc/passwd.png", "a;rm -rf ~;.png", "$(reboot)`x`.png", "..\\..\\win.png"):
        with pytest.raises(gr.Error) as exc:
            inspect(upload(tmp, weird, b"not an image"), "gradcam", None)
        assert exc.value.message.split(":")[0].replace("_", "").isascii()
        assert "/" not in exc.value.message.split(":")[0] and ";" not in exc.value.message.split(":")[0]
    with pytest.raises(gr.Error, match="Upload an image"):
        inspect(None, "gradcam", None)
    with pytest.raises(gr.Error, match="unknown CAM method|choose one of"):
        inspect(upload(tmp, "p.png", part_png(2)), "magic", None)
    with pytest.raises(gr.Error, match="unknown model"):
        inspect(upload(tmp, "p.png", part_png(2)), "gradcam", "no_such_model")
    q = demo.review_queue
    assert len(q.items()) == len({hashlib.sha256(d).hexdigest() for d in good.values()})  # refused ones are not queued
    # only the review folder and the uploads/gradio temp folders were written
    assert files_outside(tmp, [tmp / "rq", tmp / "uploads", tmp / "gradio"]) == []


def test_model_switch_is_per_session_state(built):
    app, demo, tmp = built
    state, msg = handler(demo, "choose_model")("second_model")
    assert state == "second_model" and "this browser session only" in msg
    _, _, d = handler(demo, "inspect")(upload(tmp, "p.png", part_png(3)), "gradcam", state)
    assert d["model"] == "second_model"
    _, _, d = handler(demo, "inspect")(upload(tmp, "p.png", part_png(3)), "gradcam", "mobilenet_v3_large_gray")
    assert d["model"] == "mobilenet_v3_large_gray"


def test_an_oval_part_carries_its_note_to_the_verdict_and_the_review_tab(built):
    from defectcls import data as D
    from defectcls import perturb as P

    app, demo, tmp = built
    img = D.load_image(part_png(2, size=160))
    buf = io.BytesIO()
    Image.fromarray(P.affine(img, squash=0.65, squash_angle=20)).save(buf, format="PNG")
    _, _, details = handler(demo, "inspect")(upload(tmp, "tilted.png", buf.getvalue()), "gradcam", None)
    assert len(details["notes"]) == 1 and "oval" in details["notes"][0]
    assert details["held"] is True and details["verdict"] == "bad"     # the model cannot judge it: held
    assert "**Note:** the part looks oval" in handler(demo, "summary")(details)
    assert handler(demo, "summary")(details).startswith("## BAD: held for a person")
    _, _, straight = handler(demo, "inspect")(upload(tmp, "straight.png", part_png(4, size=160)), "gradcam", None)
    assert straight["notes"] == [] and "Note:" not in handler(demo, "summary")(straight) and straight["held"] is False
    assert "held for a person" not in handler(demo, "summary")(straight)
    items = {i["sha256"]: i for i in handler(demo, "review_queue")("pending", "any", "any", None)["items"]}
    assert items[details["sha256"]]["photo_notes"] == details["notes"] and items[straight["sha256"]]["photo_notes"] == []
    view = handler(demo, "render_item")("pending", "any", "any", details["sha256"])
    assert view[0] == details["sha256"] and "**Photo note:** the part looks oval" in view[3]


def test_review_handlers_order_submit_and_reviewer_identity(built, models, tmp_path):
    app, demo, tmp = built
    inspect = handler(demo, "inspect")
    shas = [inspect(upload(tmp, f"p{i}.png", part_png(10 + i)), "gradcam", None)[2]["sha256"] for i in range(4)]
    queue_fn, submit = handler(demo, "review_queue"), handler(demo, "review_submit")
    got = queue_fn("pending", "any", "any", None)
    margins = [i["margin"] for i in got["items"]]
    assert sorted(i["sha256"] for i in got["items"]) == sorted(shas) and margins == sorted(margins)
    assert all("path" not in i and "image" not in i for i in got["items"])     # no server paths over the API
    view = handler(demo, "render_item")("pending", "any", "any")
    assert view[0] == got["items"][0]["sha256"] and view[1] is not None and view[2] is not None
    listed = view[6]                                      # the shas behind the table rows
    picked = handler(demo, "pick_row")(listed, "pending", "any", "any", gr.SelectData(None, {"index": [2, 1], "value": ""}))
    assert picked[0] == listed[2]
    with pytest.raises(gr.Error, match="name"):
        submit(shas[0], "bad", "", "", None)
    with pytest.raises(gr.Error, match="not in the review queue"):
        submit("0" * 64, "bad", "ann", "", None)
    with pytest.raises(gr.Error, match="decision"):
        submit(shas[0], "delete", "ann", "", None)
    ev = submit(shas[0], "bad", "ann", "=1+1", None)
    assert ev["reviewer"] == "ann" and ev["label"] == "bad"
    st = queue_fn("reviewed", "any", "any", None)
    assert [i["sha256"] for i in st["items"]] == [shas[0]] and st["stats"]["reviewed"] == 1
    # with auth: the login name is the reviewer, and no login means no review
    authed = load_app().build_demo(model_dirs=models, review_root=tmp / "rq", device="cpu", auth_enabled=True)
    submit_a, queue_a = handler(authed, "review_submit"), handler(authed, "review_queue")
    with pytest.raises(gr.Error, match="Log in"):
        submit_a(shas[1], "good", "mallory", "", SimpleNamespace(username=None))
    with pytest.raises(gr.Error, match="Log in"):
        queue_a("pending", "any", "any", SimpleNamespace(username=None))
    ev = submit_a(shas[1], "good", "mallory", "", SimpleNamespace(username="qa1"))
    assert ev["reviewer"] == "qa1"
    out = tmp_path / "labels.csv"
    assert demo.review_queue.export_labels(out) == 2
    assert {r.split(",")[2] for r in out.read_text().splitlines()[1:]} == set(shas[:2])


def test_benchmark_view_marks_timing_only_models():
    app = load_app()
    res = {"device": "cpu", "device_name": "test cpu", "threads": 2, "torch": "x", "batch": 8, "iters": 10,
           "models": {
               "mobilenet_v3_large_gray": {"trained": True, "arch": "mobilenet_v3_large", "img_size": 224,
                                           "forward_ms": {"p50": 10.0, "p95": 12.0}, "cam_ms": {"p50": 11.0},
                                           "e2e_ms": {"p50": 30.0, "p95": 35.0}, "throughput_ips": 90.0,
                                           "params": 4_200_000, "size_mb": 17.0, "peak_mem_mb": 300.0,
                                           "metrics": {"fnr": 0.0, "fpr": 0.02, "auroc": 0.999}},
               "resnet50": {"trained": False, "arch": "resnet50", "forward_ms": {"p50": 50.0, "p95": 60.0},
                            "e2e_ms": {"p50": 80.0, "p95": 90.0}, "throughput_ips": 20.0, "params": 23_500_000,
                            "size_mb": 94.0, "peak_mem_mb": 500.0}}}
    df, fig, md = app.bench_view(res)
    rows = {r["model"]: r for r in df.to_dict("records")}
    assert rows["resnet50"]["weights"] == "timing only" and rows["mobilenet_v3_large_gray"]["weights"] == "trained"
    assert rows["mobilenet_v3_large_gray"]["FNR"] == 0.0 and rows["resnet50"]["forward p95 ms"] == 60.0
    assert "defectcls train" in md and "--arch resnet50" in md and "DEFECTCLS_HUB_MODEL_REPO" in md
    assert "test cpu" in md and "2 threads" in md
    assert fig is not None


@pytest.mark.slow
def test_real_benchmark_feeds_the_models_tab(tiny_model):
    """defectcls.bench.benchmark's real output renders as the Models table (tiny model only, few runs)."""
    from defectcls import bench

    app = load_app()
    res = bench.benchmark({"tiny": str(tiny_model)}, device="cpu", naive=False, iters=2, warmup=1, batch=2)
    df, fig, md = app.bench_view(res)
    row = df.to_dict("records")[0]
    assert row["model"] == "tiny" and row["weights"] == "trained" and row["forward p50 ms"] > 0
    assert row["params (M)"] > 1 and row["size MB"] > 1 and row["end-to-end p50 ms"] > 0
    assert "threads" in md and fig is not None


def test_parse_auth():
    app = load_app()
    assert app.parse_auth(None) is None and app.parse_auth(" ") is None
    assert app.parse_auth("qa:pw, lead:p:w") == [("qa", "pw"), ("lead", "p:w")]
    with pytest.raises(Exception, match="user:password"):
        app.parse_auth("nopassword")


# ---------------------------------------------------------------- the launched app, through gradio_client

FAKE_BENCH = {"device": "cpu", "device_name": "stand-in", "threads": 2, "torch": "t", "batch": 8, "iters": 10, "models": {
    "mobilenet_v3_large_gray": {"trained": True, "arch": "mobilenet_v3_large", "img_size": 64,
                                "forward_ms": {"p50": 11.0, "p95": 12.0}, "cam_ms": {"p50": 14.0},
                                "e2e_ms": {"p50": 30.0, "p95": 40.0}, "throughput_ips": 95.0, "params": 4_200_000,
                                "size_mb": 17.0, "peak_mem_mb": 300.0, "metrics": {"fnr": 0.0, "fpr": 0.1, "auroc": 1.0}},
    "resnet50": {"trained": False, "arch": "resnet50", "img_size": 64, "forward_ms": {"p50": 50.0, "p95": 62.0},
                 "cam_ms": {"p50": 58.0}, "e2e_ms": {"p50": 80.0, "p95": 95.0}, "throughput_ips": 20.0,
                 "params": 23_500_000, "size_mb": 94.0, "peak_mem_mb": 520.0}}}


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp / "gradio"))
        import defectcls.bench

        calls = []
        mp.setattr(defectcls.bench, "benchmark", lambda *a, **k: calls.append((a, k)) or FAKE_BENCH)
        app = load_app()
        demo = app.build_demo(model_dirs=models, review_root=tmp / "rq", device="cpu", auth_enabled=False)
        kw = {**app.launch_kwargs(tmp / "rq"), "auth": None}
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True, **kw)
        try:
            yield SimpleNamespace(url=url, demo=demo, tmp=tmp, calls=calls, app=app)
        finally:
            demo.close()


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def test_every_api_name_through_gradio_client(served, tmp_path):
    from gradio_client import handle_file

    c = client(served.url)
    api = c.view_api(return_format="dict", print_info=False)["named_endpoints"]
    public = {"/inspect", "/heatmap_full", "/benchmark", "/review_queue", "/review_submit"}
    assert set(api) == public   # nothing else public
    good = tmp_path / "part.png"
    good.write_bytes(part_png(21))
    label, heat, details = c.predict(handle_file(str(good)), "gradcam", api_name="/inspect")
    assert [x["label"] for x in label["confidences"]] == ["bad", "good"]
    assert Path(heat).suffix == ".jpeg" and Image.open(heat).format == "JPEG"
    assert details["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest() and "@" in details["model_id"]
    assert label["label"] == details["verdict"]                 # the heading is the thresholded verdict
    full = c.predict(handle_file(str(good)), "gradcam", api_name="/heatmap_full")
    assert Image.open(full).format == "PNG" and Image.open(full).size == Image.open(good).size
    # a bad file gets an error, and the next good call still succeeds
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"<html>not a picture</html>")
    with pytest.raises(Exception, match="junk.png: not a recognised image"):
        c.predict(handle_file(str(junk)), "gradcam", api_name="/inspect")
    again = c.predict(handle_file(str(good)), "eigencam", api_name="/inspect")
    assert again[2]["sha256"] == details["sha256"] and again[2]["cam_method"] == "eigencam"
    q = c.predict("pending", "any", "any", api_name="/review_queue")
    assert details["sha256"] in [i["sha256"] for i in q["items"]] and q["stats"]["pending"] >= 1
    ev = c.predict(details["sha256"], "bad", "ann", "looks dented", api_name="/review_submit")
    assert ev["label"] == "bad" and ev["reviewer"] == "ann" and ev["decision"] == "bad"
    with pytest.raises(Exception, match="reviewer|name"):
        c.predict(details["sha256"], "bad", "", "", api_name="/review_submit")
    res = c.predict(api_name="/benchmark")
    assert res == FAKE_BENCH and served.calls and served.calls[-1][1].get("naive") is False


def test_concurrent_inspect_calls_each_get_their_own_answer(served, tmp_path):
    from gradio_client import handle_file

    paths, want = [], {}
    pred = Predictor(served.demo.registry.paths["mobilenet_v3_large_gray"], device="cpu")
    for k in range(6):
        p = tmp_path / f"c{k}.png"
        p.write_bytes(part_png(40 + k, size=64 + 8 * k))
        paths.append(p)
        want[hashlib.sha256(p.read_bytes()).hexdigest()] = pred.predict(p).prob_bad
    results: dict[int, tuple] = {}

    def call(k: int) -> None:
        results[k] = client(served.url).predict(handle_file(str(paths[k])), ("gradcam", "gradcam++")[k % 2],
                                                api_name="/inspect")

    threads = [threading.Thread(target=call, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 6
    for k, (label, heat, details) in results.items():
        sha = hashlib.sha256(paths[k].read_bytes()).hexdigest()
        assert details["sha256"] == sha
        assert abs(details["p_bad"] - want[sha]) < 1e-4
        assert abs({x["label"]: x["confidence"] for x in label["confidences"]}["bad"] - want[sha]) < 1e-4
        assert Image.open(heat).size[0] == min(512, 64 + 8 * k)


def test_served_paths_and_upload_limit(served, tmp_path):
    from gradio_client import handle_file

    p = tmp_path / "mine.png"
    p.write_bytes(part_png(91))
    client(served.url).predict(handle_file(str(p)), "gradcam", api_name="/inspect")
    q = served.demo.review_queue
    stored = next(iter(q.items()))["path"]
    model_file = served.demo.registry.paths["mobilenet_v3_large_gray"] / "model.safetensors"
    with httpx.Client(base_url=served.url, timeout=60) as h:
        for secret in (stored, str(model_file), str(q.log_path), "/etc/passwd"):
            r = h.get(f"/gradio_api/file={secret}")
            assert r.status_code in (403, 404), secret
        ex = sorted((REPO / "examples").glob("*.png"))
        if ex:
            assert h.get(f"/gradio_api/file={ex[0]}").status_code == 200      # examples are meant to be public
        n_items = len(q.items())
        for secret in (str(model_file), "/etc/passwd"):   # an API call may not name a server file as its upload
            r = h.post("/gradio_api/call/inspect", json={"data": [{"path": secret, "meta": {"_type": "gradio.FileData"}},
                                                                   "gradcam"]})
            out = h.get(f"/gradio_api/call/inspect/{r.json()['event_id']}").text
            assert "event: error" in out and "root:" not in out
        assert len(q.items()) == n_items
        big = b"\0" * (50 * 1024 * 1024 + 1024)
        r = h.post("/gradio_api/upload", files={"files": ("big.png", big, "image/png")})
        assert r.status_code == 413


def test_auth_protects_review_endpoints(models, tmp_path, monkeypatch):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AuthenticationError

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("DEFECTCLS_AUTH", "qa:secret")
    app = load_app()
    demo = app.build_demo(model_dirs=models[:1], review_root=tmp_path / "rq", device="cpu")
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                            **app.launch_kwargs(tmp_path / "rq"))
    try:
        with pytest.raises(AuthenticationError):
            Client(url, verbose=False).predict("pending", "any", "any", api_name="/review_queue")
        c = Client(url, auth=("qa", "secret"), verbose=False)
        p = tmp_path / "p.png"
        p.write_bytes(part_png(77))
        sha = c.predict(handle_file(str(p)), "gradcam", api_name="/inspect")[2]["sha256"]
        ev = c.predict(sha, "confirm", "someone-else", "", api_name="/review_submit")
        assert ev["reviewer"] == "qa"
        assert json.loads(json.dumps(c.predict("reviewed", "any", "any", api_name="/review_queue")))["stats"]["reviewed"] == 1
    finally:
        demo.close()


def test_warm_up_loads_the_default_model_or_says_why_not(models, tmp_path, caplog):
    import logging

    from defectcls.hub import ModelRegistry

    app = load_app()
    reg = ModelRegistry([str(d) for d in models], device="cpu")
    with caplog.at_level(logging.INFO, logger=app.log.name):
        app._warm_up(reg)
    assert reg.default in reg._predictors and "ready on torch" in caplog.text   # tests keep auto-export off
    assert "cam_offset" in vars(reg.predictor())          # the heat-map's offset probe has run too
    caplog.clear()
    empty = ModelRegistry([], device="cpu")
    with caplog.at_level(logging.INFO, logger=app.log.name):
        app._warm_up(empty)                                   # no model at all: a warning, no exception
    assert "not loaded at start" in caplog.text and "no trained model available" in caplog.text


def test_full_resolution_heatmap_download(built):
    app, demo, tmp = built
    full = handler(demo, "heatmap_full")
    data = part_png(5, size=200)
    path = Path(full(upload(tmp, "my part.png", data), "gradcam", None))
    img = Image.open(path)
    assert path.suffix == ".png" and img.size == (200, 200) and img.mode == "RGB"   # the photo's own size
    assert path.name.startswith("my_part_gradcam_") and (tmp / "gradio") in path.parents
    _, heat, _ = handler(demo, "inspect")(upload(tmp, "my part.png", data), "gradcam", None)
    small = np.asarray(img.resize(heat.shape[1::-1], Image.Resampling.BILINEAR), np.float32)
    assert np.abs(small - heat).mean() < 8          # the same picture as the on-screen heat-map, larger
    with pytest.raises(gr.Error, match="Upload an image"):
        full(None, "gradcam", None)
    with pytest.raises(gr.Error, match="empty.png: "):
        full(upload(tmp, "empty.png", b""), "gradcam", None)
    old = path.with_name("old_gradcam_bad_000000000000.png")
    old.write_bytes(b"x")
    os.utime(old, (0, 0))                            # older than FULLRES_KEEP_S: pruned by the next request
    full(upload(tmp, "p.png", part_png(6)), "eigencam", None)
    assert not old.exists() and path.exists()
