"""Factory mode: judge a folder once or keep watching it, and keep a visual log an auditor can replay.

Every judged file gets one row in ``LOG_DIR/log.jsonl`` (the source of truth, exact file names) and
``LOG_DIR/log.csv`` (the same rows for spreadsheets), appended with one ``write`` per row, plus an
annotated overlay (photo, Grad-CAM heat-map, caption strip) for bad parts and, on request, good ones.
Decoding runs in a pool ahead of inference (processes with libspng where it is installed, else
threads with Pillow, which releases the GIL); verdicts are computed in batches and the heat-map
only where an overlay is written. On start, the log is checked: a torn last row (a crash mid-write)
is cut off, kept in ``torn_rows.txt`` and reported; files already in the log are not judged again.

This module needs no PyTorch unless it builds the default predictor or draws heat-maps, so a
predictor with the same small interface (``load``, ``preprocess``, ``probs``, ``threshold``,
``model_id``, ``card``) from another backend can be passed in.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime as _dt
import functools
import glob
import hashlib
import heapq
import html
import io
import json
import os
import re
import signal
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import data as D
from .errors import DefectclsError, ImageLoadError

LOG_JSONL = "log.jsonl"
LOG_CSV = "log.csv"
RUNS_JSONL = "runs.jsonl"
TORN_FILE = "torn_rows.txt"
OVERLAY_DIR = "overlays"
REPORT_FILE = "report.html"
LOCK_FILE = ".inspect.lock"
FIELDS = ("seq", "file", "sha256", "size", "mtime_ns", "time", "verdict", "prob_bad", "threshold", "model_id",
          "duration_ms", "overlay", "review", "error", "notes")
WATCH_EXTS = D.IMG_EXTS + (".gif", ".webp", ".svg")   # .svg is listed so that it is refused with a reason
OVERLAY_SIDE = 512


# ---------------------------------------------------------------- the log

def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _csv_cell(value) -> str:
    """One spreadsheet-safe cell: no line breaks (one row per line) and no formulas (= + - @ lead)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    text = str(value).replace("\r", "\\r").replace("\n", "\\n")
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t") else text


def _csv_line(row: dict) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_csv_cell(row.get(k)) for k in FIELDS])
    return buf.getvalue().encode("utf-8", errors="backslashreplace")


def _csv_header() -> bytes:
    return (",".join(FIELDS) + "\n").encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _split_tail(data: bytes) -> tuple[bytes, bytes]:
    """(complete lines, torn fragment after the last newline)."""
    cut = data.rfind(b"\n") + 1
    return data[:cut], data[cut:]


@dataclass
class Recovery:
    """What the start-up check of a log folder found and repaired."""

    torn_rows: list[str] = field(default_factory=list)       # fragments cut off the end of log.jsonl
    corrupt_lines: int = 0                                   # unparsable complete lines (kept, skipped)
    csv_rebuilt: str | None = None                           # why log.csv was rewritten from log.jsonl
    unclean_previous_run: dict | None = None                 # last run started but never stopped cleanly
    orphan_overlays: list[str] = field(default_factory=list)  # overlays with no row (written just before a crash)

    def messages(self) -> list[str]:
        out = []
        prev = self.unclean_previous_run
        if prev:
            out.append(f"the previous run (pid {prev.get('pid')}, started {prev.get('time')}) ended without a clean stop")
        for frag in self.torn_rows:
            out.append(f"log.jsonl ended in a torn row ({len(frag)} bytes, kept in {TORN_FILE}); that file will be "
                       "judged again")
        if self.corrupt_lines:
            out.append(f"log.jsonl has {self.corrupt_lines} unreadable line(s); they are skipped")
        if self.csv_rebuilt:
            out.append(f"log.csv rebuilt from log.jsonl ({self.csv_rebuilt})")
        if self.orphan_overlays:
            out.append(f"{len(self.orphan_overlays)} overlay(s) have no log row (written just before a crash): "
                       + ", ".join(self.orphan_overlays[:3]))
        return out

    def to_dict(self) -> dict:
        return {"torn_rows": len(self.torn_rows), "corrupt_lines": self.corrupt_lines, "csv_rebuilt": self.csv_rebuilt,
                "unclean_previous_run": self.unclean_previous_run, "orphan_overlays": self.orphan_overlays,
                "messages": self.messages()}


def read_log(log_dir: str | os.PathLike) -> tuple[list[dict], int, bytes]:
    """Rows of LOG_DIR/log.jsonl without changing it: (rows, unparsable complete lines, torn tail bytes)."""
    path = Path(log_dir) / LOG_JSONL
    if not path.is_file():
        return [], 0, b""
    body, tail = _split_tail(path.read_bytes())
    rows, bad = [], 0
    for line in body.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict) and "file" in row:
            rows.append(row)
        else:
            bad += 1
    return rows, bad, tail


def _cut_tail(path: Path) -> bytes:
    """Cut a torn last line (no newline: the writer died mid-row) off PATH; returns what was cut."""
    if not path.is_file():
        return b""
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        pos, tail = size, b""
        while pos > 0:
            step = min(65536, pos)
            fh.seek(pos - step)
            chunk = fh.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                tail = chunk[nl + 1:] + tail
                break
            tail, pos = chunk + tail, pos - step
        if tail:
            fh.truncate(size - len(tail))
    return tail


def _read_runs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in _split_tail(path.read_bytes())[0].splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


class InspectionLog:
    """Append-only log of one folder: recovers a crashed tail on open, then one ``write`` per row and file."""

    def __init__(self, log_dir: str | os.PathLike):
        self.dir = Path(log_dir)
        self.recovery = Recovery()
        self.rows = self._recover()
        self.next_seq = 1 + max((int(r.get("seq") or 0) for r in self.rows), default=0)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        self._jsonl = os.open(self.dir / LOG_JSONL, flags, 0o644)
        self._csv = os.open(self.dir / LOG_CSV, flags, 0o644)
        self._runs = os.open(self.dir / RUNS_JSONL, flags, 0o644)
        self._lock = threading.Lock()

    def _recover(self) -> list[dict]:
        rec = self.recovery
        jpath, cpath = self.dir / LOG_JSONL, self.dir / LOG_CSV
        rows, rec.corrupt_lines, _ = read_log(self.dir)
        tail = _cut_tail(jpath)
        if tail:
            frag = tail.decode("utf-8", errors="backslashreplace")
            rec.torn_rows.append(frag)
            with open(self.dir / TORN_FILE, "a", encoding="utf-8") as fh:
                fh.write(f"{_now_iso()}\tcut from the end of {LOG_JSONL}\t{json.dumps(frag)}\n")
        _cut_tail(self.dir / RUNS_JSONL)
        n_csv, csv_torn = -1, False
        if cpath.is_file():
            body, ctail = _split_tail(cpath.read_bytes())
            n_csv, csv_torn = max(0, body.count(b"\n") - 1), bool(ctail)
            if body and not body.startswith(_csv_header()) and jpath.is_file():
                keep = cpath.with_name(f"{LOG_CSV}.{time.strftime('%Y%m%dT%H%M%S')}.bak")
                os.replace(cpath, keep)
                n_csv = -1
                rec.csv_rebuilt = f"its columns were not {', '.join(FIELDS)}; old copy kept as {keep.name}"
            elif n_csv > len(rows):
                if not jpath.is_file():
                    raise DefectclsError(f"{cpath} exists without {LOG_JSONL}, the log it is made from; move it away first")
                keep = cpath.with_name(f"{LOG_CSV}.{time.strftime('%Y%m%dT%H%M%S')}.bak")
                os.replace(cpath, keep)
                rec.csv_rebuilt = f"it had {n_csv} row(s), more than the {len(rows)} in {LOG_JSONL}; old copy kept as {keep.name}"
            elif n_csv != len(rows) or csv_torn:
                rec.csv_rebuilt = ("its last row was torn" if csv_torn else
                                   f"it had {n_csv} row(s), {LOG_JSONL} has {len(rows)}")
        if n_csv != len(rows) or csv_torn:
            tmp = cpath.with_name(f".{LOG_CSV}.tmp")
            tmp.write_bytes(_csv_header() + b"".join(_csv_line(r) for r in rows))
            os.replace(tmp, cpath)
        runs = _read_runs(self.dir / RUNS_JSONL)
        ends = {r.get("run") for r in runs if r.get("event") == "end"}
        last = next((r for r in reversed(runs) if r.get("event") == "start"), None)
        if last and last.get("run") not in ends:
            rec.unclean_previous_run = {k: last.get(k) for k in ("run", "pid", "time")}
            rec.unclean_previous_run["rows_written"] = sum(1 for r in rows if r.get("run") == last.get("run"))
        odir = self.dir / OVERLAY_DIR
        if odir.is_dir():
            known = {r.get("overlay") for r in rows if r.get("overlay")}
            rec.orphan_overlays = sorted(f"{OVERLAY_DIR}/{p.name}" for p in odir.iterdir()
                                         if not p.name.startswith(".") and f"{OVERLAY_DIR}/{p.name}" not in known)
        return rows

    def write(self, row: dict) -> None:
        """Append one row to log.jsonl, then log.csv (the CSV is rebuilt on start if a crash fell in between)."""
        line = (json.dumps(row, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")
        with self._lock:
            try:
                _write_all(self._jsonl, line)
                _write_all(self._csv, _csv_line(row))
            except OSError as exc:
                raise DefectclsError(f"cannot append to the log in {self.dir} ({exc.strerror or exc}); stopped, "
                                     "the rows written so far are intact") from exc

    def event(self, record: dict) -> None:
        with self._lock:
            _write_all(self._runs, (json.dumps(record, ensure_ascii=True, default=str) + "\n").encode("ascii"))

    def close(self) -> None:
        for fd in (self._jsonl, self._csv, self._runs):
            with contextlib.suppress(OSError):
                os.close(fd)


# ---------------------------------------------------------------- finding files

@dataclass
class _Item:
    path: str           # absolute path (symlinks kept)
    size: int
    mtime_ns: int


def _list_input(spec: str, exclude: Path) -> tuple[list[str], int]:
    """Absolute paths of candidate files (sorted) and how many other files were ignored."""
    ignored = 0
    paths: list[str] = []
    ex = str(exclude)
    if os.path.isdir(spec):
        for root, dirs, files in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.abspath(os.path.join(root, d)) != ex)
            for name in files:
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in WATCH_EXTS:
                    paths.append(os.path.abspath(os.path.join(root, name)))
                else:
                    ignored += 1
    else:
        for p in glob.glob(spec, recursive=True):
            ap = os.path.abspath(p)
            if ap == ex or ap.startswith(ex + os.sep) or os.path.basename(p).startswith("."):
                continue
            paths.append(ap)
    return sorted(set(paths)), ignored


class _Scanner:
    """Decides when a file is ready: listed once in batch mode; in watch mode once its size and mtime hold still."""

    def __init__(self, spec: str, exclude: Path, watch: bool, settle_s: float, done: set[tuple[str, int, int]]):
        self.spec, self.exclude, self.watch, self.settle_s, self.done = spec, exclude, watch, settle_s, done
        self.prev: dict[str, tuple[int, int]] = {}
        self.busy: set[str] = set()
        self.deferred: dict[str, float] = {}     # path -> monotonic time of the first failed try
        self.first = True
        self.ignored = 0
        self.vanished = 0

    def poll(self) -> list[_Item]:
        if self.first or self.watch:
            paths, self.ignored = _list_input(self.spec, self.exclude)
        else:
            paths = sorted(self.deferred)
        first, self.first = self.first, False
        ready = []
        now = time.time()
        for p in paths:
            if p in self.busy:
                continue
            try:
                st = os.stat(p)
            except OSError:
                self.prev.pop(p, None)
                if self.deferred.pop(p, None) is not None:
                    self.vanished += 1
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            sig = (st.st_size, st.st_mtime_ns)
            if (p, *sig) in self.done:
                continue
            stable = self.prev.get(p) == sig
            self.prev[p] = sig
            old = now - st.st_mtime >= self.settle_s
            late = not self.watch and self.waited_too_long(p)        # batch mode must end
            if (first and not self.watch and p not in self.deferred) or stable or (old and p not in self.deferred) or late:
                self.busy.add(p)
                ready.append(_Item(p, *sig))
        return ready

    def release(self, path: str) -> None:
        self.busy.discard(path)

    def finish(self, item: _Item) -> None:
        self.busy.discard(item.path)
        self.deferred.pop(item.path, None)
        self.done.add((item.path, item.size, item.mtime_ns))

    def defer(self, item: _Item, size: int, mtime_ns: int) -> None:
        """Try again once the file holds still (it was changing, or failed while it may still be written)."""
        self.busy.discard(item.path)
        self.deferred.setdefault(item.path, time.monotonic())
        self.prev[item.path] = (size, mtime_ns)

    def give_up(self, path: str, mtime: float) -> bool:
        """A failing file is final once unchanged for settle_s (by its mtime or since its first failure)."""
        since = self.deferred.get(path)
        return time.time() - mtime >= self.settle_s or (since is not None and time.monotonic() - since >= self.settle_s)

    @property
    def max_wait_s(self) -> float:
        return max(30.0, 10 * self.settle_s)

    def waited_too_long(self, path: str) -> bool:
        since = self.deferred.get(path)
        return since is not None and time.monotonic() - since >= self.max_wait_s

    @property
    def idle(self) -> bool:
        return not self.busy and not self.deferred


# ---------------------------------------------------------------- decoding (runs in the pool)

@dataclass
class _Decoded:
    item: _Item
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""
    data: bytes | None = None
    image: np.ndarray | None = None
    x: np.ndarray | None = None
    error: str | None = None
    changed: bool = False
    vanished: bool = False
    decode_ms: float = 0.0
    notes: list[str] = field(default_factory=list)   # ``data.photo_check`` of the decoded photo
    held: bool = False                               # ``data.photo_check``: bad whatever the model says
    box: tuple[int, int, int] | None = None          # the square of the photo the model saw (``Prepared.box``)


def _reason(exc: Exception) -> str:
    text = str(exc)
    text = text[len("upload: "):] if text.startswith("upload: ") else text
    return " ".join(text.split())[:300]


DECODE_MODES = ("auto", "threads", "processes")


_Prep = D.Preprocessing   # what decode processes get instead of the predictor (picklable)


def _prep_of(predictor) -> _Prep | None:
    """The predictor's ``data.Preprocessing``; None for a predictor with its own (it stays in threads)."""
    prep = getattr(predictor, "prep", None)
    return prep if isinstance(prep, D.Preprocessing) else None


def _worker_init(parent: int) -> None:
    """Decode processes leave Ctrl-C to the main process, which stops them in order, and end with it.

    A main process killed outright (SIGKILL, OOM) cannot stop them: a watchdog thread ends a worker
    whose parent has gone, so that no orphan keeps decoding or holds the caller's pipes open.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="inspect-orphan-watch", daemon=True).start()


def _choose_decode(mode: str, prep: _Prep | None) -> str:
    if mode not in DECODE_MODES:
        raise DefectclsError(f"decode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    if mode == "processes" and prep is None:
        raise DefectclsError("decode processes need a model directory or exported .onnx predictor")
    if mode != "auto":
        return mode
    # libspng holds the GIL, so it pays only in processes; without it Pillow threads are as fast and start at once
    multi = (os.cpu_count() or 1) > 1
    return "processes" if prep is not None and multi and D._spng is not None else "threads"


def _prepare(predictor, img: np.ndarray) -> D.Prepared:
    """Model input, ``data.photo_check`` and the square the model sees of a decoded photo, against the
    training photos of the predictor's card where it has them (``Preprocessing.prepare``: the part found
    and the sharpness measured once)."""
    prep = predictor if isinstance(predictor, D.Preprocessing) else _prep_of(predictor)
    if prep is None:
        notes, held = D.photo_check(img)
        return D.Prepared(predictor.preprocess(img), None, notes, 0.0, 0.0, held)
    return prep.prepare(img)


def _decode(item: _Item, predictor, keep_bytes: bool, fast_png: bool = False) -> _Decoded:
    t0 = time.perf_counter()
    out = _Decoded(item, item.size, item.mtime_ns)
    try:
        st = os.stat(item.path)
        if not stat.S_ISREG(st.st_mode):
            out.error = "not a regular file"
            return out
        if st.st_size > D.MAX_BYTES:
            out.error = f"file is {st.st_size / 1e6:.0f} MB, more than the {D.MAX_BYTES / 1e6:.0f} MB allowed"
            return out
        with open(item.path, "rb") as fh:
            data = fh.read(D.MAX_BYTES + 1)
        st2 = os.stat(item.path)
    except FileNotFoundError:
        out.vanished = True
        return out
    except OSError as exc:
        out.error = f"cannot read file ({exc.strerror or exc})"
        return out
    out.size, out.mtime_ns = st2.st_size, st2.st_mtime_ns
    out.changed = ((st.st_size, st.st_mtime_ns) != (st2.st_size, st2.st_mtime_ns)
                   or (st.st_size, st.st_mtime_ns) != (item.size, item.mtime_ns)
                   or (len(data) != st2.st_size and len(data) <= D.MAX_BYTES))
    out.sha256 = hashlib.sha256(data).hexdigest()
    try:
        out.image = predictor.load(data, fast_png=fast_png)
        ready = _prepare(predictor, out.image)
        out.x, out.notes, out.box, out.held = ready.x, ready.notes, ready.box, ready.held
    except ImageLoadError as exc:
        out.error = _reason(exc)
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must not stop the line
        out.error = f"cannot decode ({type(exc).__name__}: {_reason(exc)})"
    if keep_bytes and out.error is None:
        out.data = data
    out.decode_ms = (time.perf_counter() - t0) * 1e3
    return out


# ---------------------------------------------------------------- overlays

def _safe_stem(path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(path))[0]).strip("._-")
    return stem[:60] or "image"


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


@functools.lru_cache(maxsize=8)
def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, OSError):
        return ImageFont.load_default()


@functools.lru_cache(maxsize=2048)
def _glyph(font, ch: str) -> tuple[Image.Image | None, int, int, float]:
    """One character's coverage mask, its offset from the pen position, and the pen advance."""
    left, top, right, bottom = font.getbbox(ch)
    mask = None
    if right > left and bottom > top:
        mask = Image.new("L", (right - left, bottom - top), 0)
        ImageDraw.Draw(mask).text((-left, -top), ch, fill=255, font=font)
    return mask, left, top, float(font.getlength(ch))


def _draw_text(img: Image.Image, xy: tuple[int, int], text: str, fill: tuple[int, int, int], font) -> None:
    """``ImageDraw.text`` from cached glyphs: the captions repeat the same few characters, and FreeType
    rendered each line afresh (1.6 ms a line, most of an overlay's drawing; same pixels within 1 level)."""
    x, y = xy
    for ch in text:
        mask, left, top, advance = _glyph(font, ch)
        if mask is not None:
            img.paste(fill, (round(x) + left, y + top), mask)
        x += advance


def annotate(rgb: np.ndarray, lines: list[str], verdict: str) -> Image.Image:
    """The overlay with a caption strip under it (and a verdict-coloured frame): what an auditor sees."""
    img = Image.fromarray(rgb)
    w, h = img.size
    px = max(11, w // 36)
    strip = int(px * 1.35 * len(lines) + px * 0.8)
    colour = {"bad": (220, 40, 40), "good": (40, 170, 70)}.get(verdict, (200, 200, 200))
    out = Image.new("RGB", (w, h + strip), (16, 16, 16))
    out.paste(img, (0, 0))
    ImageDraw.Draw(out).rectangle([0, 0, w - 1, h - 1], outline=colour, width=max(2, w // 128))
    font = _font(px)
    y = h + int(px * 0.4)
    for i, line in enumerate(lines):
        _draw_text(out, (px // 2, y), line, colour if i == 1 else (235, 235, 235), font)
        y += int(px * 1.35)
    return out


# ---------------------------------------------------------------- the run

def _load_review_queue():
    try:
        from .config import review_dir
        from .review import ReviewQueue
    except ImportError as exc:
        raise DefectclsError(f"--to-review needs the review queue (defectcls.review): {exc}") from exc
    return ReviewQueue(review_dir())


@contextlib.contextmanager
def _stop_on_signals(event: threading.Event, enabled: bool) -> Iterator[None]:
    """SIGINT/SIGTERM ask for a clean stop; a second Ctrl-C stops at once."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        event.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _cpu_s() -> float:
    """CPU seconds of this process plus its finished children (decode processes count once joined)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return time.process_time()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _median(xs: list[float]) -> float | None:
    return round(float(np.median(xs)), 3) if xs else None


def inspect_folder(model_dir: str | os.PathLike | None, input: str, log_dir: str | os.PathLike, save_good: bool = False,
                   overlay_format: str = "jpeg", to_review: bool = False, review_band: float = 0.1, batch_size: int = 8,
                   workers: int | None = None, watch: bool = False, poll_s: float = 0.5, settle_s: float = 2.0,
                   progress: bool = True, stop_event: threading.Event | None = None, handle_signals: bool = False,
                   cam_method: str = "gradcam", overlay_size: int = OVERLAY_SIDE, device: str = "auto",
                   backend: str = "auto", threads: int | None = None, predictor=None,
                   on_row: Callable[[dict], None] | None = None, decode: str = "threads") -> dict:
    """Judge every image under INPUT (a folder or a glob) and log it in LOG_DIR; returns a summary.

    In batch mode the files present at start are judged (a file that fails while it is still being
    written is retried until it holds still for SETTLE_S). With WATCH, new files keep being judged
    until STOP_EVENT is set (or SIGINT/SIGTERM with HANDLE_SIGNALS). Files already in the log are skipped.
    MODEL_DIR may also be an exported ``.onnx`` file: then only onnxruntime is used (see docs/factory.md).
    DECODE: ``threads`` (Pillow; the default here), ``processes`` (libspng, no GIL; ~14% more images/s,
    docs/factory.md) or ``auto`` (processes where libspng is installed and there is more than one CPU;
    the command line's default). Decode processes are spawned, which imports the caller's main script
    again: call this under ``if __name__ == "__main__":`` then. With ``auto`` a pool that cannot
    start falls back to threads. WORKERS: how many (default: one per CPU for processes).
    """
    if overlay_format not in ("jpeg", "png"):
        raise DefectclsError(f"overlay format must be 'jpeg' or 'png', got {overlay_format!r}")
    if batch_size < 1 or poll_s <= 0 or settle_s < 0 or review_band < 0:
        raise DefectclsError("batch size must be >= 1, poll interval > 0, settle time and review band >= 0")
    spec = os.fspath(input)
    if not spec:
        raise DefectclsError("--input is empty")
    if not os.path.isdir(spec):
        if not glob.has_magic(spec):
            raise DefectclsError(f"input {spec} is neither a folder nor a glob pattern (e.g. 'photos/*.png')")
        if not watch and not glob.glob(spec, recursive=True):
            raise DefectclsError(f"no files match {spec}")
    log_path = Path(log_dir).absolute()
    if os.path.isdir(spec) and Path(spec).absolute() == log_path:
        raise DefectclsError("the log folder must not be the input folder")
    try:
        log_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DefectclsError(f"cannot create log folder {log_path}: {exc.strerror or exc}") from exc
    from filelock import FileLock, Timeout

    lock = FileLock(str(log_path / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise DefectclsError(f"another inspect run is writing to {log_path} (lock {LOCK_FILE}); stop it first") from None
    try:
        if predictor is None:
            predictor = load_predictor(model_dir, device, backend, threads or default_threads()[0])
        queue = _load_review_queue() if to_review else None
        return _Run(predictor, spec, log_path, save_good, overlay_format, queue, review_band, batch_size,
                    workers, watch, poll_s, settle_s, progress, stop_event or threading.Event(), handle_signals,
                    cam_method, overlay_size, on_row, decode).run()
    finally:
        lock.release()


def default_threads() -> tuple[int, int]:
    """(model threads, decode threads) for this machine.

    PNG decoding costs several times the model here, so most cores decode. The model gets few
    threads: its OpenMP workers spin-wait when cores are oversubscribed (4x slower measured on 2
    busy cores, docs/factory.md); the main thread that runs it is idle most of the time.
    """
    cpus = os.cpu_count() or 1
    model = max(1, cpus // 4)
    return model, max(2, cpus - model + 1)


def load_predictor(model: str | os.PathLike, device: str = "auto", backend: str = "auto", threads: int | None = None):
    """A model directory -> ``inference.Predictor``; an exported .onnx file -> ``edge.EdgePredictor`` (no PyTorch).

    THREADS: intra-op threads of the model (None: the backend's default).
    """
    if os.fspath(model).lower().endswith(".onnx"):
        from .edge import EdgePredictor

        return EdgePredictor(model, threads=threads)
    from .inference import Predictor

    return Predictor(model, device=device, backend=backend, threads=threads)


class _Run:
    """One inspect run: a scanner feeds a decode pool; the main thread batches verdicts and writes rows."""

    def __init__(self, predictor, spec, log_path, save_good, overlay_format, queue, band, batch_size, workers, watch,
                 poll_s, settle_s, progress, stop, handle_signals, cam_method, overlay_size, on_row, decode="auto"):
        self.p, self.spec, self.dir = predictor, spec, log_path
        self.save_good, self.fmt, self.queue, self.band = save_good, overlay_format, queue, band
        self.batch_size, self.watch, self.poll_s, self.stop = batch_size, watch, poll_s, stop
        self.prep = _prep_of(predictor)
        self.decode_asked, self.workers_asked = decode, workers
        self.decode = _choose_decode(decode, self.prep)
        self.workers = workers or ((os.cpu_count() or 1) if self.decode == "processes" else default_threads()[1])
        self.progress, self.handle_signals, self.cam_method = progress, handle_signals, cam_method
        self.overlay_size, self.on_row = overlay_size, on_row
        self.log = InspectionLog(log_path)
        done = {(r["file"], r.get("size"), r.get("mtime_ns")) for r in self.log.rows}
        self.done_sha = {(r["file"], r.get("sha256")) for r in self.log.rows if r.get("sha256")}
        self.scanner = _Scanner(spec, log_path, watch, settle_s, done)
        self.run_id = f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self.counts = {"good": 0, "bad": 0, "error": 0}
        self.slowest: list[tuple[float, int, str]] = []      # min-heap of the 5 slowest judged files
        self.error_rows: list[dict] = []
        self.skipped_same_content = 0
        self.queued = 0
        self.t: dict[str, deque] = {k: deque(maxlen=20000) for k in ("decode", "model", "cam", "overlay")}
        self.cam_fn = None

    # -- model passes, heat-maps and overlays

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(calibrated P(bad), raw Grad-CAM maps or None) for a batch, from one pass where the backend can."""
        from .evaluate import prob_bad_from_logits

        p = self.p
        if self.cam_method == "gradcam" and getattr(p, "has_fast_cam", False):       # Predictor, torch or onnx
            logits, raw = p.forward_cam(x)
            return prob_bad_from_logits(logits, p.card.temperature), raw
        if hasattr(p, "run") and hasattr(p, "temperature"):                          # edge.EdgePredictor
            logits, raw = p.run(x, cam=bool(getattr(p, "has_cam", False)))
            return prob_bad_from_logits(logits, p.temperature), raw
        return p.probs(x), None

    def _heatmap(self, d: _Decoded, raw: np.ndarray | None) -> np.ndarray | None:
        """The heat-map for one part: scaled from the batch pass, else explain(); None without PyTorch."""
        from .explain import normalize_cam

        if raw is not None:
            return normalize_cam(raw[None], d.x.shape[-2:], getattr(self.p, "cam_offset", (0.0, 0.0)))[0]
        if self.cam_fn is None:
            self.cam_fn = False
            try:
                from .explain import explain
                from .inference import Predictor
            except ImportError:
                pass
            else:
                if isinstance(self.p, Predictor):
                    self.cam_fn = lambda im: explain(self.p, im, self.cam_method).cam
        return self.cam_fn(d.image) if self.cam_fn else None

    def _overlay(self, d: _Decoded, raw: np.ndarray | None, seq: int, verdict: str, p: float, when: str,
                 dur_ms: float) -> tuple[str, float, float]:
        """Write the annotated overlay of one part; returns (path relative to the log folder, cam ms, drawing ms)."""
        from .explain import encode_image, overlay

        t0 = time.perf_counter()
        cam = self._heatmap(d, raw)
        t1 = time.perf_counter()
        side = self.overlay_size           # small photos are scaled up too, so that the caption stays legible
        if cam is not None:
            rgb = overlay(d.image, cam, size=side, box=d.box)
        else:
            rgb = np.asarray(Image.fromarray(D.fit_square(d.image, side)).convert("RGB"))
        total = dur_ms + (t1 - t0) * 1e3
        lines = [f"#{seq}  {_printable(os.path.basename(d.item.path))}"[:90],
                 f"{verdict.upper()}  P(bad) {p:.4f}  threshold {self.p.threshold:.4f}",
                 f"{when[:19].replace('T', ' ')} UTC  {total:.0f} ms"]
        lines += [f"note: {n.split(': ')[0]}"[:90] for n in d.notes]
        rel = f"{OVERLAY_DIR}/{seq:07d}_{verdict}_{_safe_stem(d.item.path)}.{'png' if self.fmt == 'png' else 'jpg'}"
        target = self.dir / rel
        if target.resolve().parent != (self.dir / OVERLAY_DIR).resolve():   # _safe_stem makes this impossible
            raise DefectclsError(f"refusing to write outside the log folder: {target}")
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(encode_image(np.asarray(annotate(rgb, lines, verdict)), self.fmt, quality=88))
        os.replace(tmp, target)
        t2 = time.perf_counter()
        return rel, (t1 - t0) * 1e3, (t2 - t1) * 1e3

    # -- rows

    def _row(self, d: _Decoded, **kw) -> dict:
        seq = self.log.next_seq
        self.log.next_seq += 1
        row = {"seq": seq, "file": d.item.path, "sha256": d.sha256 or None, "size": d.size, "mtime_ns": d.mtime_ns,
               "time": kw.pop("time", None) or _now_iso(), "verdict": "error", "prob_bad": None,
               "threshold": self.p.threshold, "model_id": self.p.model_id, "duration_ms": round(d.decode_ms, 2),
               "overlay": None, "review": None, "error": None, "notes": "; ".join(d.notes) or None, "run": self.run_id}
        row.update(kw)
        return row

    def _commit(self, d: _Decoded, row: dict) -> None:
        self.log.write(row)
        self.scanner.finish(_Item(d.item.path, d.size, d.mtime_ns))
        self.scanner.done.add((d.item.path, d.item.size, d.item.mtime_ns))
        if d.sha256:
            self.done_sha.add((d.item.path, d.sha256))
        self.counts[row["verdict"]] += 1
        if row["verdict"] == "error":
            if len(self.error_rows) < 50:
                self.error_rows.append({"file": row["file"], "error": row["error"]})
        else:
            item = (row["duration_ms"], row["seq"], row["file"])
            (heapq.heappush if len(self.slowest) < 5 else heapq.heappushpop)(self.slowest, item)
        if self.on_row:
            self.on_row(row)

    def _judge(self, batch: list[_Decoded]) -> int:
        """Verdicts for one batch, overlays where needed, one row per finished file; returns rows written."""
        ok = [d for d in batch if d.x is not None and not d.changed and (d.item.path, d.sha256) not in self.done_sha]
        prob_of: dict[int, tuple[float, np.ndarray | None]] = {}
        model_ms = 0.0
        if ok:
            t0 = time.perf_counter()
            probs, raw = self._forward(np.stack([d.x for d in ok]))
            model_ms = (time.perf_counter() - t0) * 1e3 / len(ok)
            self.t["model"].append(model_ms)
            for i, d in enumerate(ok):
                prob_of[id(d)] = (float(probs[i]), None if raw is None else raw[i])
        written = 0
        for d in batch:
            if d.vanished:
                self.scanner.release(d.item.path)
                self.scanner.vanished += 1
            elif d.changed and (self.watch or not self.scanner.waited_too_long(d.item.path)):
                self.scanner.defer(d.item, d.size, d.mtime_ns)
            elif d.changed:                     # batch mode: a file that never stops changing ends as an error
                self._commit(d, self._row(d, error=f"still being written after {self.scanner.max_wait_s:.0f} s"))
                written += 1
            elif d.error is not None:
                if not self.scanner.give_up(d.item.path, d.mtime_ns / 1e9):
                    self.scanner.defer(d.item, d.size, d.mtime_ns)
                    continue
                self._commit(d, self._row(d, error=d.error))
                written += 1
            elif id(d) not in prob_of:          # same path and same bytes already judged (e.g. only touched)
                self.scanner.finish(d.item)
                self.skipped_same_content += 1
            else:
                self._judge_one(d, *prob_of[id(d)], model_ms)
                written += 1
        return written

    def _judge_one(self, d: _Decoded, p: float, raw: np.ndarray | None, model_ms: float) -> None:
        self.t["decode"].append(d.decode_ms)
        verdict = D.verdict(p, self.p.threshold, d.held)
        when = _now_iso()
        dur = d.decode_ms + model_ms
        overlay_rel, review = None, None
        problem = None
        if verdict == "bad" or self.save_good:
            try:
                overlay_rel, cam_ms, ov_ms = self._overlay(d, raw, self.log.next_seq, verdict, p, when, dur)
            except OSError as exc:          # e.g. disk full: the verdict still gets its row
                problem = f"overlay not written ({exc.strerror or exc})"
            else:
                self.t["cam"].append(cam_ms)
                self.t["overlay"].append(ov_ms)
                dur += cam_ms + ov_ms
        if self.queue is not None and (d.held or abs(p - self.p.threshold) <= self.band):
            review = self._to_review(d, p, verdict, dur)
        self._commit(d, self._row(d, time=when, verdict=verdict, prob_bad=round(p, 6), duration_ms=round(dur, 2),
                                  overlay=overlay_rel, review=review, error=problem))

    def _to_review(self, d: _Decoded, p: float, verdict: str, dur: float) -> str:
        from .inference import Prediction

        pred = Prediction(label=verdict, prob_bad=p, threshold=self.p.threshold, model_id=self.p.model_id,
                          latency_ms=round(dur, 3), notes=list(d.notes), held=d.held)
        try:
            self.queue.add_pending(d.data, pred, source="inspect")
        except Exception as exc:  # noqa: BLE001 - the review queue must never stop the line
            return f"failed: {_reason(exc)}"
        self.queued += 1
        return "queued"

    # -- main loop

    def _pool(self) -> Executor:
        """The decode pool; processes are started (and waited for) here, before the clock of the first file."""
        if self.decode == "threads":
            return ThreadPoolExecutor(self.workers, thread_name_prefix="inspect-decode")
        import multiprocessing as mp

        # spawn: never fork a process that runs PyTorch's thread pools; the workers import only numpy and Pillow
        pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                   initargs=(os.getpid(),))
        try:
            for fut in [pool.submit(os.getpid) for _ in range(self.workers)]:
                fut.result(timeout=120)
            return pool
        except Exception as exc:  # noqa: BLE001 - e.g. a main script that spawn cannot import again
            pool.shutdown(wait=False, cancel_futures=True)
            why = f"{type(exc).__name__}: {_reason(exc)}" if str(exc) else type(exc).__name__
            if self.decode_asked == "processes":
                raise DefectclsError(f"decode processes could not start ({why}); from a Python script, call "
                                     "inspect_folder under `if __name__ == \"__main__\":`, or use decode='threads'") from exc
            print(f"defectcls inspect: decode processes could not start ({why}); decoding in threads",
                  file=sys.stderr, flush=True)
            self.decode, self.workers = "threads", self.workers_asked or default_threads()[1]
            return ThreadPoolExecutor(self.workers, thread_name_prefix="inspect-decode")

    def run(self) -> dict:
        rec = self.log.recovery
        for msg in rec.messages():
            print(f"defectcls inspect: recovered: {msg}", file=sys.stderr, flush=True)
        self.log.event({"event": "start", "run": self.run_id, "pid": os.getpid(), "time": _now_iso(),
                        "input": self.spec, "model_id": self.p.model_id, "watch": self.watch,
                        "recovered": rec.to_dict()})
        t_start, cpu_start = time.perf_counter(), _cpu_s()
        t_first = t_last = None
        stopped = "done"
        bar = None
        pool = self._pool()
        pending: deque[Future] = deque()
        backlog: deque[_Item] = deque()
        depth = 2 * self.batch_size + self.workers
        keep_bytes = self.queue is not None
        if self.decode == "processes":
            decoder, fast_png = self.prep, True
        else:   # libspng holds the GIL: in threads Pillow (which releases it) gets more done (docs/factory.md)
            decoder, fast_png = self.p, D.PNG_DECODER == "libspng"

        def refill() -> None:
            nonlocal t_first
            while backlog and len(pending) < depth:
                pending.append(pool.submit(_decode, backlog.popleft(), decoder, keep_bytes, fast_png))
                t_first = t_first or time.perf_counter()

        try:
            with _stop_on_signals(self.stop, self.handle_signals):
                if self.progress:
                    from tqdm import tqdm

                    bar = tqdm(unit="img", desc="inspect", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
                last_poll = -1e18
                while not self.stop.is_set():
                    if time.monotonic() - last_poll >= self.poll_s:
                        found = self.scanner.poll()
                        last_poll = time.monotonic()
                        backlog.extend(found)
                        if bar is not None and not self.watch and bar.total is None:
                            bar.total = len(found)
                            bar.refresh()
                    refill()
                    if not pending:
                        if not self.watch and self.scanner.idle:
                            break
                        self.stop.wait(max(0.0, self.poll_s - (time.monotonic() - last_poll)))
                        continue
                    batch: list[_Decoded] = []
                    while pending and len(batch) < self.batch_size:
                        try:
                            batch.append(pending[0].result(timeout=self.poll_s))
                        except TimeoutError:
                            break
                        pending.popleft()
                        refill()
                    n = self._judge(batch) if batch else 0
                    if n:
                        t_last = time.perf_counter()
                        if bar is not None:
                            bar.update(n)
                            bar.set_postfix(bad=self.counts["bad"], errors=self.counts["error"], refresh=False)
                if self.stop.is_set():
                    stopped = "stop requested"
        except KeyboardInterrupt:
            stopped = "interrupted"
        finally:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()
        busy = (t_last - t_first) if (t_first and t_last) else 0.0
        summary = self._summary(time.perf_counter() - t_start, busy, _cpu_s() - cpu_start, stopped)
        self.log.event({"event": "end", "run": self.run_id, "time": _now_iso(), "summary": summary})
        self.log.close()
        return summary

    def _summary(self, elapsed: float, busy: float, cpu: float, stopped: str) -> dict:
        judged = self.counts["good"] + self.counts["bad"]
        total = judged + self.counts["error"]
        slow = sorted(self.slowest, reverse=True)
        return {
            "log_dir": str(self.dir), "input": self.spec, "model_id": self.p.model_id,
            "mode": "watch" if self.watch else "batch", "threshold": self.p.threshold, "run": self.run_id,
            "stopped": stopped, "rows": total, "judged": judged, "good": self.counts["good"], "bad": self.counts["bad"],
            "errors": self.counts["error"], "bad_rate": round(self.counts["bad"] / judged, 6) if judged else None,
            "rows_before": len(self.log.rows), "skipped_same_content": self.skipped_same_content,
            "ignored_other_files": self.scanner.ignored, "vanished": self.scanner.vanished,
            "still_waiting": sorted(self.scanner.deferred), "review_queued": self.queued,
            "elapsed_s": round(elapsed, 3), "images_per_s": round(total / busy, 2) if busy > 0 else None,
            "cpu_ms_per_image": round(cpu * 1e3 / total, 2) if total else None, "cpus": os.cpu_count(),
            "median_ms": {k: _median(list(v)) for k, v in self.t.items()},
            "batch_size": self.batch_size, "workers": self.workers, "decode": self.decode,
            "slowest": [{"file": f, "seq": s, "duration_ms": ms} for ms, s, f in slow],
            "error_rows": self.error_rows, "recovered": self.log.recovery.to_dict(),
        }


def format_summary(s: dict) -> str:
    """The end-of-run summary for people."""
    rate = f"{s['bad_rate'] * 100:.1f}%" if s["bad_rate"] is not None else "n/a"
    ips = f"{s['images_per_s']:.1f} images/s" if s["images_per_s"] else "n/a"
    if s["cpu_ms_per_image"]:
        ips += f", {s['cpu_ms_per_image']:.0f} CPU-ms per image"
    lines = [f"{s['mode']} run on {s['input']} with {s['model_id']} ({s['stopped']}): {s['rows']} row(s) in {s['log_dir']}",
             f"  good {s['good']}  bad {s['bad']}  errors {s['errors']}  bad rate {rate}  {ips}"
             f"  ({s['elapsed_s']:.1f} s, batch {s['batch_size']}, {s['workers']} decode {s['decode']})"]
    m = s["median_ms"]
    lines.append("  median ms per image: " + "  ".join(f"{k} {v:.1f}" for k, v in m.items() if v is not None))
    if s["rows_before"] or s["skipped_same_content"]:
        lines.append(f"  rows from earlier runs: {s['rows_before']} (not judged again); unchanged content skipped: "
                     f"{s['skipped_same_content']}")
    if s["review_queued"]:
        lines.append(f"  sent to the review queue: {s['review_queued']}")
    if s["slowest"]:
        slow = (f"{os.path.basename(r['file'])} {r['duration_ms']:.0f} ms" for r in s["slowest"][:3])
        lines.append("  slowest: " + ", ".join(slow))
    for r in s["error_rows"][:5]:
        lines.append(f"  error: {os.path.basename(r['file'])}: {r['error']}")
    if s["still_waiting"]:
        lines.append(f"  still being written at stop (judged next run): {len(s['still_waiting'])}")
    for msg in s["recovered"]["messages"]:
        lines.append(f"  recovered: {msg}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the HTML report

def _thumb(path: Path, side: int = 320) -> str | None:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((side, side * 2))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _counts_svg(rows: list[dict], width: int = 760, height: int = 180) -> str:
    """Stacked bars of good / bad / error rows per time bucket, as inline SVG."""
    times = []
    for r in rows:
        with contextlib.suppress(TypeError, ValueError):
            times.append((_dt.datetime.fromisoformat(r["time"]).timestamp(), r.get("verdict")))
    if not times:
        return "<p>No rows yet.</p>"
    t0, t1 = min(t for t, _ in times), max(t for t, _ in times)
    span = max(t1 - t0, 1.0)
    step = next((s for s in (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 4 * 3600, 86400) if span / s <= 60), 7 * 86400)
    nb = int(span // step) + 1
    bins = [{"good": 0, "bad": 0, "error": 0} for _ in range(nb)]
    for t, v in times:
        bins[min(nb - 1, int((t - t0) // step))][v if v in ("good", "bad") else "error"] += 1
    top = max(sum(b.values()) for b in bins) or 1
    pad, bw = 30, (width - 40) / nb
    colours = {"good": "#2a9d4a", "bad": "#d62828", "error": "#888"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" role="img" '
             f'aria-label="rows per {step} s">']
    for i, b in enumerate(bins):
        y = height
        for k in ("good", "bad", "error"):
            hgt = b[k] / top * (height - pad)
            if hgt > 0:
                start = _dt.datetime.fromtimestamp(t0 + i * step, _dt.timezone.utc).strftime("%H:%M:%S")
                parts.append(f'<rect x="{30 + i * bw:.1f}" y="{y - hgt:.1f}" width="{max(bw - 1, 1):.1f}" '
                             f'height="{hgt:.1f}" fill="{colours[k]}"><title>{start} {k}: {b[k]}</title></rect>')
                y -= hgt
    label = lambda t: _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    parts.append(f'<text x="30" y="{height + 16}" font-size="11">{label(t0)} UTC</text>')
    parts.append(f'<text x="{width - 10}" y="{height + 16}" font-size="11" text-anchor="end">{label(t1)} UTC</text>')
    parts.append(f'<text x="30" y="{height + 32}" font-size="11">one bar per {step} s; max {top} per bar; '
                 'green good, red bad, grey error</text>')
    parts.append(f'<text x="2" y="{pad - 4}" font-size="11">{top}</text></svg>')
    return "".join(parts)


def write_report(log_dir: str | os.PathLike, band: float = 0.1, max_images: int = 300) -> Path:
    """Write LOG_DIR/report.html: counts over time, the bad parts with their overlays (borderline first),
    borderline good parts, unreadable files and the slowest images.

    Thumbnails are embedded (the page opens offline, alone); each links to its full overlay in LOG_DIR.
    """
    root = Path(log_dir)
    if not (root / LOG_JSONL).is_file():
        raise DefectclsError(f"{root} has no {LOG_JSONL}: not an inspect log folder")
    rows, corrupt, tail = read_log(root)
    esc = html.escape
    judged = [r for r in rows if r.get("verdict") in ("good", "bad")]
    bad = [r for r in judged if r["verdict"] == "bad"]
    errors = [r for r in rows if r.get("verdict") not in ("good", "bad")]

    def margin(r: dict) -> float:
        return abs(float(r.get("prob_bad") or 0) - float(r.get("threshold") or 0))

    shown = sorted(bad, key=margin)
    border_good = sorted((r for r in judged if r["verdict"] == "good" and margin(r) <= band), key=margin)
    n_border = len(border_good) + sum(1 for r in bad if margin(r) <= band)
    models = sorted({r.get("model_id") or "?" for r in rows})
    times = sorted(r.get("time") or "" for r in rows)
    rate = f"{len(bad) / len(judged) * 100:.2f}%" if judged else "n/a"
    cards = []
    for r in shown[:max_images]:
        ov = r.get("overlay")
        src = _thumb(root / ov) if ov and (root / ov).resolve().is_relative_to(root.resolve()) else None
        img = (f'<a href="{esc(ov)}"><img src="{src}" alt="overlay of {esc(os.path.basename(r["file"]))}"></a>' if src
               else '<div class="noimg">no overlay</div>')
        tag = '<span class="tag">borderline</span>' if margin(r) <= band else ""
        cards.append(f'<figure class="{esc(r["verdict"])}">{img}<figcaption><b>#{esc(str(r.get("seq")))}</b> '
                     f'{esc(os.path.basename(r["file"]))} {tag}<br>{esc(r["verdict"].upper())} P(bad) '
                     f'{float(r["prob_bad"]):.4f} (threshold {float(r["threshold"]):.4f})<br>'
                     f'{esc(str(r.get("time") or ""))} · {float(r.get("duration_ms") or 0):.0f} ms<br>'
                     f'<small title="{esc(r["file"])}">sha256 {esc(str(r.get("sha256") or "")[:16])}…</small>'
                     + (f'<br><i>note: {esc(str(r["notes"]))}</i>' if r.get("notes") else "")
                     + '</figcaption></figure>')
    more = (f"<p>{len(shown) - max_images} more not shown; see log.csv.</p>" if len(shown) > max_images else "")
    good_rows = "".join(
        f"<tr><td>{esc(str(r.get('seq')))}</td><td>{esc(os.path.basename(r['file']))}</td><td>{float(r['prob_bad']):.4f}</td>"
        f"<td>{float(r['threshold']):.4f}</td><td>{esc(str(r.get('time')))}</td><td>"
        + (f'<a href="{esc(r["overlay"])}">overlay</a>' if r.get("overlay") else "") + "</td></tr>"
        for r in border_good[:max_images])
    err_rows = "".join(f"<tr><td>{esc(str(r.get('seq')))}</td><td>{esc(r['file'])}</td><td>{esc(str(r.get('error')))}</td>"
                       f"<td>{esc(str(r.get('time')))}</td></tr>" for r in errors[:500])
    noted = [r for r in judged if r.get("notes")]
    note_rows = "".join(f"<tr><td>{esc(str(r.get('seq')))}</td><td>{esc(os.path.basename(r['file']))}</td>"
                        f"<td>{esc(r['verdict'])}</td><td>{esc(str(r['notes']))}</td></tr>" for r in noted[:500])
    slow = sorted(judged, key=lambda r: -float(r.get("duration_ms") or 0))[:10]
    slow_rows = "".join(f"<tr><td>{esc(os.path.basename(r['file']))}</td><td>{float(r['duration_ms']):.1f}</td></tr>"
                        for r in slow)
    warn = ""
    if corrupt or tail:
        warn = (f'<p class="warn">log.jsonl has {corrupt} unreadable line(s){" and a torn last row" if tail else ""}; '
                "the next inspect run reports and repairs it.</p>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Inspection report: {esc(str(root.name))}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}}
.grid{{display:flex;flex-wrap:wrap;gap:12px}} figure{{margin:0;width:320px;border:3px solid #ccc;padding:4px}}
figure.bad{{border-color:#d62828}} figure.good{{border-color:#2a9d4a}} figure img{{width:100%}}
figcaption{{font-size:12px;word-break:break-all}} .tag{{background:#f4a261;padding:0 4px;border-radius:3px}}
.warn{{color:#b00}} .noimg{{height:60px;background:#eee;text-align:center;line-height:60px}}
</style></head><body>
<h1>Inspection report</h1>
<p>Log folder <code>{esc(str(root.resolve()))}</code>; model {esc(", ".join(models))}; {esc(times[0] if times else "")}
 to {esc(times[-1] if times else "")} (UTC).</p>
<table><tr><th>rows</th><th>good</th><th>bad</th><th>errors</th><th>bad rate</th><th>borderline (±{band:g})</th>
<th>with notes</th></tr>
<tr><td>{len(rows)}</td><td>{len(judged) - len(bad)}</td><td>{len(bad)}</td><td>{len(errors)}</td><td>{rate}</td>
<td>{n_border}</td><td>{len(noted)}</td></tr></table>{warn}
<h2>Counts over time</h2>{_counts_svg(rows)}
<h2>Bad parts ({len(shown)}), borderline first</h2>
<div class="grid">{"".join(cards) or "<p>None.</p>"}</div>{more}
<h2>Borderline good parts ({len(border_good)}): P(bad) within {band:g} of the threshold</h2>
<table><tr><th>#</th><th>file</th><th>P(bad)</th><th>threshold</th><th>time</th><th></th></tr>{good_rows}</table>
<h2>Photos with notes ({len(noted)}): verdicts less sure than their numbers
(a tilted camera, a photo out of focus, the camera moved closer or further)</h2>
<table><tr><th>#</th><th>file</th><th>verdict</th><th>note</th></tr>{note_rows}</table>
<h2>Unreadable files ({len(errors)})</h2>
<table><tr><th>#</th><th>file</th><th>reason</th><th>time</th></tr>{err_rows}</table>
<h2>Slowest images</h2><table><tr><th>file</th><th>ms</th></tr>{slow_rows}</table>
</body></html>
"""
    out = root / REPORT_FILE
    tmp = root / f".{REPORT_FILE}.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- entry point without the rest of the CLI

def main(argv: list[str] | None = None) -> int:
    """`python -m defectcls.inspect [report] ...`: the inspect command alone, for edge boxes without PyTorch.

    Same options as `defectcls inspect`; building the full command line imports modules that need torch.
    """
    import argparse

    from .cli import _add_inspect, run_parsed

    parser = argparse.ArgumentParser(prog="python -m defectcls.inspect")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_inspect(sub)
    sub.choices["inspect"].prog = parser.prog
    return run_parsed(parser.parse_args(["inspect", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
