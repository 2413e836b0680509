"""Factory mode: batch and watch inspection, crash recovery of the log, odd file names, the HTML report."""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectcls import inspect as I
from defectcls.cli import main
from defectcls.errors import DefectclsError

from .badfiles import invalid_files, valid_files

ODD_NAMES = ["with space.png", "quote'single.png", 'quote"double.png', "dollar$HOME.png", "semi;colon.png",
             "a..\\..\\back\\slash.png", "-leading-dash.png", "=formula.png", "new\nline.png", "$(touch pwned).png",
             "<img src=x onerror=alert(1)>.png", "ünïcødé.png"]


@pytest.fixture(scope="module", autouse=True)
def one_model_thread():
    """Factory runs use one model thread here (two spin-wait on a busy 2-core CPU); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tiny_model, tiny_data, tmp_path_factory) -> Path:
    """tiny_model with its threshold at the median P(bad) of the test images, so both verdicts occur."""
    from defectcls.inference import Predictor

    out = tmp_path_factory.mktemp("inspect_model") / "m"
    shutil.copytree(tiny_model, out)
    pred = Predictor(out, backend="torch", threads=1)
    probs = sorted(pred.probs(np.stack([pred.preprocess(f) for f in _images(tiny_data)])).tolist())
    card = json.loads((out / "card.json").read_text())
    card["threshold"] = (probs[len(probs) // 2 - 1] + probs[len(probs) // 2]) / 2
    (out / "card.json").write_text(json.dumps(card))
    return out


@pytest.fixture(scope="module")
def pred(model):
    """One loaded predictor for the in-process runs (loading a model per run costs seconds on a busy CPU)."""
    from defectcls.inference import Predictor

    return Predictor(model, backend="torch", threads=1)


def _images(tiny_data: Path, n_good: int = 6, n_bad: int = 6) -> list[Path]:
    return sorted((tiny_data / "good").glob("*.png"))[:n_good] + sorted((tiny_data / "bad").glob("*.png"))[:n_bad]


def _rows(log: Path) -> list[dict]:
    lines = (log / I.LOG_JSONL).read_bytes().splitlines()
    return [json.loads(line) for line in lines]


def _csv_rows(log: Path) -> list[dict]:
    with open(log / I.LOG_CSV, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _run(pred, inp, log, **kw) -> dict:
    return I.inspect_folder(None, str(inp), log, progress=False, predictor=pred, **kw)


def test_batch_judges_every_file_once_logs_errors_and_writes_nothing_else(pred, model, tiny_data, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for f in _images(tiny_data):
        shutil.copy(f, inp / f.name)
    first = _images(tiny_data)[0].read_bytes()
    for name in ODD_NAMES:
        (inp / name).write_bytes(first)
    for name, data in {**valid_files(), **invalid_files()}.items():
        (inp / name).write_bytes(data)
    (inp / "notes.txt").write_text("not an image: ignored, and counted")
    (inp / ".hidden.png").write_bytes(first)                      # temporary files of copy tools: ignored
    os.mkfifo(inp / "pipe.png")                                    # would block a reader: refused, not opened
    with open(inp / "huge.png", "wb") as fh:                       # sparse 60 MB: refused before reading
        fh.truncate(60_000_000)
    before = _snapshot(inp)
    log = tmp_path / "log"

    s = _run(pred, inp, log, settle_s=0.5)

    rows = _rows(log)
    per_file = Counter(r["file"] for r in rows)
    expected = {str(p.absolute()) for p in inp.iterdir() if p.name not in ("notes.txt", ".hidden.png")}
    assert set(per_file) == expected and set(per_file.values()) == {1}
    refused = {**invalid_files(), "pipe.png": "not a regular file", "huge.png": "60 MB, more than"}
    for r in rows:
        name = os.path.basename(r["file"])
        if name in ("pipe.png", "huge.png"):
            assert r["verdict"] == "error" and refused[name] in r["error"]
        elif name in refused:
            assert r["verdict"] == "error" and r["error"] and "\n" not in r["error"] and r["prob_bad"] is None
        else:
            assert r["verdict"] in ("good", "bad") and 0 <= r["prob_bad"] <= 1 and r["error"] is None, r
            assert r["sha256"] == hashlib.sha256((inp / name).read_bytes()).hexdigest()
    assert len(rows) == len(ODD_NAMES) + len(valid_files()) + len(refused) + 12
    verdicts = Counter(r["verdict"] for r in rows)
    assert verdicts["good"] and verdicts["bad"] and verdicts["error"] == len(refused)
    assert (s["good"], s["bad"], s["errors"], s["ignored_other_files"]) == (verdicts["good"], verdicts["bad"],
                                                                             verdicts["error"], 2)
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))

    # overlays: every bad part has one (a readable image in LOG/overlays), good parts none
    for r in rows:
        if r["verdict"] == "bad":
            path = (log / r["overlay"]).resolve()
            assert path.parent == (log / "overlays").resolve()
            with Image.open(path) as im:
                assert im.format == "JPEG" and im.width == I.OVERLAY_SIDE
        else:
            assert r["overlay"] is None

    # the CSV holds the same rows, one line each (even the name with a newline), formulas neutralised
    crows = _csv_rows(log)
    assert [c["seq"] for c in crows] == [str(r["seq"]) for r in rows]
    assert len((log / I.LOG_CSV).read_bytes().splitlines()) == len(rows) + 1
    assert all(not c["error"].startswith(("=", "+", "-", "@")) for c in crows)

    # nothing written outside the log folder; the log folder holds only the log
    assert _snapshot(inp) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "log"]
    assert {p.name for p in log.iterdir()} <= {"log.csv", "log.jsonl", "runs.jsonl", "overlays", ".inspect.lock"}

    # a second run judges nothing again
    again = _run(pred, inp, log, settle_s=0.5)
    assert again["rows"] == 0 and again["rows_before"] == len(rows)
    assert len(_rows(log)) == len(rows)

    # the report: self-contained, bad parts shown with embedded thumbnails, names escaped
    page = I.write_report(log).read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") == verdicts["bad"]
    for r in rows:
        if r["verdict"] == "bad":
            assert html.escape(os.path.basename(r["file"])) in page
    assert "<img src=x onerror" not in page and "<svg" in page and f"Unreadable files ({verdicts['error']})" in page


def test_watch_judges_files_once_complete_and_never_early(pred, model, tiny_data, tmp_path, monkeypatch):
    inp, log = tmp_path / "in", tmp_path / "log"
    inp.mkdir()
    srcs = _images(tiny_data, 3, 3)
    seen_sizes: list[tuple[str, int]] = []
    real_decode = I._decode

    def spy(item, predictor, keep, fast_png=False):
        out = real_decode(item, predictor, keep, fast_png)
        seen_sizes.append((os.path.basename(item.path), out.size))
        return out

    monkeypatch.setattr(I, "_decode", spy)
    stop, rows, result = threading.Event(), [], {}
    # decode threads: the spy must run in this process (the CLI test below watches with decode processes)
    th = threading.Thread(target=lambda: result.update(_run(pred, inp, log, watch=True, poll_s=0.05, settle_s=3.0,
                                                            stop_event=stop, on_row=rows.append, decode="threads")))
    th.start()
    try:
        slow = srcs[:3]
        for src in slow:                      # written in 3 chunks with pauses much longer than the poll interval
            data = src.read_bytes()
            with open(inp / f"slow_{src.name}", "wb") as fh:
                for k in range(3):
                    fh.write(data[k * len(data) // 3:(k + 1) * len(data) // 3])
                    fh.flush()
                    time.sleep(0.3)
        for src in srcs[3:]:
            shutil.copy(src, inp / src.name)
        (inp / "corrupt.png").write_bytes(invalid_files()["truncated.png"])
        deadline = time.monotonic() + 60
        while len(rows) < len(srcs) + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)                        # nothing more may arrive
    finally:
        stop.set()
        th.join(60)
    assert not th.is_alive() and result["stopped"] == "stop requested"
    per_file = Counter(os.path.basename(r["file"]) for r in _rows(log))
    assert per_file == Counter([f"slow_{s.name}" for s in slow] + [s.name for s in srcs[3:]] + ["corrupt.png"])
    for r in _rows(log):
        name = os.path.basename(r["file"])
        if name == "corrupt.png":
            assert r["verdict"] == "error" and "truncated" in r["error"]
        else:
            full = (inp / name).read_bytes()
            assert r["verdict"] in ("good", "bad") and r["size"] == len(full)
            assert r["sha256"] == hashlib.sha256(full).hexdigest()
    partial = [(n, size) for n, size in seen_sizes if n.startswith("slow_") and size < (inp / n).stat().st_size]
    assert partial, "the half-written files were never looked at, so this test proved nothing"


def test_restart_resumes_without_duplicates(pred, model, tiny_data, tmp_path):
    inp, log = tmp_path / "in", tmp_path / "log"
    inp.mkdir()
    srcs = _images(tiny_data, 3, 3)
    for src in srcs[:3]:
        shutil.copy(src, inp / src.name)
    assert _run(pred, inp, log)["rows"] == 3
    for src in srcs[3:]:
        shutil.copy(src, inp / src.name)
    os.utime(inp / srcs[0].name, (time.time() + 5, time.time() + 5))   # touched, same bytes: not judged again
    s = _run(pred, inp, log)
    assert (s["rows"], s["rows_before"], s["skipped_same_content"]) == (3, 3, 1)
    (inp / srcs[1].name).write_bytes(srcs[4].read_bytes())           # new content under an old name: judged
    assert _run(pred, inp, log)["rows"] == 1
    assert Counter(r["file"] for r in _rows(log)).most_common(1)[0][1] == 2     # that one name, twice
    assert len(_rows(log)) == 7 and len(_csv_rows(log)) == 7


def test_torn_last_row_is_cut_kept_reported_and_the_file_judged_again(pred, model, tiny_data, tmp_path, capsys):
    inp, log = tmp_path / "in", tmp_path / "log"
    inp.mkdir()
    for src in _images(tiny_data, 2, 2):
        shutil.copy(src, inp / src.name)
    _run(pred, inp, log)
    data = (log / I.LOG_JSONL).read_bytes()
    body, last = data[:-1].rsplit(b"\n", 1)
    (log / I.LOG_JSONL).write_bytes(body + b"\n" + last[: len(last) // 2])   # the last row, torn mid-write
    csv_bytes = (log / I.LOG_CSV).read_bytes()
    (log / I.LOG_CSV).write_bytes(csv_bytes[:-10])
    torn_file = json.loads(last)["file"]

    s = _run(pred, inp, log)

    rec = s["recovered"]
    assert rec["torn_rows"] == 1 and rec["csv_rebuilt"] and any("torn row" in m for m in rec["messages"])
    assert "torn row" in capsys.readouterr().err
    kept = (log / I.TORN_FILE).read_text().splitlines()
    assert len(kept) == 1 and json.loads(kept[0].split("\t")[2]) == last[: len(last) // 2].decode()
    assert s["rows"] == 1 and s["rows_before"] == 3
    rows = _rows(log)
    assert Counter(r["file"] for r in rows) == Counter(str(p.absolute()) for p in inp.iterdir())
    assert rows[-1]["file"] == torn_file
    assert [c["seq"] for c in _csv_rows(log)] == [str(r["seq"]) for r in rows]


def _wait_rows(log: Path, n: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = log / I.LOG_JSONL
        if path.is_file() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"inspect exited early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"fewer than {n} rows after {timeout} s")


def test_cli_sigterm_stops_cleanly_sigkill_loses_nothing_and_is_reported(model, tiny_data, tmp_path, capsys):
    inp, log = tmp_path / "in", tmp_path / "log"
    inp.mkdir()
    srcs = _images(tiny_data)
    for src in srcs[:3]:
        shutil.copy(src, inp / f"a_{src.name}")
    args = ["inspect", "--model", str(model), "--input", str(inp), "--log-dir", str(log), "--poll", "0.05",
            "--batch-size", "2", "--json"]

    def terminate_after_3_rows():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not ((log / I.LOG_JSONL).is_file()
                                                   and (log / I.LOG_JSONL).read_bytes().count(b"\n") >= 3):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_after_3_rows)
    killer.start()
    rc = main(args + ["--watch"])                          # SIGTERM: a clean stop with the summary
    killer.join()
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["stopped"] == "stop requested"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    for i in range(4):
        for src in srcs:
            shutil.copy(src, inp / f"b{i}_{src.name}")
    proc = subprocess.Popen([sys.executable, "-m", "defectcls", *args, "--watch"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    _wait_rows(log, 5, proc)
    proc.kill()                                             # SIGKILL mid-run
    proc.communicate(timeout=60)
    rows, corrupt, tail = I.read_log(log)
    assert corrupt == 0 and len(rows) >= 5                 # readable: every complete line parses
    # One write() per row means a SIGKILL cannot tear a row; a full disk or power loss can. Make the tail torn:
    with open(log / I.LOG_JSONL, "ab") as fh:
        fh.write(b'{"seq": 999, "file": "/lost/in/the/cra')

    assert main(args) == 0
    cap = capsys.readouterr()
    s = json.loads(cap.out)
    assert s["recovered"]["torn_rows"] == 1 and s["recovered"]["unclean_previous_run"]
    assert "torn row" in cap.err and "without a clean stop" in cap.err
    final = _rows(log)
    assert Counter(r["file"] for r in final) == Counter(str(p.absolute()) for p in inp.iterdir())
    assert len(_csv_rows(log)) == len(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "log"]      # cwd untouched


def test_to_review_sends_borderline_parts_to_the_review_queue(pred, model, tiny_data, tmp_path, monkeypatch):
    from defectcls.review import ReviewQueue

    monkeypatch.setenv("DEFECTCLS_REVIEW_DIR", str(tmp_path / "review"))
    inp, log = tmp_path / "in", tmp_path / "log"
    inp.mkdir()
    for src in _images(tiny_data, 3, 3):
        shutil.copy(src, inp / src.name)
    s = _run(pred, inp, log, to_review=True, review_band=1.0)
    rows = _rows(log)
    assert s["review_queued"] == 6 and all(r["review"] == "queued" for r in rows)
    items = ReviewQueue(tmp_path / "review").items()
    assert {i["sha256"] for i in items} == {r["sha256"] for r in rows}
    assert {i["predicted"] for i in items} == {r["verdict"] for r in rows}

    none = _run(pred, inp, tmp_path / "log2", to_review=True, review_band=0.0)
    assert none["review_queued"] <= 1


def test_cli_errors_glob_input_png_overlays_report_and_the_lock(pred, model, tiny_data, tmp_path, capsys):
    log = tmp_path / "log"
    assert main(["inspect", "--log-dir", str(log)]) == 2
    assert "--input is required" in capsys.readouterr().err
    assert main(["inspect", "--model", str(model), "--input", str(tmp_path / "nothing"), "--log-dir", str(log)]) == 2
    assert "neither a folder nor a glob" in capsys.readouterr().err
    assert main(["inspect", "report", "--log-dir", str(tmp_path / "nolog")]) == 2
    capsys.readouterr()

    pattern = str(tiny_data / "bad" / "bad_0000*.png")
    assert main(["inspect", "--model", str(model), "--input", pattern, "--log-dir", str(log), "--png", "--save-good",
                 "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["rows"] == len(list((tiny_data / "bad").glob("bad_0000*.png"))) and s["errors"] == 0
    assert all(r["overlay"].endswith(".png") and (log / r["overlay"]).is_file() for r in _rows(log))
    assert main(["inspect", "report", "--log-dir", str(log), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(log / I.REPORT_FILE)

    from filelock import FileLock

    with FileLock(str(log / I.LOCK_FILE)), pytest.raises(DefectclsError, match="another inspect run"):
        _run(pred, tiny_data / "good", log)


def test_edge_route_onnx_file_alone_without_torch(pred, model, tiny_data, tmp_path):
    from defectcls.export import export_onnx

    onnx = export_onnx(model, out=tmp_path / "export", n_check=4)["files"]["fp32"]["path"]
    inp, log = tmp_path / "in", tmp_path / "log"
    inp.mkdir()
    srcs = _images(tiny_data, 2, 2)
    for src in srcs:
        shutil.copy(src, inp / src.name)
    (inp / "corrupt.png").write_bytes(invalid_files()["truncated.png"])
    no_torch = ("import sys; sys.modules['torch'] = sys.modules['torchvision'] = None; "
                "from defectcls.inspect import main; sys.exit(main(sys.argv[1:]))")   # = python -m defectcls.inspect
    r = subprocess.run([sys.executable, "-c", no_torch, "--model", onnx, "--input", str(inp), "--log-dir",
                        str(log), "--save-good", "--json"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["rows"], s["errors"]) == (5, 1)
    rows = {os.path.basename(r["file"]): r for r in _rows(log)}
    expected = pred.probs(np.stack([pred.preprocess(src) for src in srcs]))
    for src, p in zip(srcs, expected, strict=True):
        row = rows[src.name]
        assert abs(row["prob_bad"] - p) < 1e-4 and (log / row["overlay"]).is_file()


def test_decode_processes_judge_and_refuse_exactly_as_threads(pred, tiny_data, tmp_path):
    """Process decoding (libspng where installed) gives the same rows as thread decoding (Pillow)."""
    inp = tmp_path / "in"
    inp.mkdir()
    for f in _images(tiny_data, 3, 3):
        shutil.copy(f, inp / f.name)
    for name, data in invalid_files().items():
        (inp / name).write_bytes(data)
    got = {}
    for mode in ("threads", "processes"):
        s = _run(pred, inp, tmp_path / mode, settle_s=0.5, decode=mode, workers=2)
        assert s["decode"] == mode and s["workers"] == 2
        got[mode] = {r["file"]: r for r in _rows(tmp_path / mode)}
    assert set(got["threads"]) == set(got["processes"]) and len(got["threads"]) == 6 + len(invalid_files())
    for f, a in got["threads"].items():
        b = got["processes"][f]
        assert (a["verdict"], a["error"], a["sha256"]) == (b["verdict"], b["error"], b["sha256"]), f
        if a["prob_bad"] is not None:
            assert abs(a["prob_bad"] - b["prob_bad"]) < 1e-5
    assert sum(r["verdict"] == "error" for r in got["processes"].values()) == len(invalid_files())


def test_decode_mode_choice(pred, monkeypatch):
    from defectcls import data as D

    prep = I._prep_of(pred)
    assert prep == I._Prep(pred.card.color, pred.card.img_size, tuple(pred.card.mean), tuple(pred.card.std),
                           background=tuple(pred.card.background),   # decode processes mend fills as the card says
                           focus_below=pred.card.focus_below)        # and sharpen soft photos back as it says
    assert prep.focus_below and prep.photo_range == pred.card.photo_range
    assert I._prep_of(object()) is None                    # a predictor with its own preprocessing
    assert I._choose_decode("threads", prep) == "threads"
    monkeypatch.setattr(D, "_spng", None)                  # no libspng: processes would buy nothing
    assert I._choose_decode("auto", prep) == "threads"
    with pytest.raises(DefectclsError, match="decode processes need"):
        I._choose_decode("processes", None)
    with pytest.raises(DefectclsError, match="decode must be one of"):
        I._choose_decode("fast", prep)


def test_a_decode_pool_that_cannot_start_falls_back_or_says_why(pred, tiny_data, tmp_path, monkeypatch, capsys):
    """Spawn fails e.g. for a main script it cannot import again: auto decodes in threads, processes says why."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from defectcls import data as D

    class Broken:
        def __init__(self, *a, **k):
            pass

        def submit(self, *a, **k):
            f = Future()
            f.set_exception(BrokenProcessPool("a process in the pool was terminated abruptly"))
            return f

        def shutdown(self, *a, **k):
            pass

    monkeypatch.setattr(I, "ProcessPoolExecutor", Broken)
    monkeypatch.setattr(D, "_spng", D._spng or object())         # auto would pick processes
    inp = tmp_path / "in"
    inp.mkdir()
    for f in _images(tiny_data, 2, 2):
        shutil.copy(f, inp / f.name)
    s = _run(pred, inp, tmp_path / "log", decode="auto")
    assert s["decode"] == "threads" and s["judged"] == 4
    assert "decode processes could not start" in capsys.readouterr().err
    with pytest.raises(DefectclsError, match='if __name__ == "__main__"'):
        _run(pred, inp, tmp_path / "log2", decode="processes")


def test_caption_from_cached_glyphs_matches_pillow_text():
    """The overlay caption is drawn from cached glyph masks; it must look as ImageDraw.text draws it."""
    from PIL import ImageDraw

    font = I._font(14)
    text = "#0000123  bad_00012.png  BAD  P(bad) 0.9934  threshold 0.2215  Wg|"
    ours = Image.new("RGB", (640, 40), (16, 16, 16))
    I._draw_text(ours, (7, 10), text, (220, 40, 40), font)
    ref = Image.new("RGB", (640, 40), (16, 16, 16))
    ImageDraw.Draw(ref).text((7, 10), text, fill=(220, 40, 40), font=font)
    a, b = np.asarray(ours, np.int16), np.asarray(ref, np.int16)
    assert (b != 16).any(axis=2).sum() > 300          # the reference drew a visible line of text
    assert np.abs(a - b).max() <= 2                    # same pixels (kerning-free font: within rounding)


def test_an_oval_part_gets_a_note_in_the_row_the_overlay_and_the_report(pred, model, tiny_data, tmp_path):
    from defectcls import data as D
    from defectcls import perturb as P

    inp, log = tmp_path / "in", tmp_path / "log"
    inp.mkdir()
    good = _images(tiny_data, 1, 0)[0]
    shutil.copy(good, inp / "straight.png")
    Image.fromarray(P.affine(D.load_image(good), squash=0.6, squash_angle=30)).save(inp / "tilted.png")
    Image.fromarray(P.blur(D.load_image(good), 3.0)).save(inp / "soft.png")     # softer than the training photos
    _run(pred, inp, log, save_good=True)
    rows = {os.path.basename(r["file"]): r for r in _rows(log)}
    assert rows["straight.png"]["notes"] is None and "oval" in rows["tilted.png"]["notes"]
    assert rows["tilted.png"]["verdict"] == "bad" and "judged bad until a person looks" in rows["tilted.png"]["notes"]
    assert rows["soft.png"]["notes"].startswith("the photo looks softer than in training")
    crows = {os.path.basename(c["file"]): c for c in _csv_rows(log)}
    assert crows["straight.png"]["notes"] == "" and crows["tilted.png"]["notes"] == rows["tilted.png"]["notes"]
    with Image.open(log / rows["tilted.png"]["overlay"]) as a, Image.open(log / rows["straight.png"]["overlay"]) as b:
        assert a.height > b.height                     # one caption line more: the note
    page = I.write_report(log).read_text(encoding="utf-8")
    assert "Photos with notes (2)" in page and html.escape(rows["tilted.png"]["notes"]) in page


def test_a_log_csv_with_older_columns_is_rebuilt_from_the_jsonl_and_kept(pred, model, tiny_data, tmp_path):
    inp, log = tmp_path / "in", tmp_path / "log"
    inp.mkdir()
    for src in _images(tiny_data, 2, 1):
        shutil.copy(src, inp / src.name)
    assert _run(pred, inp, log)["rows"] == 3
    old_fields = [f for f in I.FIELDS if f != "notes"]          # a log written before the notes column
    with open(log / I.LOG_CSV, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(old_fields)
        w.writerows([[r[f] for f in old_fields] for r in _rows(log)])
    old = (log / I.LOG_CSV).read_bytes()
    shutil.copy(_images(tiny_data, 3, 0)[2], inp / "new.png")
    s = _run(pred, inp, log)
    assert s["rows"] == 1 and any("columns were not" in m for m in s["recovered"]["messages"])
    crows = _csv_rows(log)
    assert list(crows[0]) == list(I.FIELDS) and [c["seq"] for c in crows] == ["1", "2", "3", "4"]
    assert [p.read_bytes() for p in log.glob("log.csv.*.bak")] == [old]
