"""Review queue: an append-only event log of model verdicts and QA decisions, and the labels export for retraining.

Layout under the queue's root (``DEFECTCLS_REVIEW_DIR``, default ``review_queue/``)::

    events.jsonl        one JSON object per line, appended under a file lock, fsynced per row
    events.jsonl.lock   the lock file (threads and processes)
    images/<sha256>.ext each inspected image, stored once, byte for byte
    hub/events-*.jsonl  per-process copy of this process's rows, pushed to a dataset repo (optional)

Nothing is rewritten: the state of an image (pending or reviewed, its label) is
derived from its events, and the latest decision wins. A row torn by a crash is
reported and skipped when the log is read, never silently dropped.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from filelock import FileLock, Timeout

from .data import MAX_BYTES
from .errors import DefectclsError, ImageLoadError

if TYPE_CHECKING:  # the queue itself never needs torch
    from .inference import Prediction

log = logging.getLogger("defectcls.review")

LOG_FILE = "events.jsonl"
IMAGES_DIR = "images"
HUB_DIR = "hub"
SCHEMA_VERSION = 1
DECISIONS = ("confirm", "good", "bad", "skip")
STATUSES = ("pending", "reviewed")
LABELS = ("good", "bad")
EXPORT_COLUMNS = ("path", "label", "sha256", "reviewer", "decided_at", "model_id", "p_bad", "predicted", "decision",
                  "note")
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
MAX_REVIEWER = 100
MAX_NOTE = 2000
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_EXTS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif", "WEBP": ".webp"}


def now_iso() -> str:
    """UTC timestamp with microseconds (sorts as text)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def neutralize_cell(value: object) -> str:
    """Make a CSV cell inert in spreadsheets: text starting with = + - @ (or tab/CR) gets a leading quote."""
    s = "" if value is None else str(value)
    return "'" + s if s.startswith(FORMULA_PREFIXES) else s


def _image_bytes(image: bytes | str | os.PathLike | np.ndarray) -> bytes:
    if isinstance(image, bytes | bytearray):
        data = bytes(image)
    elif isinstance(image, np.ndarray):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        data = buf.getvalue()
    else:
        try:
            if os.path.getsize(image) > MAX_BYTES:
                raise ImageLoadError(f"{os.fspath(image)}: file is larger than {MAX_BYTES // 10**6} MB")
            data = Path(image).read_bytes()
        except OSError as exc:
            raise ImageLoadError(f"{os.fspath(image)}: cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise ImageLoadError("image is empty")
    return data


def _image_ext(data: bytes) -> str:
    """File extension from the image's own header (the uploaded name is never trusted)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageLoadError("not a recognised image; nothing stored") from exc
    return _EXTS.get(fmt, ".img")


@dataclass
class _State:
    """Everything derived from the log; rebuilt incrementally as rows are appended."""

    items: dict[str, dict] = field(default_factory=dict)
    events: int = 0
    decisions: int = 0
    problems: list[str] = field(default_factory=list)
    offset: int = 0
    lines: int = 0
    inode: tuple[int, int] | None = None


class ReviewQueue:
    """Pending verdicts and reviewer decisions, stored as an append-only JSON-lines log.

    Safe for many threads and processes at once: every row is written whole under a
    file lock, flushed and fsynced before the call returns.
    """

    def __init__(self, root: str | os.PathLike | None = None, push_repo: str | None = None, hf_api=None,
                 push_every_minutes: float | None = None):
        if root is None:
            from .config import review_dir

            root = review_dir()
        self.root = Path(root).resolve()
        try:
            (self.root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DefectclsError(f"cannot create review folder {self.root}: {exc.strerror or exc}") from exc
        self.log_path = self.root / LOG_FILE
        self._flock = FileLock(str(self.log_path) + ".lock", timeout=60)
        self._tlock = threading.Lock()
        self._state = _State()
        self._tail_problem: str | None = None
        self._reported: set[str] = set()
        self._mirror: _HubMirror | None = None
        self.push_status = "off"
        repo = push_repo if push_repo is not None else os.environ.get("DEFECTCLS_REVIEW_REPO", "")
        if repo:
            every = push_every_minutes or float(os.environ.get("DEFECTCLS_REVIEW_PUSH_MINUTES", "5"))
            self._mirror, self.push_status = _HubMirror.start(self.root, repo, every, hf_api)
        with self._locked():
            self._refresh()

    # ------------------------------------------------------------ locking and reading

    @contextlib.contextmanager
    def _locked(self):
        """The in-process lock, then the cross-process file lock."""
        with self._tlock:
            try:
                self._flock.acquire()
            except Timeout as exc:
                raise DefectclsError(f"review log {self.log_path} is locked by another process; try again") from exc
            try:
                yield
            finally:
                self._flock.release()

    def _refresh(self) -> _State:
        """Read rows appended since the last read (call with the lock held)."""
        st = self._state
        try:
            fst = os.stat(self.log_path)
        except FileNotFoundError:
            self._state, self._tail_problem = _State(), None
            return self._state
        inode = (fst.st_dev, fst.st_ino)
        if st.inode != inode or fst.st_size < st.offset:
            st = self._state = _State(inode=inode)
        if fst.st_size == st.offset:
            return st
        with open(self.log_path, "rb") as fh:
            fh.seek(st.offset)
            chunk = fh.read(fst.st_size - st.offset)
        end = chunk.rfind(b"\n")
        complete, tail = (chunk[:end + 1], chunk[end + 1:]) if end >= 0 else (b"", chunk)
        for raw in complete.splitlines():
            st.lines += 1
            self._apply(st, raw)
        st.offset += len(complete)
        self._tail_problem = None
        if tail:
            self._tail_problem = (f"{self.log_path} line {st.lines + 1}: incomplete last row ({len(tail)} bytes, "
                                  "an interrupted write), skipped")
        for p in self.problems:
            if p not in self._reported:
                self._reported.add(p)
                log.warning("review log: %s", p)
        return st

    def _apply(self, st: _State, raw: bytes) -> None:
        if not raw.strip():
            return
        try:
            ev = json.loads(raw)
            kind, sha = ev["event"], ev["sha256"]
            if kind not in ("prediction", "decision") or not _SHA_RE.match(sha):
                raise ValueError(f"unknown event {kind!r}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            st.problems.append(f"{self.log_path} line {st.lines}: unreadable row skipped ({type(exc).__name__})")
            return
        st.events += 1
        it = st.items.get(sha)
        if kind == "prediction":
            if it is None:
                it = st.items[sha] = {"sha256": sha, "image": ev.get("image"), "first_seen": ev.get("timestamp"),
                                      "status": "pending", "label": None, "decision": None, "reviewer": None,
                                      "decided_at": None, "note": "", "skips": 0, "skipped": False,
                                      "n_predictions": 0, "source": ev.get("source")}
            it.update(model_id=ev.get("model_id"), predicted=ev.get("predicted"), p_bad=ev.get("p_bad"),
                      threshold=ev.get("threshold"), last_seen=ev.get("timestamp"),
                      photo_notes=[str(n) for n in ev.get("photo_notes") or []])
            it["n_predictions"] += 1
            it["skipped"] = False
            return
        if it is None:
            st.problems.append(f"{self.log_path} line {st.lines}: decision for an image never queued, skipped")
            return
        st.decisions += 1
        if ev.get("decision") == "skip":
            it["skips"] += 1
            it["skipped"] = True
            return
        it.update(status="reviewed", label=ev.get("label"), decision=ev.get("decision"), reviewer=ev.get("reviewer"),
                  decided_at=ev.get("timestamp"), note=ev.get("note", ""), decided_model_id=ev.get("model_id"),
                  decided_predicted=ev.get("predicted"), decided_p_bad=ev.get("p_bad"))

    @property
    def problems(self) -> list[str]:
        """Rows that could not be read (torn by a crash, or corrupt), one line each."""
        return list(self._state.problems) + ([self._tail_problem] if self._tail_problem else [])

    def _append(self, row: dict) -> None:
        """Write one row whole, flush and fsync (call with the lock held)."""
        line = (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        new = not self.log_path.exists()
        fd = os.open(self.log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if not new and not _ends_with_newline(fd):
                line = b"\n" + line  # close a torn row so it stays one (reported) unreadable line
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            _fsync_dir(self.root)
        if self._mirror is not None:
            self._mirror.append(line.lstrip(b"\n"))

    # ------------------------------------------------------------ writing

    def add_pending(self, image: bytes | str | os.PathLike | np.ndarray, prediction: Prediction,
                    source: str = "app") -> str:
        """Queue an inspected image with the model's verdict; returns its sha256.

        The image is stored once (by the sha256 of its bytes); the same image again
        is the same item, and a new prediction row is added only when the model or
        its verdict changed.
        """
        data = _image_bytes(image)
        sha = hashlib.sha256(data).hexdigest()
        ext = _image_ext(data)
        row = {"v": SCHEMA_VERSION, "event": "prediction", "timestamp": now_iso(), "sha256": sha,
               "image": f"{IMAGES_DIR}/{sha}{ext}", "model_id": prediction.model_id, "predicted": prediction.label,
               "p_bad": round(float(prediction.prob_bad), 6), "threshold": round(float(prediction.threshold), 6),
               "decision": None, "label": None, "reviewer": None, "note": "", "source": _clean(source, 200),
               "photo_notes": [_clean(n, 300) for n in getattr(prediction, "notes", [])]}
        with self._locked():
            st = self._refresh()
            it = st.items.get(sha)
            if it is not None:
                row["image"] = it["image"]
            self._store_image(self.root / row["image"], data)
            if it is not None and it["model_id"] == row["model_id"] and it["p_bad"] == row["p_bad"]:
                return sha
            self._append(row)
            self._refresh()
        return sha

    def _store_image(self, path: Path, data: bytes) -> None:
        if path.exists() and path.stat().st_size == len(data):
            return
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if self._mirror is not None:
            with self._mirror.scheduler.lock:
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)

    def submit(self, sha256: str, decision: str, reviewer: str, note: str = "") -> dict:
        """Record a reviewer's decision on a queued image; returns the event row written.

        confirm keeps the model's verdict, good/bad set the label, skip defers the
        item (it stays pending, behind the others).
        """
        sha = (sha256 or "").strip().lower()
        decision = (decision or "").strip().lower()
        if decision not in DECISIONS:
            raise DefectclsError(f"decision must be one of {', '.join(DECISIONS)}; got {decision!r}")
        who = _clean(reviewer, MAX_REVIEWER)
        if not who:
            raise DefectclsError("a reviewer name is required for every decision")
        if not _SHA_RE.match(sha):
            raise DefectclsError(f"image id must be a 64-digit hex sha256; got {sha256!r:.80}")
        note = _clean(note, MAX_NOTE)
        with self._locked():
            it = self._refresh().items.get(sha)
            if it is None:
                raise DefectclsError(f"image {sha[:12]}... is not in the review queue at {self.root}")
            label = it["predicted"] if decision == "confirm" else (None if decision == "skip" else decision)
            row = {"v": SCHEMA_VERSION, "event": "decision", "timestamp": now_iso(), "sha256": sha,
                   "image": it["image"], "model_id": it["model_id"], "predicted": it["predicted"], "p_bad": it["p_bad"],
                   "threshold": it["threshold"], "decision": decision, "label": label, "reviewer": who, "note": note}
            self._append(row)
            self._refresh()
        return row

    # ------------------------------------------------------------ reading

    def _snapshot(self) -> _State:
        with self._locked():
            st = self._refresh()
            return _State(items={k: dict(v) for k, v in st.items.items()}, events=st.events, decisions=st.decisions,
                          problems=self.problems)

    def items(self, status: str | None = None, predicted: str | None = None, model: str | None = None) -> list[dict]:
        """Queued images, filtered; pending ones borderline first (|p_bad - threshold| ascending, skipped last),
        then reviewed ones, latest decision first. ``model`` matches a model id or its name."""
        if status not in (None, *STATUSES):
            raise DefectclsError(f"status must be one of {', '.join(STATUSES)} (or none); got {status!r}")
        if predicted not in (None, *LABELS):
            raise DefectclsError(f"predicted must be good or bad (or none); got {predicted!r}")
        out = []
        for it in self._snapshot().items.values():
            if status and it["status"] != status:
                continue
            if predicted and it["predicted"] != predicted:
                continue
            if model and model not in (it["model_id"], str(it["model_id"]).split("@")[0]):
                continue
            it["margin"] = round(abs(float(it["p_bad"]) - float(it["threshold"])), 6)
            it["path"] = str(self.root / it["image"])
            out.append(it)
        pending = sorted((i for i in out if i["status"] == "pending"),
                         key=lambda i: (i["skipped"], i["margin"], i["first_seen"] or "", i["sha256"]))
        reviewed = sorted((i for i in out if i["status"] == "reviewed"), key=lambda i: i["decided_at"] or "",
                          reverse=True)
        return pending + reviewed

    def get(self, sha256: str) -> dict:
        """One queued image by sha256 (raises DefectclsError when unknown)."""
        sha = (sha256 or "").strip().lower()
        for it in self.items():
            if it["sha256"] == sha:
                return it
        raise DefectclsError(f"image {sha[:12]}... is not in the review queue at {self.root}")

    def models(self) -> list[str]:
        """Model ids seen in the queue (latest prediction per image)."""
        return sorted({str(i["model_id"]) for i in self._snapshot().items.values()})

    def stats(self) -> dict:
        """Counts and agreement: how often reviewers overturned the model, per predicted class."""
        st = self._snapshot()
        its = list(st.items.values())
        reviewed = [i for i in its if i["status"] == "reviewed"]
        agreement = {}
        for cls in ("overall", *LABELS):
            rows = [i for i in reviewed if cls == "overall" or i["decided_predicted"] == cls]
            over = sum(1 for i in rows if i["label"] != i["decided_predicted"])
            agreement[cls] = {"reviewed": len(rows), "agreed": len(rows) - over, "overturned": over,
                              "overturn_rate": round(over / len(rows), 4) if rows else None}
        by_reviewer: dict[str, int] = {}
        for i in reviewed:
            by_reviewer[i["reviewer"]] = by_reviewer.get(i["reviewer"], 0) + 1
        return {"total": len(its), "pending": len(its) - len(reviewed), "reviewed": len(reviewed),
                "skipped": sum(1 for i in its if i["status"] == "pending" and i["skipped"]),
                "events": st.events, "decisions": st.decisions, "agreement": agreement, "by_reviewer": by_reviewer,
                "unreadable_rows": len(st.problems), "problems": st.problems, "push": self.push_status,
                "log": str(self.log_path)}

    def export_labels(self, out_csv: str | os.PathLike) -> int:
        """Write the latest label per reviewed image (path,label first) for `defectcls train --extra-labels`;
        returns the number of rows. Free-text cells are neutralised for spreadsheets."""
        rows = sorted((i for i in self.items(status="reviewed")), key=lambda i: i["decided_at"] or "")
        out = Path(out_csv)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(EXPORT_COLUMNS)
                for i in rows:
                    w.writerow([i["path"], i["label"], i["sha256"]] + [neutralize_cell(v) for v in (
                        i["reviewer"], i["decided_at"], i["decided_model_id"], i["decided_p_bad"],
                        i["decided_predicted"], i["decision"], i["note"])])
            os.replace(tmp, out)
        except OSError as exc:
            raise DefectclsError(f"cannot write {out}: {exc.strerror or exc}") from exc
        return len(rows)

    def push_now(self, timeout: float = 60) -> None:
        """Push the per-process log copy to the dataset repo now (no-op when pushing is off)."""
        if self._mirror is not None:
            self._mirror.scheduler.trigger().result(timeout=timeout)

    def close(self) -> None:
        """Stop the background push (a last push runs at interpreter exit)."""
        if self._mirror is not None:
            self._mirror.scheduler.stop()


def _clean(text: object, limit: int) -> str:
    """One line of printable text, at most LIMIT characters."""
    s = "" if text is None else str(text)
    s = "".join(ch if ch.isprintable() else " " for ch in s).strip()
    return s[:limit]


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _HubMirror:
    """This process's rows copied to hub/events-<host>-<pid>-<id>.jsonl, pushed by huggingface_hub's
    CommitScheduler to a dataset repo (one file per process, so replicas never overwrite each other)."""

    def __init__(self, scheduler, path: Path):
        self.scheduler = scheduler
        self.path = path

    @classmethod
    def start(cls, root: Path, repo: str, every: float, hf_api=None) -> tuple[_HubMirror | None, str]:
        from huggingface_hub import CommitScheduler
        from huggingface_hub.constants import HF_HUB_OFFLINE

        if hf_api is None and HF_HUB_OFFLINE:
            log.warning("DEFECTCLS_REVIEW_REPO=%s ignored: HF_HUB_OFFLINE is set; the review log stays local", repo)
            return None, f"off (offline; {repo} not pushed)"
        try:
            scheduler = CommitScheduler(repo_id=repo, repo_type="dataset", folder_path=root, every=every,
                                        allow_patterns=[f"{HUB_DIR}/*.jsonl", f"{IMAGES_DIR}/*"], private=True,
                                        hf_api=hf_api)
        except Exception as exc:  # network, auth, bad repo id: the app keeps working locally
            log.warning("review log push to %s disabled: %s", repo, exc)
            return None, f"failed ({type(exc).__name__}: {str(exc)[:200]}); the review log stays local"
        name = f"events-{_clean(socket.gethostname(), 40) or 'host'}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        (root / HUB_DIR).mkdir(exist_ok=True)
        return cls(scheduler, root / HUB_DIR / name), f"on ({repo}, every {every:g} min)"

    def append(self, line: bytes) -> None:
        with self.scheduler.lock, open(self.path, "ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
