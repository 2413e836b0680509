"""Torch-free runtime for exported models: numpy + Pillow + onnxruntime only.

An ONNX file written by ``defectcls export`` carries its model card in its metadata
(preprocessing, threshold, temperature, model id), so the file alone is enough to
judge images on an edge box. Preprocessing is the same function the trainer uses
(``data.preprocess``), and the heat-map is the same Grad-CAM as in the app
(the graph's second output, scaled by ``explain.normalize_cam``).

    python -m defectcls.edge model.int8.onnx part1.png part2.png --cam-dir cams --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import data as D
from .errors import DefectclsError, ImageLoadError, ModelLoadError
from .evaluate import prob_bad_from_logits
from .explain import encode_jpeg, normalize_cam, overlay, screen_bounds, screened

INPUT_NAME = "input"
LOGITS_NAME = "logits"
CAM_NAME = "cam"
META_PREFIX = "defectcls."
SCREEN_ONNX_FILE = "model.screen.onnx"   # a screened card's one-view graph, beside model.onnx (``defectcls export``)

ImageSource = str | os.PathLike | bytes | np.ndarray


def make_session(path: str | os.PathLike, threads: int | None = None, spin: bool = True):
    """An onnxruntime CPU session tuned for one-image requests.

    All graph optimisations on; THREADS intra-op threads (default: onnxruntime's choice,
    one per physical core); one inter-op thread (the graphs are sequential). SPIN=False
    stops idle worker threads from busy-waiting, kinder to a CPU shared with other work.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"ONNX file {path} does not exist (write it with `defectcls export --model DIR`)")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from exc


def session_meta(session) -> dict[str, str]:
    """The defectcls.* metadata of a session's model, without the prefix."""
    props = session.get_modelmeta().custom_metadata_map
    return {k[len(META_PREFIX):]: v for k, v in props.items() if k.startswith(META_PREFIX)}


def session_outputs(session) -> list[str]:
    return [o.name for o in session.get_outputs()]


class EdgePredictor:
    """Judge images with an exported ONNX file alone (no torch, no model directory)."""

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None, spin: bool = True):
        self.path = Path(onnx_path)
        self.session = make_session(self.path, threads, spin)
        meta = session_meta(self.session)
        if "card" not in meta:
            raise ModelLoadError(f"{self.path}: no defectcls model card in its metadata (export it with `defectcls export`)")
        self.card: dict = json.loads(meta["card"])
        self.prep = D.Preprocessing.from_card(self.card)
        self.model_id: str = meta.get("model_id", self.card.get("name", self.path.stem))
        self.threshold = float(self.card["threshold"])
        self.temperature = float(self.card.get("temperature", 1.0))
        self.has_cam = CAM_NAME in session_outputs(self.session)
        # where the heat-map's cells are drawn (``models.cam_offset``); exports older than it: the usual place
        self.cam_offset: tuple[float, float] = tuple(json.loads(meta.get("cam_offset", "[0, 0]")))
        self.screen_session = None
        bounds = screen_bounds(self.card.get("screen"), self.card.get("tta", 1))
        if bounds is not None and (self.path.parent / SCREEN_ONNX_FILE).is_file():
            self._open_screen(self.path.parent / SCREEN_ONNX_FILE, meta, bounds, threads, spin)

    def _open_screen(self, path: Path, meta: dict, bounds: tuple[float, float], threads: int | None,
                     spin: bool) -> None:
        """The card's one-view screen (``inference.Predictor``) from PATH, the export's one-view graph."""
        session = make_session(path, threads, spin)
        smeta = session_meta(session)
        if smeta.get("weights_sha256") != meta.get("weights_sha256"):
            raise ModelLoadError(f"{path} was exported from other weights than {self.path}: export both again")
        if int(json.loads(smeta.get("card", "{}")).get("tta", 1)) != 1:
            raise ModelLoadError(f"{path} is not a one-view graph: export again")
        self.screen_session = session
        self.screen_below, self.screen_above = bounds
        self.screen_cam_offset: tuple[float, float] = tuple(json.loads(smeta.get("cam_offset", "[0, 0]")))
        self.has_cam = self.has_cam and CAM_NAME in session_outputs(session)

    def load(self, src: ImageSource, fast_png: bool = True) -> np.ndarray:
        return self.prep.load(src, fast_png)

    def preprocess(self, src: ImageSource) -> np.ndarray:
        """The one preprocessing path (``data.Preprocessing``) with the card's settings."""
        return self.prep.preprocess(src)

    def run(self, x: np.ndarray, cam: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, raw Grad-CAM maps or None) for a float32 NxCxHxW batch; with the card's screen
        (``model.screen.onnx`` beside the file) one view first, all views only where it is unsure."""
        cam = cam and self.has_cam
        if self.screen_session is None:
            return self._run(self.session, x, cam)
        return screened(lambda v: self._run(self.screen_session, v, cam), lambda v: self._run(self.session, v, cam), x,
                        self.temperature, self.screen_below, self.screen_above, x.shape[-2:],
                        self.screen_cam_offset if cam else None, self.cam_offset)

    @staticmethod
    def _run(session, x: np.ndarray, cam: bool) -> tuple[np.ndarray, np.ndarray | None]:
        names = [LOGITS_NAME, CAM_NAME] if cam else [LOGITS_NAME]
        out = session.run(names, {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
        return out[0], (out[1] if len(out) > 1 else None)

    def _result(self, p: float, ms: float, ready: D.Prepared) -> dict:
        return {"label": D.verdict(p, self.threshold, ready.held), "prob_bad": float(p), "threshold": self.threshold,
                "model_id": self.model_id, "latency_ms": round(ms, 3), "notes": ready.notes, "held": ready.held}

    def predict(self, src: ImageSource) -> dict:
        """{label, prob_bad, threshold, model_id, latency_ms, notes, held} for one image (notes, held:
        ``data.photo_check``)."""
        t0 = time.perf_counter()
        ready = self.prep.prepare(self.load(src))
        logits, _ = self.run(ready.x[None])
        p = float(prob_bad_from_logits(logits, self.temperature)[0])
        return self._result(p, (time.perf_counter() - t0) * 1e3, ready)

    def predict_batch(self, srcs: Sequence[ImageSource]) -> list[dict]:
        """Results in order; an unreadable image yields {"error": reason}."""
        xs, readies, slots, out = [], [], [], [None] * len(srcs)
        for i, s in enumerate(srcs):
            try:
                ready = self.prep.prepare(self.load(s))
                xs.append(ready.x)
                readies.append(ready)
                slots.append(i)
            except ImageLoadError as exc:
                out[i] = {"error": str(exc)}
        if xs:
            t0 = time.perf_counter()
            ps = prob_bad_from_logits(self.run(np.stack(xs))[0], self.temperature)
            per = (time.perf_counter() - t0) * 1e3 / len(xs)
            for i, p, r in zip(slots, ps, readies, strict=True):
                out[i] = self._result(float(p), per, r)
        return out

    def explain(self, src: ImageSource) -> tuple[dict, np.ndarray, np.ndarray]:
        """(result, heat-map HxW in [0, 1] at model input size, decoded image) from one pass."""
        return self._explain(src)[:3]

    def _explain(self, src: ImageSource) -> tuple[dict, np.ndarray, np.ndarray, tuple[int, int, int] | None]:
        """``explain`` and the square of the photo the model saw (``data.Prepared.box``), for its overlay."""
        if not self.has_cam:
            raise DefectclsError(f"{self.path}: this export has no heat-map output")
        t0 = time.perf_counter()
        img = self.load(src)
        ready = self.prep.prepare(img)
        x = ready.x[None]
        logits, raw = self.run(x, cam=True)
        cam = normalize_cam(raw, x.shape[-2:], self.cam_offset)[0]
        p = float(prob_bad_from_logits(logits, self.temperature)[0])
        return self._result(p, (time.perf_counter() - t0) * 1e3, ready), cam, img, ready.box


def main(argv: list[str] | None = None) -> int:
    """`python -m defectcls.edge MODEL.onnx IMAGE...`: one line (or JSON line) per image."""
    p = argparse.ArgumentParser(prog="python -m defectcls.edge",
                                description="Judge images with an exported ONNX model (numpy + Pillow + onnxruntime only).")
    p.add_argument("model", help="model.onnx or model.int8.onnx written by `defectcls export`")
    p.add_argument("images", nargs="+")
    p.add_argument("--cam-dir", help="also write a Grad-CAM overlay (JPEG) per image here")
    p.add_argument("--cam-size", type=int, default=512, help="longer side of the overlay in pixels")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="JSON lines")
    a = p.parse_args(argv)
    try:
        ep = EdgePredictor(a.model, threads=a.threads)
    except DefectclsError as exc:
        print(f"edge: error: {exc}", file=sys.stderr)
        return 2
    if a.cam_dir:
        Path(a.cam_dir).mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in a.images:
        try:
            if a.cam_dir:
                row, cam, img, box = ep._explain(path)
                row["cam"] = str(Path(a.cam_dir) / f"{Path(path).stem}_{row['label']}.jpg")
                Path(row["cam"]).write_bytes(encode_jpeg(overlay(img, cam, size=a.cam_size, box=box)))
            else:
                row = ep.predict(path)
        except DefectclsError as exc:
            failed += 1
            row = {"error": str(exc)}
        row = {"path": path, **row}
        if a.json:
            print(json.dumps(row), flush=True)
        elif "error" in row:
            print(f"{path}: ERROR {row['error']}", flush=True)
        else:
            print(D.verdict_line(path, row["label"], row["prob_bad"], row["threshold"], row["latency_ms"], row["held"],
                                 row["notes"], row.get("cam")), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
