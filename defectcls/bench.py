"""Latency, throughput and memory of the inspection pipeline on the current device, against a naive pipeline.

Honest timing: warm-up runs first, ``time.perf_counter`` around each call, CUDA
synchronised before the clock stops, medians and p95 reported with the device,
threads and batch size. The fast and the naive end-to-end requests are interleaved
in one loop, so that a load change on a shared machine hits both alike: compare
them as the ratio of one run (``speedup_e2e``).

The end-to-end request is what the app does per upload: 1024x1024 PNG bytes in,
verdict and a JPEG overlay at display size out. The naive pipeline is the way it is
usually written: a 3-channel copy of the gray image, torchvision transforms, an
eager 3-channel torchvision model for the verdict, a default pytorch-grad-cam call
(a second pass with a full backward), ``show_cam_on_image`` at full resolution and
a full-resolution PNG.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

DEFAULT_MODELS = ("mobilenet_v3_large", "resnet50")
DISPLAY_SIZE = 512


def default_models() -> dict[str, str | None]:
    """The shipped MobileNetV3 and the ResNet50 model when present, else None (untrained, timing only)."""
    from .config import models_dir

    root = Path(models_dir())
    out: dict[str, str | None] = {}
    for name, sub in (("mobilenet_v3_large", "mobilenet_v3_large_gray"), ("resnet50", "resnet50_gray")):
        out[name] = str(root / sub) if (root / sub / "model.safetensors").is_file() else None
    return out


def _stats(ms: list[float]) -> dict:
    a = np.asarray(ms, np.float64)
    return {"p50": round(float(np.median(a)), 3), "p95": round(float(np.percentile(a, 95)), 3),
            "mean": round(float(a.mean()), 3), "n": int(a.size)}


def _sync(device) -> None:
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], iters: int, warmup: int, device=None) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _time_interleaved(fns: Sequence[Callable[[], object]], iters: int, warmup: int, device=None) -> list[list[float]]:
    """Time several callables in alternation (a, b, a, b, ...), so that a change of the host's speed
    during the run hits all of them alike and their ratio stays meaningful."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, times in zip(fns, out, strict=True):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return out


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


class _PeakMemory:
    """Peak memory added inside the block: CUDA max allocated, or process RSS sampled every 2 ms on CPU."""

    def __init__(self, device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 1e6
            return self
        self._base = self._peak = _rss_mb()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self._peak = max(self._peak, _rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            import torch

            self.peak_mb = round(torch.cuda.max_memory_allocated(self.device) / 1e6 - self._base, 1)
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = round(max(self._peak, _rss_mb()) - self._base, 1)


def request_png(size: int = 1024, seed: int = 7, bad: bool = True) -> bytes:
    """A synthetic bad (or good) part as PNG bytes, written the way the data set's photos are."""
    from .synth import render_part

    img, _, _ = render_part(seed, bad, size)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def calibrate_bn(model, x) -> None:
    """BatchNorm running statistics from one pass over X, so that activations have realistic scales.

    Untrained MobileNetV3 activations otherwise shrink to ~1e-9 by the last block; timings stay
    the same, but heat-maps and int8 ranges of such a network mean nothing.
    """
    import torch

    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model(torch.as_tensor(x))
    model.eval()


def _timing_only_dir(arch: str, img_size: int, root: Path) -> Path:
    """A model directory with seeded random weights, BatchNorm calibrated on synthetic parts (timing only)."""
    import torch

    from . import data as D
    from .models import ModelCard, build_model, save_model_dir
    from .synth import render_part

    torch.manual_seed(0)
    card = ModelCard(arch=arch, img_size=img_size, name=f"{arch}-untrained")
    model = build_model(arch)
    x = np.stack([D.preprocess(np.asarray(render_part(i, i % 2 == 1, max(64, img_size))[0]), img_size, card.color,
                               card.mean, card.std) for i in range(8)])
    calibrate_bn(model, x)
    return save_model_dir(model, card, root / arch)


def _onnx_dir(model_dir: Path, root: Path) -> tuple[Path, bool]:
    """A directory with a current model.onnx: MODEL_DIR itself, or a temporary copy exported now."""
    from .edge import make_session, session_meta
    from .inference import ONNX_FILE, onnx_mismatch
    from .models import read_card, weights_sha256

    if (model_dir / ONNX_FILE).is_file():
        try:
            meta = session_meta(make_session(model_dir / ONNX_FILE))
            card = read_card(model_dir)
            if onnx_mismatch(meta, weights_sha256(model_dir), card.tta, card.tta_top) is None:
                return model_dir, False
        except Exception:  # unreadable file: export a fresh copy
            pass
    from .export import export_onnx

    tmp = root / f"{model_dir.name}-onnx"
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("card.json", "model.safetensors"):
        shutil.copy2(model_dir / name, tmp / name)
    export_onnx(tmp, n_check=4, n_calib=4)
    return tmp, True


def _fast_request(pred, png: bytes, display: int) -> tuple[object, bytes, dict]:
    from .explain import encode_jpeg, explain, overlay

    ex = explain(pred, png)
    t0 = time.perf_counter()
    ov = overlay(ex.image, ex.cam, size=display, box=ex.box)
    t1 = time.perf_counter()
    jpg = encode_jpeg(ov)
    t2 = time.perf_counter()
    return ex.prediction, jpg, {**ex.timings_ms, "overlay": (t1 - t0) * 1e3, "encode": (t2 - t1) * 1e3}


def _naive_pipeline(arch: str, img_size: int, device) -> Callable[[bytes], tuple[str, bytes]]:
    """The pipeline as usually written (see module docstring); random weights, timing only."""
    import torch
    from PIL import Image
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchvision import transforms

    from .models import build_model, cam_target_layer

    torch.manual_seed(0)
    model = build_model(arch, in_chans=3)
    x = torch.randn(4, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    calibrate_bn(model, x)
    model = model.to(device)
    tf = transforms.Compose([transforms.Resize((img_size, img_size)), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def run(png: bytes) -> tuple[str, bytes]:
        img = Image.open(io.BytesIO(png)).convert("L").convert("RGB")
        x = tf(img)[None].to(device)
        with torch.no_grad():
            label = "bad" if int(model(x).argmax(1)) == 1 else "good"
        with GradCAM(model=model, target_layers=[cam_target_layer(model, arch)]) as cam:
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)])[0]
        rgb = np.asarray(img, np.float32) / 255.0
        heat = np.asarray(Image.fromarray(heat).resize(img.size, Image.Resampling.BILINEAR))
        vis = show_cam_on_image(rgb, heat, use_rgb=True)
        buf = io.BytesIO()
        Image.fromarray(vis).save(buf, format="PNG")
        return label, buf.getvalue()

    return run


def _card_metrics(card) -> dict | None:
    m = card.metrics or {}
    split = "test" if "test" in m else ("val" if "val" in m else None)
    if split is None:
        return None
    return {"split": split, **{k: m[split].get(k) for k in ("fnr", "fpr", "auroc", "n")}}


def _bench_backend(pred, x1: np.ndarray, xb: np.ndarray, iters: int, warmup: int) -> dict:
    from .explain import normalize_cam

    dev = pred.device
    if pred.has_fast_cam:   # forward and forward + heat-map in alternation: their ratio is the overhead
        fwd, cam = _time_interleaved(
            [lambda: pred.logits(x1),
             lambda: normalize_cam(pred.forward_cam(x1)[1], x1.shape[-2:], pred.cam_offset)], iters, warmup, dev)
    else:
        fwd = _time(lambda: pred.logits(x1), iters, warmup, dev)
    res = {"forward_ms": _stats(fwd)}
    if pred.has_fast_cam:
        res["cam_ms"] = _stats(cam)
        res["cam_overhead"] = round(res["cam_ms"]["p50"] / res["forward_ms"]["p50"] - 1, 3)
    bt = _time(lambda: pred.logits(xb), max(3, iters // 3), 1, dev)
    res["batch_ms"] = _stats(bt)
    res["throughput_ips"] = round(len(xb) / (res["batch_ms"]["p50"] / 1e3), 1)
    return res


def _bench_screen(pred, png: bytes, x1: np.ndarray, iters: int, warmup: int, display: int) -> dict:
    """A screened model (``Predictor.screen_below``): which path the request part takes, and the
    one-view path's forward and end-to-end request on a good part (both paths: "one view", "all views")."""
    good = request_png(int(pred.load(png).shape[0]), seed=1, bad=False)

    def path(x: np.ndarray) -> str:
        return "all views" if pred._escalated(pred._screen.logits(x))[0] else "one view"

    xg = pred.preprocess(good)[None]
    res = {"below": pred.screen_below, "above": pred.screen_above, "request_part": path(x1), "good_part": path(xg),
           "one_view_forward_ms": _stats(_time(lambda: pred._screen.logits(x1), iters, warmup, pred.device))}
    e2e = []
    for i in range(iters + warmup):
        t0 = time.perf_counter()
        _fast_request(pred, good, display)
        if i >= warmup:
            e2e.append((time.perf_counter() - t0) * 1e3)
    res["e2e_good_ms"] = _stats(e2e)
    return res


def _bench_model(name: str, model_dir: Path, trained: bool, work: Path, device, iters: int, warmup: int, batch: int,
                 naive: bool, threads: int | None, png: bytes, display: int, naive_iters: int,
                 export_missing: bool) -> tuple[dict, dict | None]:
    import torch

    from .inference import ONNX_INT8_FILE, Predictor
    from .models import count_params

    x_dir, exported = _onnx_dir(model_dir, work) if device.type == "cpu" and export_missing else (model_dir, False)
    with _PeakMemory(device) as mem:
        fast = Predictor(x_dir, device=str(device), threads=threads, backend="auto")
        _fast_request(fast, png, display)
        fast.logits(np.zeros((batch, fast.card.in_chans, fast.card.img_size, fast.card.img_size), np.float32))
    card = fast.card
    x1 = fast.preprocess(png)[None]
    xb = np.repeat(x1, batch, axis=0)
    row: dict = {"model_dir": str(model_dir), "trained": trained, "arch": card.arch, "img_size": card.img_size,
                 "backend": fast.backend, "onnx_exported_for_bench": exported, "model_id": fast.model_id,
                 "runtime": fast.describe()}
    row.update(_bench_backend(fast, x1, xb, iters, warmup))
    backends = {fast.backend: {k: row[k] for k in ("forward_ms", "cam_ms", "cam_overhead", "throughput_ips") if k in row}}
    if fast.backend != "torch":
        tp = Predictor(model_dir, device=str(device), threads=threads, backend="torch")
        backends["torch"] = _bench_backend(tp, x1, xb, iters, warmup)
    if device.type == "cpu" and (x_dir / ONNX_INT8_FILE).is_file():
        try:
            q = Predictor(x_dir, device="cpu", threads=threads, backend="onnx", onnx_path=x_dir / ONNX_INT8_FILE)
            backends["onnx_int8"] = _bench_backend(q, x1, xb, iters, warmup)
        except Exception as exc:  # a stale int8 file is reported, not fatal
            backends["onnx_int8"] = {"error": str(exc)}
    for b in backends.values():
        b.pop("batch_ms", None)
    row["backends"] = backends

    naive_run = _naive_pipeline(card.arch, card.img_size, device) if naive else None
    e2e, naive_ms, parts = [], [], []
    for _ in range(max(1, warmup // 2)):
        _fast_request(fast, png, display)
        if naive_run:
            naive_run(png)
    for i in range(iters):
        t0 = time.perf_counter()
        _, _, br = _fast_request(fast, png, display)
        _sync(device)
        e2e.append((time.perf_counter() - t0) * 1e3)
        parts.append(br)
        if naive_run and i < naive_iters:
            t0 = time.perf_counter()
            naive_run(png)
            _sync(device)
            naive_ms.append((time.perf_counter() - t0) * 1e3)
    row["e2e_ms"] = _stats(e2e)
    row["e2e_breakdown_ms"] = {k: round(statistics.median(p[k] for p in parts), 3) for k in parts[0]}
    if getattr(fast, "screen_below", None) is not None:
        row["screen"] = _bench_screen(fast, png, x1, iters, warmup, display)
    row["params"] = count_params(fast.model)
    row["tta"] = fast.card.tta   # test-time views per photo: every latency above includes them
    files = {"safetensors": model_dir / "model.safetensors", "onnx": x_dir / "model.onnx", "onnx_int8": x_dir / ONNX_INT8_FILE}
    row["files_mb"] = {k: round(p.stat().st_size / 1e6, 3) for k, p in files.items() if p.is_file()}
    row["size_mb"] = row["files_mb"]["safetensors"]
    row["peak_mem_mb"] = mem.peak_mb
    if trained:
        row["metrics"] = _card_metrics(card)
    del fast
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, ({"e2e_ms": _stats(naive_ms), "iters": len(naive_ms)} if naive_run else None)


def benchmark(models: dict[str, str | None] | None = None, device: str = "auto", iters: int = 30, warmup: int = 5,
              batch: int = 8, naive: bool = True, img_size: int | None = None, threads: int | None = None,
              display_size: int = DISPLAY_SIZE, request_size: int = 1024, naive_iters: int | None = None,
              export_missing: bool = True) -> dict:
    """Time every model of MODELS (display name -> model directory, or None for the untrained architecture).

    The fast pipeline is what ``Predictor(backend="auto")`` runs: on CPU onnxruntime, from the model's
    own model.onnx or, with EXPORT_MISSING, from a temporary export (a few seconds per model; without
    it such a model is timed on torch). The torch backend is timed too (``backends``).
    IMG_SIZE applies to untrained architectures only (a trained model keeps its card's size).
    NAIVE_ITERS (default min(ITERS, 10)) caps the slow naive runs. Returns one JSON-able dict.
    """
    import onnxruntime
    import torch

    from .config import resolve_device
    from .errors import DefectclsError

    models = default_models() if models is None else models
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    if iters < 1 or warmup < 0 or batch < 1:
        raise DefectclsError("iters and batch must be >= 1, warmup >= 0")
    naive_iters = min(iters, 10) if naive_iters is None else max(1, naive_iters)
    png = request_png(request_size)
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    out: dict = {
        "device": str(dev), "device_name": _device_name(dev), "threads": threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(), "batch": batch, "iters": iters, "warmup": warmup,
        "naive_iters": naive_iters if naive else 0, "display_size": display_size,
        "request": f"{request_size}x{request_size} PNG ({len(png) / 1e6:.2f} MB) -> verdict + JPEG overlay at {display_size} px",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "models": {}, "naive": {}, "speedup_e2e": {},
    }
    with tempfile.TemporaryDirectory(prefix="defectcls-bench-") as tmp:
        work = Path(tmp)
        for name, mdir in models.items():
            if mdir is None:
                from .models import arch_spec

                arch_spec(name)
                path, trained = _timing_only_dir(name, img_size or 224, work), False
            else:
                path, trained = Path(mdir), True
                if not (path / "card.json").is_file():
                    raise DefectclsError(f"{mdir} is not a model directory (no card.json)")
            row, nv = _bench_model(name, path, trained, work, dev, iters, warmup, batch, naive, threads, png,
                                   display_size, naive_iters, export_missing)
            out["models"][name] = row
            if nv:
                out["naive"][name] = nv
                out["speedup_e2e"][name] = round(nv["e2e_ms"]["p50"] / row["e2e_ms"]["p50"], 2)
    if load0 is not None:
        out["load_avg_1m"] = {"start": round(load0[0], 2), "end": round(os.getloadavg()[0], 2)}
    return out


def _device_name(dev) -> str:
    if dev.type == "cuda":
        import torch

        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(result: dict) -> str:
    """The benchmark dict as a plain-text table for people."""
    head = (f"device {result['device']} ({result.get('device_name', '')}), threads {result['threads']}, "
            f"batch {result['batch']}, iters {result['iters']}, torch {result['torch']}, "
            f"onnxruntime {result.get('onnxruntime', '?')}, {result.get('date', '')}")
    if "load_avg_1m" in result:
        la = result["load_avg_1m"]
        head += f"\nload average (1 min) {la['start']} -> {la['end']} on {result.get('cpu_count')} CPUs"
    head += f"\nrequest: {result.get('request', '')}"
    cols = ["model", "backend", "fwd p50/p95 ms", "+CAM p50 ms", "e2e p50/p95 ms", "naive e2e ms", "speedup",
            f"batch{result['batch']} img/s", "params", "MB", "peak MB"]
    rows = []
    for name, m in result["models"].items():
        nv = result.get("naive", {}).get(name)
        cam = m.get("cam_ms")
        rows.append([
            name + ("" if m.get("trained") else " (untrained)"), m["backend"],
            f"{m['forward_ms']['p50']:.1f}/{m['forward_ms']['p95']:.1f}",
            f"{cam['p50']:.1f} ({m['cam_overhead']:+.0%})" if cam else "-",
            f"{m['e2e_ms']['p50']:.1f}/{m['e2e_ms']['p95']:.1f}",
            f"{nv['e2e_ms']['p50']:.0f}" if nv else "-",
            f"{result['speedup_e2e'][name]:.1f}x" if name in result.get("speedup_e2e", {}) else "-",
            f"{m['throughput_ips']:.0f}", f"{m['params'] / 1e6:.1f}M", f"{m['size_mb']:.1f}", f"{m['peak_mem_mb']:.0f}",
        ])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    for name, m in result["models"].items():
        other = {k: v for k, v in m.get("backends", {}).items() if k != m["backend"] and "forward_ms" in v}
        if other:
            lines.append(f"{name}: " + "; ".join(
                f"{k} fwd {v['forward_ms']['p50']:.1f} ms" + (f", +CAM {v['cam_ms']['p50']:.1f} ms" if "cam_ms" in v else "")
                + f", {v['throughput_ips']:.0f} img/s" for k, v in other.items()))
        lines.append(f"{name}: e2e parts (median ms) " + ", ".join(f"{k} {v:.1f}" for k, v in m["e2e_breakdown_ms"].items()))
        if m.get("screen"):
            sc = m["screen"]
            lines.append(f"{name}: {m.get('tta', 1)} views after a one-view screen (P(bad) < {sc['below']:.4g} is good, "
                         f"> {sc['above']:.4g} bad at once): the request part took {sc['request_part']}; one view fwd "
                         f"{sc['one_view_forward_ms']['p50']:.1f} ms; a good part ({sc['good_part']}) e2e "
                         f"{sc['e2e_good_ms']['p50']:.1f}/{sc['e2e_good_ms']['p95']:.1f} ms")
        if m.get("metrics"):
            mt = m["metrics"]
            lines.append(f"{name}: {mt['split']} FNR {mt['fnr']} FPR {mt['fpr']} AUROC {mt['auroc']}")
    return "\n".join(lines)
