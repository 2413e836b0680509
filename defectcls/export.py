"""ONNX export (fp32 and int8) with the heat-map head kept, and a parity check on every export.

The exported graph has one input, ``input`` (N x C x S x S float32, the output of
``data.preprocess``), and two outputs:

- ``logits`` (N x 2): the classifier's raw logits; P(bad) = sigmoid((z1 - z0) / T) with the
  temperature T of the card (``evaluate.prob_bad_from_logits``);
- ``cam`` (N x h x w): the raw Grad-CAM map of the "bad" logit at the CAM layer's resolution,
  relu(sum_c w_c A_c) with w = d logit_bad / d A averaged over space. For heads made of
  global average pooling + Linear/ReLU/Hardswish/Dropout layers (MobileNetV2/V3, ResNets) that
  gradient is written into the graph by the chain rule (``explain.make_cam_graph``), so the
  map needs no autograd at run time; ``explain.normalize_cam`` scales it to [0, 1] at input size.
  Other architectures are exported with ``logits`` only.

The model card, the weights' sha256 and the model id travel in the ONNX metadata
(``defectcls.*``), so the file alone is enough for ``defectcls.edge``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from . import data as D
from .edge import CAM_NAME, INPUT_NAME, LOGITS_NAME, META_PREFIX, SCREEN_ONNX_FILE, make_session
from .errors import DefectclsError
from .evaluate import prob_bad_from_logits
from .explain import normalize_cam
from .inference import ONNX_FILE, ONNX_INT8_FILE, Predictor
from .models import load_model_dir, model_cam_offset, weights_sha256, with_tta, with_views

DEFAULT_OPSET = 17
FP32_TOL = 1e-3          # max |P(bad) difference| between torch and the fp32 graph (and every verdict equal):
                         # float32 in another runtime moves logits by ~1e-4 of their size; a calibrated
                         # temperature below 1 turns that into a few 1e-4 in P(bad) near 0.5
INT8_AGREEMENT = 0.99    # share of verdicts the int8 graph must share with fp32


def synthetic_inputs(card, n: int, seed: int, render_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 NxCxSxS model inputs, labels) of N synthetic parts (half bad), through ``data.preprocess``."""
    from .synth import image_seed, render_part

    size = render_size or max(128, 2 * card.img_size)
    xs, ys = [], []
    for i in range(n):
        bad = i % 2 == 1
        img, _, _ = render_part(image_seed(seed, "bad" if bad else "good", i // 2), bad, size)
        xs.append(D.preprocess(np.asarray(img), card.img_size, card.color, card.mean, card.std))
        ys.append(int(bad))
    return np.stack(xs).astype(np.float32), np.asarray(ys)


def _run(session, x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray | None]:
    names = [o.name for o in session.get_outputs()]
    outs = [session.run(names, {INPUT_NAME: x[i:i + batch]}) for i in range(0, len(x), batch)]
    logits = np.concatenate([o[names.index(LOGITS_NAME)] for o in outs])
    cam = np.concatenate([o[names.index(CAM_NAME)] for o in outs]) if CAM_NAME in names else None
    return logits, cam


def _torch_reference(model_dir: Path, x: np.ndarray, batch: int | None = None, views: int | None = None,
                     top: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    pred = Predictor(model_dir, device="cpu", backend="torch", tta=views, screen=False, tta_top=top)
    batch = batch or pred.card.scoring_batch()
    parts = [pred.forward_cam(x[i:i + batch]) if pred.has_fast_cam else (pred.logits(x[i:i + batch]), None)
             for i in range(0, len(x), batch)]
    logits = np.concatenate([p[0] for p in parts])
    cam = np.concatenate([p[1] for p in parts]) if parts and parts[0][1] is not None else None
    return logits, cam


def _set_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.add(key=META_PREFIX + k, value=v)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def _torch_export(module, x, path: Path, outputs: list[str], opset: int) -> None:
    import torch

    dyn = {name: {0: "batch"} for name in [INPUT_NAME, *outputs]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (x,), str(path), input_names=[INPUT_NAME], output_names=outputs,
                              opset_version=opset, dynamo=False, dynamic_axes=dyn, do_constant_folding=True)
        except (TypeError, RuntimeError, ValueError):   # exporters without the TorchScript path
            torch.onnx.export(module, (x,), str(path), input_names=[INPUT_NAME], output_names=outputs,
                              opset_version=opset, dynamo=True, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))


class _Reader:
    """onnxruntime calibration data reader over a float32 NCHW array, one image at a time."""

    def __init__(self, x: np.ndarray):
        self._it = iter(x)

    def get_next(self):
        nxt = next(self._it, None)
        return None if nxt is None else {INPUT_NAME: nxt[None]}

    def rewind(self):  # not needed: each quantization gets a fresh reader
        pass


INT8_METHODS = {
    # name: (calibration, operator types to quantise; None = onnxruntime's default set)
    "static": ("minmax", None),
    "static-percentile": ("percentile", None),
    "static-conv-only": ("minmax", ["Conv"]),
}


def _quantize(src: Path, dst: Path, how: str, calib: np.ndarray) -> None:
    """Quantise SRC into DST with the INT8_METHODS entry HOW (static QDQ, per-channel weights).

    Dynamic quantisation is left out on purpose: its ConvInteger kernels ran MobileNetV3 ~10x
    slower than fp32 on this CPU, which defeats an edge export.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Reader, CalibrationDataReader):
        pass

    method, ops = INT8_METHODS[how]
    # the quantiser prints progress on stdout, which belongs to --json output
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception:  # pre-processing is an optimisation only
            pre = src
        import onnx

        graph = onnx.load(str(pre)).graph
        cal = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[method]
        quantize_static(str(pre), str(dst), Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=ops,
                        calibrate_method=cal,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                       "TensorQuantOverrides": _shared_gemm_weights(graph)})


def _shared_gemm_weights(graph) -> dict[str, list[dict]]:
    """Per-output-row quantisation for Gemm weights the heat-map head also reads (as MatMul(g, W)).

    One weight tensor gets one quantisation axis; without this, the quantiser would take the
    MatMul's axis and the Gemm's bias scale would no longer fit.
    """
    inits = {i.name for i in graph.initializer}
    users: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            if name in inits:
                users[name] = users.get(name, 0) + 1
    shared = {}
    for n in graph.node:
        trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
        if n.op_type == "Gemm" and trans_b == 1 and len(n.input) > 1 and users.get(n.input[1], 0) > 1:
            shared[n.input[1]] = [{"axis": 0}]
    return shared


def _verdicts(logits: np.ndarray, card) -> tuple[np.ndarray, np.ndarray]:
    p = prob_bad_from_logits(logits, card.temperature)
    return p, p >= card.threshold


def _cam_diff(a: np.ndarray | None, b: np.ndarray | None, size: int) -> float | None:
    if a is None or b is None:
        return None
    return float(np.abs(normalize_cam(a, size) - normalize_cam(b, size)).max())


def _cam_agreement(a: np.ndarray | None, b: np.ndarray | None, size: int, where: np.ndarray) -> dict:
    """How alike two sets of heat-maps are on the parts WHERE selects (the ones judged bad).

    On good parts the bad-class map is near-zero noise that normalisation blows up to 0..1, so
    the all-parts maximum difference says little about an int8 graph; these do: the share of
    parts whose hottest cell is the same, and the median / largest per-part mean absolute
    difference of the normalised maps.
    """
    if a is None or b is None or not where.any():
        return {}
    a, b = a[where], b[where]
    n = len(a)
    d = np.abs(normalize_cam(a, size) - normalize_cam(b, size)).reshape(n, -1).mean(1)
    same = a.reshape(n, -1).argmax(1) == b.reshape(n, -1).argmax(1)
    return {"cam_bad_n": int(n), "cam_bad_peak_agreement": float(same.mean()),
            "cam_bad_mean_abs_diff_p50": float(np.median(d)), "cam_bad_mean_abs_diff_max": float(d.max())}


def _mb(path: Path) -> float:
    return round(path.stat().st_size / 1e6, 3)


def export_onnx(model_dir: str | os.PathLike, out: str | os.PathLike | None = None, int8: bool = False,
                opset: int = DEFAULT_OPSET, check: bool = True, n_check: int = 200, n_calib: int = 256,
                seed: int = 12345, render_size: int | None = None, views: int | None = None,
                top: int | None = None, _inputs: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Write model.onnx (and with INT8 model.int8.onnx) for MODEL_DIR into OUT (default: MODEL_DIR).

    The graph answers with VIEWS test-time views, TOP of them counted (default: the card's ``tta`` and
    ``tta_top``; ``models.with_views``). A card's one-view
    screen (``inference.Predictor``) is not in it: with VIEWS None such a card also gets
    model.screen.onnx, the one-view graph (parity-checked the same way), which
    ``edge.EdgePredictor`` runs in front of model.onnx. _INPUTS: the parity check's (inputs, labels)
    when they are already rendered (that screen graph's check uses the full graph's).
    Parity runs on N_CHECK synthetic parts (half bad; ``synth``, seeds from SEED) and is reported;
    with CHECK a failure raises DefectclsError (a failing int8 file is not kept). fp32: max
    |P(bad) difference| to torch <= 1e-3 and every verdict the same. int8: calibrated on N_CALIB other synthetic parts (64 were
    too few for the shipped model: 98.5% agreement against 99.5% with 256, docs/benchmarks-speed.md);
    quantisation schemes are tried in order (``INT8_METHODS``: static QDQ with per-channel weights and
    min-max calibration, the same with percentile calibration, only the convolutions quantised)
    and the first that agrees with fp32 on >= 99% of verdicts and misses
    no bad verdict of fp32 is kept.
    """
    import torch

    t_start = time.perf_counter()
    model_dir = Path(model_dir)
    model, card = load_model_dir(model_dir)
    if views is not None or top is not None:
        card = with_views(card, card.tta if views is None else views, top)
    out_dir = Path(out) if out else model_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    sha = weights_sha256(model_dir)
    from .explain import make_cam_graph

    graph = make_cam_graph(model, card.arch, views=card.tta, top=card.tta_top)
    outputs = [LOGITS_NAME, CAM_NAME] if graph is not None else [LOGITS_NAME]
    module = graph if graph is not None else with_tta(model, card.tta, card.tta_top)
    dummy = torch.randn(2, card.in_chans, card.img_size, card.img_size, generator=torch.Generator().manual_seed(0))
    meta = {"card": json.dumps(card.to_dict()), "weights_sha256": sha, "model_id": f"{card.name}@{sha[:12]}",
            "outputs": ",".join(outputs), "cam_target": "1",
            "cam_offset": json.dumps(list(model_cam_offset(model_dir, card))),
            "cam": "raw Grad-CAM of logit 1 (bad) at the CAM layer: relu(sum_c mean_hw(dlogit/dA_c) A_c)"}
    fp32_path = out_dir / ONNX_FILE
    report: dict = {"model_dir": str(model_dir), "model_id": meta["model_id"], "arch": card.arch, "opset": opset,
                    "outputs": outputs, "heatmap_output": graph is not None, "files": {}}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export.") as tmp:
        tmp_fp32 = Path(tmp) / ONNX_FILE
        _torch_export(module, dummy, tmp_fp32, outputs, opset)
        _set_metadata(tmp_fp32, {**meta, "precision": "fp32"})
        x, y = _inputs if _inputs is not None else synthetic_inputs(card, n_check, seed, render_size)
        batch = card.scoring_batch()   # the pixel budget of scoring: 448 px with 8 views, 2 parts
        ref_logits, ref_cam = _torch_reference(model_dir, x, batch, views=card.tta, top=card.tta_top)
        s32 = make_session(tmp_fp32)
        l32, c32 = _run(s32, x, batch)
        p_ref, v_ref = _verdicts(ref_logits, card)
        p32, v32 = _verdicts(l32, card)
        fp32 = {"n": int(len(x)), "max_prob_diff": float(np.abs(p_ref - p32).max()),
                "max_logit_diff": float(np.abs(ref_logits - l32).max()),
                "cam_max_diff": _cam_diff(ref_cam, c32, card.img_size),
                "verdict_agreement": float(np.mean(v_ref == v32)), "tolerance": FP32_TOL}
        fp32["ok"] = fp32["max_prob_diff"] <= FP32_TOL and fp32["verdict_agreement"] == 1.0
        report["parity"] = {"fp32": fp32}
        if check and not fp32["ok"]:
            raise DefectclsError(f"ONNX fp32 export disagrees with torch: max |P(bad) diff| "
                                 f"{fp32['max_prob_diff']:.2e} (allowed {FP32_TOL:.0e}), verdicts agree on "
                                 f"{fp32['verdict_agreement']:.1%}; nothing written")
        os.replace(tmp_fp32, fp32_path)
        report["files"]["fp32"] = {"path": str(fp32_path), "size_mb": _mb(fp32_path)}
        if int8:
            report["parity"]["int8"] = _export_int8(fp32_path, out_dir / ONNX_INT8_FILE, Path(tmp), card, meta,
                                                    x, l32, c32, n_calib, seed + 1, render_size, check)
            if (out_dir / ONNX_INT8_FILE).is_file() and report["parity"]["int8"]["ok"]:
                report["files"]["int8"] = {"path": str(out_dir / ONNX_INT8_FILE), "size_mb": _mb(out_dir / ONNX_INT8_FILE)}
    if views is None and top is None and card.screen and card.tta > 1:
        # the card's one-view screen runs a one-view graph beside this one (``edge.EdgePredictor``)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export.") as tmp:
            sub = export_onnx(model_dir, out=tmp, opset=opset, check=check, views=1, _inputs=(x, y))
            os.replace(Path(tmp) / ONNX_FILE, out_dir / SCREEN_ONNX_FILE)
        report["parity"]["screen"] = sub["parity"]["fp32"]
        report["files"]["screen"] = {"path": str(out_dir / SCREEN_ONNX_FILE), "size_mb": _mb(out_dir / SCREEN_ONNX_FILE)}
    report["safetensors_mb"] = _mb(model_dir / "model.safetensors")
    report["ok"] = all(v["ok"] for v in report["parity"].values())
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def _export_int8(fp32_path: Path, dst: Path, tmp: Path, card, meta: dict, x: np.ndarray, l32: np.ndarray,
                 c32: np.ndarray | None, n_calib: int, seed: int, render_size: int | None, check: bool) -> dict:
    calib, _ = synthetic_inputs(card, n_calib, seed, render_size)
    p32, v32 = _verdicts(l32, card)
    tried = []
    for how in INT8_METHODS:
        cand = tmp / f"int8-{how}.onnx"
        try:
            _quantize(fp32_path, cand, how, calib)
            _set_metadata(cand, {**meta, "precision": "int8", "quantization": how})
            l8, c8 = _run(make_session(cand), x, card.scoring_batch())
        except Exception as exc:  # onnxruntime's quantiser raises many types
            tried.append({"method": how, "error": str(exc).splitlines()[0][:200]})
            continue
        p8, v8 = _verdicts(l8, card)
        res = {"method": how, "n": int(len(x)), "verdict_agreement": float(np.mean(v8 == v32)),
               "missed_bad": int(np.sum(v32 & ~v8)), "extra_bad": int(np.sum(~v32 & v8)),
               "fp32_bad": int(v32.sum()), "max_prob_diff": float(np.abs(p8 - p32).max()),
               "cam_max_diff": _cam_diff(c32, c8, card.img_size), **_cam_agreement(c32, c8, card.img_size, v32),
               "size_mb": _mb(cand)}
        res["ok"] = res["verdict_agreement"] >= INT8_AGREEMENT and res["missed_bad"] == 0
        tried.append(res)
        if res["ok"]:
            os.replace(cand, dst)
            return {**res, "tried": tried[:-1]}
    if dst.exists():
        dst.unlink()   # an older int8 file no longer matches the fp32 one
    best = max((t for t in tried if "verdict_agreement" in t), key=lambda t: t["verdict_agreement"], default={})
    if check:
        raise DefectclsError(f"no int8 quantisation kept parity with fp32 (best: {best.get('method')} with "
                             f"{best.get('verdict_agreement', 0):.1%} agreement, {best.get('missed_bad')} missed bad); "
                             f"model.onnx was written, model.int8.onnx was not")
    return {"ok": False, "tried": tried, "agreement_required": INT8_AGREEMENT}


def ensure_onnx(model_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                sha256: str | None = None, views: int | None = None, top: int | None = None) -> Path:
    """A model.onnx that matches MODEL_DIR's weights: the directory's own, else one exported once into a cache.

    The cache (CACHE_DIR, else $DEFECTCLS_CACHE_DIR, else ~/.cache/defectcls) is keyed by the weights'
    sha256; a file lock keeps concurrent processes from exporting twice. Use it as
    ``Predictor(model_dir, onnx_path=ensure_onnx(model_dir))`` where the model directory is read-only
    or must stay small (model.onnx is ~17 MB for MobileNetV3-Large).
    """
    from filelock import FileLock

    from .edge import session_meta
    from .inference import onnx_mismatch
    from .models import read_card

    model_dir = Path(model_dir)
    sha = sha256 or weights_sha256(model_dir)   # SHA256: the caller's hash of the weights, not read again
    card = read_card(model_dir)
    if views is not None or top is not None:     # VIEWS, TOP: test-time views of the graph, and how many count
        card = with_views(card, card.tta if views is None else views, top)
    tta, top = card.tta, card.tta_top

    def current(path: Path) -> bool:
        if not path.is_file():
            return False
        try:
            return onnx_mismatch(session_meta(make_session(path)), sha, tta, top) is None
        except DefectclsError:
            return False

    if current(model_dir / ONNX_FILE):
        return model_dir / ONNX_FILE
    if tta == 1 and current(model_dir / SCREEN_ONNX_FILE):     # a screened card's one-view graph, exported beside
        return model_dir / SCREEN_ONNX_FILE
    root = Path(cache_dir or os.environ.get("DEFECTCLS_CACHE_DIR") or Path.home() / ".cache" / "defectcls")
    target = root / "onnx" / (sha[:16] + (f"-tta{tta}" if tta > 1 else "") + (f"-top{top}" if top else ""))
    target.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target / ".lock")):
        if not current(target / ONNX_FILE):
            export_onnx(model_dir, out=target, n_check=16, views=tta, top=top)
    return target / ONNX_FILE
