"""defectcls web app: Inspect, Models and Review tabs; a thin Gradio shell over the defectcls library.

Run: ``python app.py`` (http://127.0.0.1:7860; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are respected).
Settings: DEFECTCLS_MODELS_DIR, DEFECTCLS_REVIEW_DIR, DEFECTCLS_AUTH="user:pass,user2:pass2",
DEFECTCLS_HUB_MODEL_REPO + DEFECTCLS_HUB_MODEL_REVISION, DEFECTCLS_REVIEW_REPO.
API (gradio_client): /inspect, /benchmark, /review_queue, /review_submit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import MethodType

import gradio as gr
import numpy as np
import pandas as pd
from gradio.components.label import LabelConfidence, LabelData

from defectcls import data as D
from defectcls.config import models_dir, review_dir
from defectcls.errors import DefectclsError
from defectcls.explain import CAM_METHODS, overlay
from defectcls.hub import ENV_REPO, ENV_REVISION, ModelRegistry, model_from_env
from defectcls.review import ReviewQueue

log = logging.getLogger("defectcls.app")

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"
MAX_FILE_SIZE = "50mb"  # the same limit load_image applies (data.MAX_BYTES)
DISPLAY_SIDE = 512  # longest side of images sent to the browser
FULLRES_KEEP_S = 3600  # full-resolution heat-map files older than this are deleted on the next request
BENCH_ARCHS = ("mobilenet_v3_large", "resnet50")
ANY = "any"
QUEUE_COLUMNS = ["#", "image", "status", "predicted", "p_bad", "margin", "label", "reviewer", "model"]
TITLE = "defectcls: visual inspection of round parts"

CSS = """
#verdict-md h2 {margin: 0.2em 0;}
.shortcut-hint {opacity: 0.75; font-size: 0.9em;}
"""

# One key per decision on the Review tab (ignored while typing in a field).
HEAD = """
<script>
document.addEventListener("keydown", (e) => {
  const t = e.target;
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
  if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable)) return;
  const ids = {c: "review-confirm", g: "review-good", b: "review-bad", s: "review-skip"};
  const id = ids[(e.key || "").toLowerCase()];
  if (!id) return;
  const btn = document.getElementById(id);
  if (!btn || btn.offsetParent === null || btn.disabled) return;
  e.preventDefault();
  btn.click();
});
</script>
"""


def _verdict_postprocess(self, value):
    """gr.Label postprocess whose heading is the thresholded verdict, with the bars bad first, then good."""
    if isinstance(value, dict) and "verdict" in value:
        conf = sorted(value["confidences"].items(), key=lambda kv: kv[0] != "bad")
        return LabelData(label=value["verdict"],
                         confidences=[LabelConfidence(label=k, confidence=float(v)) for k, v in conf])
    return gr.Label.postprocess(self, value)


def verdict_label(**kwargs) -> gr.Label:
    """A gr.Label that shows the verdict (P(bad) >= threshold) as its heading, not simply the more probable class.

    The override sits on the instance: a gr.Label subclass would make Gradio write a .pyi file next to app.py.
    """
    label = gr.Label(**kwargs)
    label.postprocess = MethodType(_verdict_postprocess, label)
    return label


def parse_auth(spec: str | None) -> list[tuple[str, str]] | None:
    """DEFECTCLS_AUTH="user:pass,user2:pass2" -> [(user, pass), ...]; None when unset."""
    if not spec or not spec.strip():
        return None
    pairs = []
    for item in spec.split(","):
        user, sep, pw = item.strip().partition(":")
        if not sep or not user.strip() or not pw:
            raise DefectclsError("DEFECTCLS_AUTH must look like 'user:password,user2:password2'")
        pairs.append((user.strip(), pw))
    return pairs


def _safe_name(name: str | None) -> str:
    base = os.path.basename(str(name or "upload").replace("\\", "/"))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:60] or "upload"


def _upload(value) -> tuple[str | None, str]:
    """An unprocessed gr.Image payload (FileData dict) or a path -> (server path, printable name)."""
    if value is None:
        return None, "upload"
    if isinstance(value, dict):
        return value.get("path"), _safe_name(value.get("orig_name") or value.get("path"))
    return str(value), _safe_name(str(value))


def _read_upload(path: str) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > D.MAX_BYTES:
            raise DefectclsError(f"file is {size / 1e6:.0f} MB, more than the {D.MAX_BYTES / 1e6:.0f} MB allowed")
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise DefectclsError(f"cannot read the upload ({exc.strerror or exc})") from exc


NO_IMAGE = "Upload an image (PNG, JPEG, BMP or TIFF) or pick an example first."


@contextlib.contextmanager
def _user_errors(name: str, what: str):
    """What a photo does to the pipeline becomes one clear message naming the file (never a server path)."""
    try:
        yield
    except gr.Error:
        raise
    except (DefectclsError, ValueError) as exc:
        msg = str(exc).removeprefix("upload: ")
        raise gr.Error(f"{name}: {msg}", print_exception=False) from exc
    except Exception as exc:  # keep serving whatever the file does to a decoder
        log.exception("%s failed on %s", what, name)
        raise gr.Error(f"{name}: could not be processed ({type(exc).__name__})", print_exception=False) from exc


def _fullres_dir() -> Path:
    """Where full-resolution heat-maps are written for download: beside Gradio's own temporary files."""
    root = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    d = root / "defectcls-fullres"
    d.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in d.glob("*.png"):
        try:
            if now - old.stat().st_mtime > FULLRES_KEEP_S:
                old.unlink()
        except OSError:
            pass
    return d


def _display(img: np.ndarray, side: int = DISPLAY_SIDE) -> np.ndarray:
    """Shrink a decoded image for the browser (keeps the aspect ratio)."""
    from PIL import Image

    h, w = img.shape[:2]
    if max(h, w) <= side:
        return img
    s = side / max(h, w)
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR))


def _heatmap(ex) -> np.ndarray:
    """The heat-map over the image, at most DISPLAY_SIDE pixels on its longer side."""
    return overlay(ex.image, ex.cam, size=min(DISPLAY_SIDE, max(ex.image.shape[:2])), box=ex.box)


def _ms(v) -> float | None:
    """A timing that may be a number or {"p50": ...}."""
    if isinstance(v, dict):
        v = v.get("p50", v.get("median"))
    return None if v is None else round(float(v), 2)


def _round(v, nd: int = 4):
    return round(v, nd) if isinstance(v, float) else v


def build_demo(model_dirs: Sequence[str | os.PathLike] | None = None, review_root: str | os.PathLike | None = None,
               device: str = "auto", auth_enabled: bool | None = None, bench_models: dict[str, str | None] | None = None,
               bench_iters: int = 10, hub_status: str | None = None, registry: ModelRegistry | None = None,
               queue: ReviewQueue | None = None) -> gr.Blocks:
    """The app. MODEL_DIRS defaults to every model directory under DEFECTCLS_MODELS_DIR, REVIEW_ROOT to
    DEFECTCLS_REVIEW_DIR; AUTH_ENABLED (default: DEFECTCLS_AUTH is set) makes the Review tab and its API
    take the reviewer from the login. BENCH_MODELS (display name -> model dir, or None for an untrained
    architecture) defaults to the registered MobileNetV3-Large and ResNet50 models, or their bare
    architectures, timed only."""
    registry = registry or ModelRegistry(model_dirs, device=device)
    queue = queue or ReviewQueue(review_root if review_root is not None else review_dir())
    auth_on = bool(os.environ.get("DEFECTCLS_AUTH")) if auth_enabled is None else auth_enabled
    bench_lock = threading.Lock()
    bench_cache: dict = {}

    def reviewer_of(name: str | None, request: gr.Request | None) -> str:
        if auth_on:
            user = getattr(request, "username", None) if request is not None else None
            if not user:
                raise gr.Error("Log in to review: decisions carry the reviewer's login.", print_exception=False)
            return str(user)
        name = (name or "").strip()
        if not name:
            raise gr.Error("Enter your name in the Reviewer field first: every decision carries it.",
                           print_exception=False)
        return name

    # ------------------------------------------------------------------ Inspect

    def inspect(image, method: str, model_name: str | None):
        """Verdict, heat-map and details for one image; the image enters the review queue as pending."""
        path, name = _upload(image)
        if not path:
            raise gr.Error(NO_IMAGE, print_exception=False)
        t0 = time.perf_counter()
        with _user_errors(name, "inspect"):
            raw = _read_upload(path)
            ex = registry.explain(model_name, raw, method or "gradcam")
            t1 = time.perf_counter()
            heat = _heatmap(ex)
            t2 = time.perf_counter()
            sha = queue.add_pending(raw, ex.prediction, source=f"app:{name}")
            t3 = time.perf_counter()
        p = ex.prediction
        timings = {**{k: round(v, 1) for k, v in ex.timings_ms.items()}, "overlay": round((t2 - t1) * 1e3, 1),
                   "queue": round((t3 - t2) * 1e3, 1), "total": round((t3 - t0) * 1e3, 1)}
        details = {"verdict": p.label, "p_bad": round(p.prob_bad, 6), "threshold": round(p.threshold, 6),
                   "model_id": p.model_id, "model": model_name or registry.default, "cam_method": method or "gradcam",
                   "sha256": sha, "image": {"name": name, "height": int(ex.image.shape[0]),
                                            "width": int(ex.image.shape[1])},
                   "timings_ms": timings, "review": "queued as pending", "notes": p.notes, "held": p.held}
        label = {"verdict": p.label, "confidences": p.confidences}
        return label, heat, details

    def heatmap_full(image, method: str, model_name: str | None) -> str:
        """The heat-map over the photo at the photo's own resolution, as a PNG file to download."""
        import hashlib

        from PIL import Image

        path, name = _upload(image)
        if not path:
            raise gr.Error(NO_IMAGE, print_exception=False)
        with _user_errors(name, "full-resolution heat-map"):
            raw = _read_upload(path)
            ex = registry.explain(model_name, raw, method or "gradcam")
            full = overlay(ex.image, ex.cam, box=ex.box)          # no size: the photo's own
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem)[:60] or "part"
        tag = re.sub(r"[^A-Za-z0-9]+", "", method or "gradcam")
        out = _fullres_dir() / f"{stem}_{tag}_{ex.prediction.label}_{hashlib.sha256(raw).hexdigest()[:12]}.png"
        Image.fromarray(full).save(out, format="PNG", compress_level=1)
        return str(out)

    def summary(details: dict) -> str:
        if not details:
            return ""
        t = details["timings_ms"]
        steps = " · ".join(f"{k} {v:.0f} ms" for k, v in t.items())
        word = ("BAD: held for a person (the model cannot judge this photo; see the note)" if details.get("held")
                else "BAD: defect suspected" if details["verdict"] == "bad" else "GOOD: no defect found")
        notes = "".join(f"\n\n**Note:** {n}" for n in details.get("notes") or [])
        return (f"## {word}\nP(bad) **{details['p_bad']:.3f}** against threshold **{details['threshold']:.3f}** "
                f"(bad when P(bad) >= threshold)  \nmodel `{details['model_id']}` · heat-map {details['cam_method']}  \n"
                f"time: {steps}  \nimage `{details['sha256'][:12]}` queued for review{notes}")

    # ------------------------------------------------------------------ Models

    def models_table() -> pd.DataFrame:
        rows = []
        for name in registry.names():
            try:
                card = registry.card(name)
            except DefectclsError as exc:
                rows.append({"model": name, "arch": "?", "status": f"unreadable: {exc}"})
                continue
            m = card.metrics.get("test") or card.metrics.get("val") or {}
            rows.append({"model": name, "arch": card.arch, "input": f"{card.img_size}px {card.color}",
                         "threshold": round(card.threshold, 4), "FNR": _round(m.get("fnr")), "FPR": _round(m.get("fpr")),
                         "AUROC": _round(m.get("auroc")), "default": "yes" if name == registry.default else ""})
        return pd.DataFrame(rows or [{"model": "(none)", "status": "no trained model found"}])

    def bench_targets() -> dict[str, str | None]:
        if bench_models is not None:
            return dict(bench_models)
        return registry.bench_models(BENCH_ARCHS)

    def run_benchmark(force: bool = True) -> dict:
        with bench_lock:
            if force or "result" not in bench_cache:
                try:
                    from defectcls import bench
                except ImportError as exc:
                    raise gr.Error(f"benchmark unavailable: {exc}", print_exception=False) from exc
                size = registry.card().img_size if registry.default else None
                bench_cache["result"] = bench.benchmark(bench_targets(), naive=False, iters=bench_iters, img_size=size)
            return bench_cache["result"]

    def benchmark() -> dict:
        """Time the compared models on this machine: forward and forward + Grad-CAM latency (p50, p95),
        throughput, parameters, size on disk, peak memory; card metrics for trained models."""
        return run_benchmark(force=True)

    def bench_ui(force: bool):
        return bench_view(run_benchmark(force=force))

    def choose_model(name: str):
        card = registry.card(name)
        return name, f"Inspect now uses **{name}** ({card.arch}, {card.img_size}px) for this browser session only."

    # ------------------------------------------------------------------ Review

    def _filters(status: str | None, predicted: str | None, model: str | None) -> dict:
        return {"status": None if status in (None, "", "all", ANY) else status,
                "predicted": None if predicted in (None, "", ANY) else predicted,
                "model": None if model in (None, "", ANY) else model}

    def review_queue(status: str = "pending", predicted: str = ANY, model: str = ANY,
                     request: gr.Request = None) -> dict:
        """The review queue, pending items borderline first (|p_bad - threshold| ascending), and agreement stats.
        status: pending | reviewed | all; predicted: good | bad | any; model: a model id or name, or any."""
        if auth_on:
            reviewer_of(None, request)
        try:
            items = queue.items(**_filters(status, predicted, model))
        except DefectclsError as exc:
            raise gr.Error(str(exc), print_exception=False) from exc
        hide = ("path", "image")
        return {"items": [{k: v for k, v in it.items() if k not in hide} for it in items], "stats": queue.stats()}

    def review_submit(sha256: str, decision: str, reviewer: str = "", note: str = "",
                      request: gr.Request = None) -> dict:
        """Record a decision on a queued image: confirm (keep the model's verdict), good, bad or skip.
        The reviewer is the login name when the app runs with auth, else the REVIEWER argument (required)."""
        who = reviewer_of(reviewer, request)
        try:
            return queue.submit(sha256, decision, who, note)
        except DefectclsError as exc:
            raise gr.Error(str(exc), print_exception=False) from exc

    def render_item(status, predicted, model, prefer: str | None = None):
        """Everything the Review tab shows for the current filters and item."""
        f = _filters(status, predicted, model)
        items = queue.items(**f)
        st = queue.stats()
        cur = next((i for i in items if i["sha256"] == prefer), None) or (items[0] if items else None)
        table = pd.DataFrame([{"#": n + 1, "image": i["sha256"][:12], "status": i["status"], "predicted": i["predicted"],
                               "p_bad": round(float(i["p_bad"]), 4), "margin": i["margin"],
                               "label": i["label"] or "", "reviewer": i["reviewer"] or "",
                               "model": i["model_id"]} for n, i in enumerate(items[:300])], columns=QUEUE_COLUMNS)
        shas = [i["sha256"] for i in items[:300]]
        pending = [i for i in items if i["status"] == "pending"]
        remain = (f"**{len(pending)}** pending in this view ({sum(i['skipped'] for i in pending)} skipped) · "
                  f"{st['pending']} pending / {st['reviewed']} reviewed in total")
        model_choices = [ANY, *queue.models()]
        if cur is None:
            return ("", None, None, "Nothing to review with these filters.", remain, table, shas, _stats_md(st),
                    gr.update(choices=model_choices))
        heat, cam_note = None, ""
        try:
            img = _display(D.load_image(cur["path"], "rgb"))
        except DefectclsError as exc:
            img, cam_note = None, f" (stored image unreadable: {exc})"
        name = registry.name_for_id(cur["model_id"]) or registry.default
        if name and img is not None:
            try:
                heat = _heatmap(registry.explain(name, cur["path"], "gradcam"))
                if name != registry.name_for_id(cur["model_id"]):
                    cam_note = f" (heat-map from {name}; the verdict came from another model)"
            except DefectclsError as exc:
                cam_note = f" (no heat-map: {exc})"
        verdict = (f"## Model says {cur['predicted'].upper()}\nP(bad) **{float(cur['p_bad']):.3f}**, threshold "
                   f"{float(cur['threshold']):.3f}, margin {cur['margin']:.3f}  \nmodel `{cur['model_id']}`{cam_note}  \n"
                   f"status **{cur['status']}**" + (f", label **{cur['label']}** by {cur['reviewer']}"
                                                     if cur["status"] == "reviewed" else "")
                   + (f" · skipped {cur['skips']}x" if cur["skips"] else "")
                   + "".join(f"\n\n**Photo note:** {n}" for n in cur.get("photo_notes") or []))
        return (cur["sha256"], img, heat, verdict, remain, table, shas, _stats_md(st),
                gr.update(choices=model_choices))

    def decide(decision: str):
        def handler(sha, reviewer, note, status, predicted, model, request: gr.Request):
            if not sha:
                raise gr.Error("No image selected.", print_exception=False)
            review_submit(sha, decision, reviewer, note, request)
            return (*render_item(status, predicted, model), "")
        return handler

    def pick_row(shas: list, status, predicted, model, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        prefer = shas[row] if shas and isinstance(row, int) and 0 <= row < len(shas) else None
        return render_item(status, predicted, model, prefer)

    def who_md(request: gr.Request):
        user = getattr(request, "username", None)
        if auth_on:
            return f"Signed in as **{user}**; decisions carry this name." if user else "Log in to review."
        return "Type your name above; every decision carries it."

    # ------------------------------------------------------------------ layout

    examples = sorted(EXAMPLES_DIR.glob("*.png")) if EXAMPLES_DIR.is_dir() else []
    with gr.Blocks(title=TITLE, delete_cache=(3600, 7200)) as demo:
        model_state = gr.State(registry.default)
        gr.Markdown(f"# {TITLE}\nGood/bad verdicts with calibrated confidence and a Grad-CAM heat-map; "
                    "every inspected image goes to the QA review queue.")
        with gr.Tabs():
            with gr.Tab("Inspect", id="inspect", elem_id="tab-inspect"):
                with gr.Row():
                    with gr.Column(scale=1):
                        image = gr.Image(label="Part photo (PNG, JPEG, BMP, TIFF)", type="filepath", image_mode=None,
                                         sources=["upload", "clipboard"], height=360, elem_id="inspect-image")
                        method = gr.Dropdown(list(CAM_METHODS), value="gradcam", label="Heat-map method",
                                             elem_id="inspect-method")
                        inspect_btn = gr.Button("Inspect", variant="primary", elem_id="inspect-run")
                        if examples:
                            gr.Examples([[str(p)] for p in examples], inputs=[image], cache_examples=False,
                                        label="Examples (synthetic parts: " + ", ".join(p.stem for p in examples) + ")",
                                        examples_per_page=8)
                    with gr.Column(scale=1):
                        label = verdict_label(label="Verdict (calibrated confidence)", elem_id="inspect-label")
                        heat = gr.Image(label="Grad-CAM heat-map", format="jpeg", interactive=False, height=360,
                                        elem_id="inspect-heatmap")
                        verdict_md = gr.Markdown(elem_id="verdict-md")
                        full_btn = gr.Button("Heat-map at full resolution (PNG)", size="sm", elem_id="inspect-full")
                        full_file = gr.File(label="Full-resolution heat-map", interactive=False, visible=True,
                                            elem_id="inspect-full-file")
                        with gr.Accordion("Details (JSON)", open=False):
                            details = gr.JSON(label="details", elem_id="inspect-details")
                # the written verdict belongs to one photo: a new photo clears it, and a run (which may fail)
                # clears it first, in one chain with the run, so the clearing cannot land after the new verdict
                image.change(lambda: ("", None), None, [verdict_md, full_file], api_visibility="private", queue=False)
                full_btn.click(heatmap_full, [image, method, model_state], full_file, api_name="heatmap_full",
                               preprocess=False, concurrency_limit=2, concurrency_id="model")
                inspect_btn.click(lambda: "", None, verdict_md, api_visibility="private", queue=False).then(
                    inspect, [image, method, model_state], [label, heat, details], api_name="inspect",
                    preprocess=False, concurrency_limit=2, concurrency_id="model").success(
                    summary, details, verdict_md, api_visibility="private", queue=False)

            with gr.Tab("Models", id="models", elem_id="tab-models") as models_tab:
                gr.Markdown("Available models (the active one is what **Inspect** uses in this session).")
                with gr.Row():
                    model_pick = gr.Dropdown(registry.names(), value=registry.default, label="Active model",
                                             elem_id="model-pick", scale=2)
                    model_msg = gr.Markdown(
                        f"Inspect uses **{registry.default}**." if registry.default else
                        "No trained model found: run `defectcls train` or set the Hub download settings.")
                gr.Dataframe(value=models_table(), label="Trained models (metrics from each model's own "
                                         "held-out test split)", interactive=False, elem_id="models-table")
                if hub_status:
                    gr.Markdown(f"Hub model download: {hub_status}")
                gr.Markdown("### Speed on this machine")
                bench_btn = gr.Button("Re-run benchmark", elem_id="bench-run")
                bench_md = gr.Markdown("The benchmark runs when this tab first opens (up to a minute on a small CPU); "
                                       "everyone sees that result until someone re-runs it.", elem_id="bench-md")
                bench_df = gr.Dataframe(label="Benchmark", interactive=False, elem_id="bench-table")
                bench_plot = gr.Plot(label="Latency (ms, median)", elem_id="bench-plot")
                model_pick.change(choose_model, model_pick, [model_state, model_msg], api_visibility="private")
                models_tab.select(lambda: bench_ui(False), None, [bench_df, bench_plot, bench_md],
                                  api_visibility="private", concurrency_limit=1, concurrency_id="bench")
                bench_btn.click(lambda: bench_ui(True), None, [bench_df, bench_plot, bench_md],
                                api_visibility="private", concurrency_limit=1, concurrency_id="bench")
                gr.api(benchmark, api_name="benchmark", concurrency_limit=1, concurrency_id="bench")

            with gr.Tab("Review", id="review", elem_id="tab-review") as review_tab:
                with gr.Row():
                    f_status = gr.Radio(["pending", "reviewed", "all"], value="pending", label="Status",
                                        elem_id="review-status")
                    f_pred = gr.Radio([ANY, "good", "bad"], value=ANY, label="Model verdict", elem_id="review-predicted")
                    f_model = gr.Dropdown([ANY, *queue.models()], value=ANY, label="Model", elem_id="review-model",
                                          allow_custom_value=True)
                    refresh = gr.Button("Refresh", elem_id="review-refresh", scale=0)
                with gr.Row():
                    with gr.Column(scale=1):
                        r_img = gr.Image(label="Image", format="jpeg", interactive=False, height=320,
                                         elem_id="review-image")
                    with gr.Column(scale=1):
                        r_heat = gr.Image(label="Grad-CAM heat-map", format="jpeg", interactive=False, height=320,
                                          elem_id="review-heatmap")
                    with gr.Column(scale=1):
                        r_verdict = gr.Markdown(elem_id="review-verdict")
                        r_remain = gr.Markdown(elem_id="review-remain")
                        r_sha = gr.Textbox(label="Image sha256", interactive=False, elem_id="review-sha")
                        reviewer = gr.Textbox(label="Reviewer (your name, required)", visible=not auth_on,
                                              elem_id="review-reviewer", max_lines=1)
                        who = gr.Markdown(elem_classes="shortcut-hint")
                        note = gr.Textbox(label="Note (optional)", max_lines=2, elem_id="review-note")
                        with gr.Row():
                            b_confirm = gr.Button("Confirm verdict [C]", variant="primary", elem_id="review-confirm")
                            b_good = gr.Button("Mark good [G]", elem_id="review-good")
                            b_bad = gr.Button("Mark bad [B]", variant="stop", elem_id="review-bad")
                            b_skip = gr.Button("Skip [S]", elem_id="review-skip")
                        gr.Markdown("Keys C / G / B / S decide when no text field has focus.", elem_classes="shortcut-hint")
                r_stats = gr.Markdown(elem_id="review-stats")
                r_table = gr.Dataframe(label="Queue (click a row to open it)", interactive=False, elem_id="review-table",
                                       max_height=320)
                shas = gr.State([])
                view_out = [r_sha, r_img, r_heat, r_verdict, r_remain, r_table, shas, r_stats, f_model]
                filt = [f_status, f_pred, f_model]
                for trig in (refresh.click, review_tab.select, f_status.change, f_pred.change, f_model.change):
                    trig(render_item, filt, view_out, api_visibility="private", concurrency_limit=4,
                         concurrency_id="review")
                for btn, dec in ((b_confirm, "confirm"), (b_good, "good"), (b_bad, "bad"), (b_skip, "skip")):
                    btn.click(decide(dec), [r_sha, reviewer, note, *filt], [*view_out, note], api_visibility="private",
                              concurrency_limit=4, concurrency_id="review")
                r_table.select(pick_row, [shas, *filt], view_out, api_visibility="private")
                gr.api(review_queue, api_name="review_queue", concurrency_limit=8)
                gr.api(review_submit, api_name="review_submit", concurrency_limit=8)
        demo.load(render_item, filt, view_out, api_visibility="private").then(who_md, None, who,
                                                                                api_visibility="private")
    demo.queue(default_concurrency_limit=4)
    demo.registry, demo.review_queue = registry, queue
    return demo


def bench_view(res: dict) -> tuple[pd.DataFrame, object, str]:
    """The benchmark dict (defectcls.bench.benchmark) as a table, a bar chart and notes on timing-only models."""
    rows, untrained = [], []
    for name, r in res.get("models", {}).items():
        fwd = r.get("forward_ms") or {}
        met = r.get("metrics") or {k: r.get(k) for k in ("fnr", "fpr", "auroc")}
        rows.append({"model": name, "weights": "trained" if r.get("trained") else "timing only",
                     "arch": r.get("arch", name), "input px": r.get("img_size"), "backend": r.get("backend", "torch"),
                     "forward p50 ms": _ms(fwd.get("p50")), "forward p95 ms": _ms(fwd.get("p95")),
                     "+Grad-CAM ms": _ms(r.get("cam_ms")),
                     "end-to-end p50 ms": _ms(r.get("e2e_ms")),
                     "end-to-end p95 ms": _ms((r.get("e2e_ms") or {}).get("p95")
                                             if isinstance(r.get("e2e_ms"), dict) else None),
                     f"batch {res.get('batch', '')} img/s": _ms(r.get("throughput_ips")),
                     "params (M)": round(r["params"] / 1e6, 2) if r.get("params") else None,
                     "size MB": _ms(r.get("size_mb")), "peak MB": _ms(r.get("peak_mem_mb")),
                     "FNR": _round(met.get("fnr")), "FPR": _round(met.get("fpr")), "AUROC": _round(met.get("auroc"))})
        if not r.get("trained"):
            untrained.append((name, r.get("arch", name)))
    df = pd.DataFrame(rows)
    head = (f"Device **{res.get('device', '?')}** ({res.get('device_name', '')}), {res.get('threads', '?')} threads, "
            f"torch {res.get('torch', '?')}; {res.get('iters', '?')} timed runs per model after warm-up, "
            f"medians and p95. End-to-end = {res.get('request', 'upload -> verdict + overlay')}. "
            "FNR / FPR / AUROC come from each trained model's own held-out test split.")
    notes = [f"- **{n}**: *timing only* (untrained weights: no verdicts). Train it with "
             f"`defectcls train --data data/synth --arch {a} --out models/{a}_gray`, or download trained weights "
             f"by setting `{ENV_REPO}=owner/repo` and `{ENV_REVISION}=<full commit sha>` "
             f"(plus `DEFECTCLS_HUB_MODEL_SUBFOLDER={a}_gray` when the repo holds several models) and restarting."
             for n, a in untrained]
    return df, _bench_plot(df), "\n".join([head, *notes])


def _stats_md(st: dict) -> str:
    """Agreement between reviewers and the model, per predicted class."""
    a = st["agreement"]

    def rate(k: str) -> str:
        r = a[k]
        return f"{r['overturned']}/{r['reviewed']}" + (f" ({r['overturn_rate']:.0%})" if r["reviewed"] else "")

    out = (f"**Agreement**: reviewers overturned the model on {rate('overall')} reviewed images; "
           f"verdict bad -> good (false alarms) {rate('bad')}, verdict good -> bad (missed defects) {rate('good')}.")
    if st.get("unreadable_rows"):
        out += f"  \n**Log warning**: {st['unreadable_rows']} unreadable row(s) skipped: " + "; ".join(st["problems"][:3])
    return out


def _bench_plot(df: pd.DataFrame):
    """Grouped horizontal bars: forward, forward + Grad-CAM and end-to-end median latency per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in ("forward p50 ms", "+Grad-CAM ms", "end-to-end p50 ms") if c in df and df[c].notna().any()]
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.9 * max(1, len(df))))
    if df.empty or not cols:
        ax.text(0.5, 0.5, "no timings", ha="center", va="center")
        ax.set_axis_off()
        return fig
    y = np.arange(len(df))
    h = 0.8 / len(cols)
    for k, c in enumerate(cols):
        vals = df[c].fillna(0).to_numpy(float)
        bars = ax.barh(y + k * h, vals, h, label=c.replace(" p50 ms", "").replace(" ms", ""))
        ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    ax.set_yticks(y + h * (len(cols) - 1) / 2, df["model"] + np.where(df["weights"] == "trained", "", " (timing only)"))
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per image (lower is better)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3 / max(1, len(df)) - 0.12), ncol=len(cols), fontsize=8,
              frameon=False)
    fig.tight_layout()
    plt.close(fig)
    return fig


def launch_kwargs(review_root: str | os.PathLike | None = None) -> dict:
    """Arguments for demo.launch(): theme/css/head, upload limit, served paths, auth from DEFECTCLS_AUTH."""
    blocked = [str(Path(review_root if review_root is not None else review_dir()).resolve()),
               str(Path(models_dir()).resolve())]
    return {"theme": gr.themes.Soft(), "css": CSS, "head": HEAD, "max_file_size": MAX_FILE_SIZE,
            "allowed_paths": [str(EXAMPLES_DIR)] if EXAMPLES_DIR.is_dir() else [], "blocked_paths": blocked,
            "auth": parse_auth(os.environ.get("DEFECTCLS_AUTH")), "auth_message": "defectcls: log in to review",
            "footer_links": ["api", "gradio"]}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hub_status = None
    try:
        got = model_from_env()
        hub_status = f"fetched into `{got}`" if got else None
    except DefectclsError as exc:
        hub_status = f"failed: {exc}"
        log.warning("hub model download: %s", exc)
    try:
        kwargs = launch_kwargs()
        registry = ModelRegistry(None, device="auto")
        demo = build_demo(hub_status=hub_status, registry=registry)
    except DefectclsError as exc:
        raise SystemExit(f"app.py: error: {exc}") from None
    # Load the default model while the server starts: on CPU that includes its one-time ONNX export
    # (~10 s, cached), which would otherwise land on the first visitor's request.
    threading.Thread(target=_warm_up, args=(registry,), name="warm-up", daemon=True).start()
    demo.launch(**kwargs)


def _warm_up(registry: ModelRegistry) -> None:
    """Load the default model and run one blank photo through it: the ONNX export, the heat-map's
    drawing offset (a probe of about a second) and the runtimes' first-call costs are paid here, not
    by the first visitor."""
    t0 = time.perf_counter()
    try:
        pred = registry.predictor()
        registry.explain(None, np.zeros((256, 256), np.uint8))
    except DefectclsError as exc:
        log.warning("default model not loaded at start: %s", exc)
        return
    log.info("default model %s ready on %s in %.1f s", registry.default, pred.backend, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
