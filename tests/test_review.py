"""Review queue: ordering, filters, log semantics, crash and concurrency safety, export and the retraining loop."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectcls.data import read_label_csv
from defectcls.errors import DefectclsError, ImageLoadError
from defectcls.inference import Prediction
from defectcls.review import LOG_FILE, ReviewQueue, neutralize_cell

REPO = Path(__file__).resolve().parents[1]


def png(seed: int, size: int = 32) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def pred(p: float, thr: float = 0.5, model: str = "m@000000000001") -> Prediction:
    return Prediction(label="bad" if p >= thr else "good", prob_bad=p, threshold=thr, model_id=model)


def log_rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / LOG_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture()
def q(tmp_path) -> ReviewQueue:
    return ReviewQueue(tmp_path / "rq", push_repo="")


def test_pending_ordered_borderline_first_with_filters(q):
    ps = [0.95, 0.52, 0.10, 0.45, 0.70, 0.49]
    shas = [q.add_pending(png(i), pred(p)) for i, p in enumerate(ps)]
    q.add_pending(png(99), pred(0.51, model="other@00000000000a"))
    pend = q.items(status="pending")
    margins = [i["margin"] for i in pend]
    assert margins == sorted(margins) and pend[0]["p_bad"] == 0.49 and pend[-1]["p_bad"] == 0.95
    assert {i["predicted"] for i in q.items(predicted="bad")} == {"bad"}
    assert len(q.items(predicted="good")) == 3
    assert [i["sha256"] for i in q.items(model="other")] == [q.items(model="other@00000000000a")[0]["sha256"]]
    assert len(q.items(model="m")) == 6
    # a skipped item stays pending but goes behind the others; a reviewed one leaves the pending view
    q.submit(shas[5], "skip", "ann")
    q.submit(shas[1], "confirm", "ann")
    pend = q.items(status="pending")
    assert pend[-1]["sha256"] == shas[5] and pend[-1]["skipped"]
    assert shas[1] not in [i["sha256"] for i in pend]
    assert [i["sha256"] for i in q.items(status="reviewed")] == [shas[1]]
    with pytest.raises(DefectclsError, match="status"):
        q.items(status="done")
    with pytest.raises(DefectclsError, match="predicted"):
        q.items(predicted="ugly")


def test_same_image_is_one_item_and_images_stored_once(q):
    a = q.add_pending(png(1), pred(0.3))
    b = q.add_pending(png(1), pred(0.3))          # same bytes, same verdict: no new row
    c = q.add_pending(png(1), pred(0.8, model="new@00000000000b"))  # new model: new prediction row
    assert a == b == c
    items = q.items()
    assert len(items) == 1 and items[0]["model_id"] == "new@00000000000b" and items[0]["n_predictions"] == 2
    assert len(log_rows(q.root)) == 2
    assert len(list((q.root / "images").iterdir())) == 1
    stored = Path(items[0]["path"])
    assert stored.read_bytes() == png(1) and stored.name == f"{a}.png"
    with pytest.raises(ImageLoadError):
        q.add_pending(b"<html>not an image</html>", pred(0.3))
    assert len(q.items()) == 1


def test_latest_decision_wins_and_nothing_is_rewritten(q):
    sha = q.add_pending(png(2), pred(0.7))
    q.submit(sha, "bad", "ann", "scratch")
    before = (q.root / LOG_FILE).read_bytes()
    ev = q.submit(sha, "good", "bob", "it is dust")
    after = (q.root / LOG_FILE).read_bytes()
    assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 1
    it = q.items()[0]
    assert it["status"] == "reviewed" and it["label"] == "good" and it["reviewer"] == "bob"
    assert ev["decision"] == "good" and ev["label"] == "good" and ev["predicted"] == "bad"
    for key in ("timestamp", "reviewer", "sha256", "image", "model_id", "predicted", "p_bad", "threshold", "decision",
                "label", "note"):
        assert key in ev
    st = q.stats()
    assert st["reviewed"] == 1 and st["decisions"] == 2
    assert st["agreement"]["bad"] == {"reviewed": 1, "agreed": 0, "overturned": 1, "overturn_rate": 1.0}
    assert st["agreement"]["good"]["reviewed"] == 0
    # confirm takes the model's verdict; a later skip does not erase a label
    q.submit(sha, "confirm", "cy")
    q.submit(sha, "skip", "cy")
    it = q.items()[0]
    assert it["label"] == "bad" and it["status"] == "reviewed"
    # a fresh queue object (another process, a restart) sees the same state
    again = ReviewQueue(q.root, push_repo="").items()[0]
    assert (again["label"], again["reviewer"]) == ("bad", "cy")


def test_submit_refuses_bad_requests(q):
    sha = q.add_pending(png(3), pred(0.4))
    with pytest.raises(DefectclsError, match="reviewer"):
        q.submit(sha, "good", "  ")
    with pytest.raises(DefectclsError, match="decision"):
        q.submit(sha, "maybe", "ann")
    with pytest.raises(DefectclsError, match="not in the review queue"):
        q.submit("a" * 64, "good", "ann")
    with pytest.raises(DefectclsError, match="sha256"):
        q.submit("../../etc/passwd", "good", "ann")
    assert q.stats()["decisions"] == 0
    ev = q.submit(sha, "GOOD", "ann\nevil", "x" * 5000)
    assert ev["reviewer"] == "ann evil" and len(ev["note"]) == 2000


def test_torn_last_row_is_reported_skipped_and_repaired(q, caplog):
    shas = [q.add_pending(png(i), pred(0.2 + i / 10)) for i in range(3)]
    q.submit(shas[0], "bad", "ann")
    with open(q.root / LOG_FILE, "ab") as fh:           # a writer killed mid-row
        fh.write(b'{"v":1,"event":"decision","timestamp":"2030-01-01T00:00:00+00:00","sha256":"' + shas[1].encode()[:20])
    r = ReviewQueue(q.root, push_repo="")
    assert len(r.problems) == 1 and "incomplete last row" in r.problems[0]
    assert "incomplete last row" in caplog.text
    assert r.stats()["reviewed"] == 1 and len(r.items()) == 3
    r.submit(shas[2], "good", "bob")                   # the next write starts on a fresh line
    r2 = ReviewQueue(q.root, push_repo="")
    assert len(r2.problems) == 1 and "unreadable row" in r2.problems[0]
    st = r2.stats()
    assert st["reviewed"] == 2 and st["unreadable_rows"] == 1
    assert {i["sha256"]: i["label"] for i in r2.items(status="reviewed")} == {shas[0]: "bad", shas[2]: "good"}


_WRITER = r"""
import sys
from defectcls.review import ReviewQueue
root, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
q = ReviewQueue(root, push_repo="")
sha = sys.argv[4]
for j in range(n):
    q.submit(sha, ("good", "bad", "confirm")[j % 3], f"reviewer-{tag}", f"{tag}-{j}")
    print(f"{tag}-{j}", flush=True)
"""


def _seed_item(root: Path) -> str:
    return ReviewQueue(root, push_repo="").add_pending(png(7), pred(0.5))


def test_eight_threads_fifty_decisions_each_lose_nothing(tmp_path):
    root = tmp_path / "rq"
    sha = _seed_item(root)
    queues = [ReviewQueue(root, push_repo="") for _ in range(2)]   # two objects on one folder, as two workers
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for j in range(50):
                queues[t % 2].submit(sha, ("good", "bad", "skip", "confirm")[j % 4], f"r{t}", f"t{t}-{j}")
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    rows = log_rows(root)                      # every line parses: no interleaving
    notes = [r["note"] for r in rows if r["event"] == "decision"]
    assert len(notes) == 400 and set(notes) == {f"t{t}-{j}" for t in range(8) for j in range(50)}
    for t in range(8):                         # each writer's rows stay in its own order
        mine = [int(n.split("-")[1]) for n in notes if n.startswith(f"t{t}-")]
        assert mine == sorted(mine)
    st = ReviewQueue(root, push_repo="").stats()
    assert st["decisions"] == 400 and st["unreadable_rows"] == 0 and st["total"] == 1


def test_separate_processes_lose_nothing(tmp_path):
    root = tmp_path / "rq"
    sha = _seed_item(root)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(root), f"p{k}", "40", sha], stdout=subprocess.PIPE,
                              text=True) for k in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    acked = {line for o in outs for line in o.split()}
    rows = log_rows(root)
    notes = [r["note"] for r in rows if r["event"] == "decision"]
    assert len(acked) == 160 and sorted(notes) == sorted(acked)
    assert ReviewQueue(root, push_repo="").stats()["decisions"] == 160


def test_sigkill_mid_writing_keeps_every_acknowledged_row(tmp_path):
    root = tmp_path / "rq"
    sha = _seed_item(root)
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), "k", "100000", sha], stdout=subprocess.PIPE,
                         text=True)
    acked = []
    for line in p.stdout:
        acked.append(line.strip())
        if len(acked) >= 60:
            break
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    rest = p.stdout.read().split()
    acked += rest
    r = ReviewQueue(root, push_repo="")
    st = r.stats()
    notes = []
    for line in (root / LOG_FILE).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row["event"] == "decision":
            notes.append(row["note"])
    assert set(acked) <= set(notes)                       # every acknowledged decision survived
    assert st["decisions"] - len(acked) in (0, 1)         # at most the row in flight beyond them
    assert st["unreadable_rows"] <= 1 and all("incomplete" in m or "unreadable" in m for m in st["problems"])
    r.submit(sha, "good", "after-crash")                  # and the log stays writable
    assert ReviewQueue(root, push_repo="").items()[0]["reviewer"] == "after-crash"


def test_export_neutralises_formulas_but_keeps_path_and_label(q, tmp_path):
    a = q.add_pending(png(10), pred(0.9))
    b = q.add_pending(png(11), pred(0.1))
    q.add_pending(png(12), pred(0.5))                     # stays pending: not exported
    q.submit(a, "good", "=HYPERLINK(\"http://x\",\"y\")", "+SUM(1,2)")
    q.submit(b, "bad", "@evil", "-2+3")
    q.submit(b, "confirm", "bob", "\tcmd")               # latest wins: label good
    out = tmp_path / "exp" / "labels.csv"
    assert q.export_labels(out) == 2
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:2] == ["path", "label"]
    by = {r["sha256"]: r for r in rows}
    assert by[a]["label"] == "good" and by[b]["label"] == "good"
    assert by[a]["reviewer"].startswith("'=") and by[a]["note"].startswith("'+")
    assert by[b]["reviewer"] == "bob" and by[b]["note"] == "cmd"   # tab stripped on input
    for r in rows:
        assert not r["path"].startswith(("=", "+", "-", "@")) and Path(r["path"]).is_file()
    samples = read_label_csv(out)
    assert sorted((Path(s.path).name, s.label) for s in samples) == sorted(
        (Path(by[s]["path"]).name, 0) for s in (a, b))
    assert neutralize_cell("-1") == "'-1" and neutralize_cell("ok") == "ok" and neutralize_cell(None) == ""


def test_cli_review_export(q, tmp_path, capsys):
    from defectcls.cli import main

    sha = q.add_pending(png(20), pred(0.6))
    q.submit(sha, "good", "ann")
    out = tmp_path / "l.csv"
    assert main(["review", "export", "--out", str(out), "--review-dir", str(q.root), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["rows"] == 1 and got["reviewed"] == 1 and got["unreadable_rows"] == 0
    assert main(["review", "export", "--out", str(out), "--review-dir", str(tmp_path / "missing")]) == 2
    assert "no review queue" in capsys.readouterr().err


def test_review_export_closes_the_retraining_loop(tiny_data, tmp_path, monkeypatch):
    """Reviewed labels flow into `defectcls train --extra-labels`: the saved split carries the reviewers' labels."""
    from defectcls.cli import main

    monkeypatch.setenv("DEFECTCLS_CACHE_DIR", str(tmp_path / "cache"))
    q = ReviewQueue(tmp_path / "rq", push_repo="")
    goods = sorted((tiny_data / "good").glob("*.png"))[:3]
    bads = sorted((tiny_data / "bad").glob("*.png"))[:2]
    decided = {}
    for k, path in enumerate(goods + bads):
        sha = q.add_pending(path, pred(0.45 + 0.02 * k))
        decision = ("bad", "good", "confirm", "good", "bad")[k]
        ev = q.submit(sha, decision, "qa")
        decided[sha] = ev["label"]
    out_csv = tmp_path / "labels.csv"
    assert main(["review", "export", "--out", str(out_csv), "--review-dir", str(q.root)]) == 0
    model_dir = tmp_path / "retrained"
    assert main(["train", "--data", str(tiny_data), "--out", str(model_dir), "--extra-labels", str(out_csv),
                 "--epochs", "1", "--epoch-size", "0", "--img-size", "32", "--batch-size", "64",
                 "--arch", "mobilenet_v3_small", "--no-aug",
                 "--no-cache", "--workers", "1", "--json"]) == 0
    split = json.loads((model_dir / "split.json").read_text())
    seen = {Path(p).name: y for part in ("train", "val", "test") for p, y in split[part]}
    n_files = len(list((tiny_data / "good").glob("*.png"))) + len(list((tiny_data / "bad").glob("*.png")))
    assert len(seen) == n_files + len(decided)             # the reviewed images joined the training data
    for sha, label in decided.items():
        stored = next(n for n in seen if n.startswith(sha))
        assert seen[stored] == ("good", "bad").index(label)  # with the reviewer's label, not the folder's


class _FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records commits, no network."""

    def __init__(self):
        self.commits: list[dict] = []

    def create_repo(self, repo_id, private=None, repo_type=None, exist_ok=False):
        self.created = (repo_id, repo_type, private)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def run_as_future(self, fn, *args, **kwargs) -> Future:
        f: Future = Future()
        f.set_result(fn(*args, **kwargs))
        return f

    def create_commit(self, repo_id, repo_type, operations, commit_message, revision=None):
        files = {}
        for op in operations:
            op.path_or_fileobj.seek(0)
            files[op.path_in_repo] = op.path_or_fileobj.read()
        self.commits.append({"repo_id": repo_id, "repo_type": repo_type, "files": files})
        return {"ok": True}


def test_review_log_pushed_to_a_dataset_repo_with_commit_scheduler(tmp_path):
    api = _FakeHfApi()
    q = ReviewQueue(tmp_path / "rq", push_repo="acme/reviews", hf_api=api, push_every_minutes=60)
    try:
        assert q.push_status.startswith("on") and api.created == ("acme/reviews", "dataset", True)
        sha = q.add_pending(png(30), pred(0.7))
        q.submit(sha, "good", "ann")
        q.push_now()
        files = {k: v for c in api.commits for k, v in c["files"].items()}
        logs = [k for k in files if k.startswith("hub/events-") and k.endswith(".jsonl")]
        assert len(logs) == 1 and f"{os.getpid()}" in logs[0]
        rows = [json.loads(x) for x in files[logs[0]].decode().splitlines()]
        assert [r["event"] for r in rows] == ["prediction", "decision"] and rows[1]["label"] == "good"
        assert f"images/{sha}.png" in files and all(c["repo_type"] == "dataset" for c in api.commits)
    finally:
        q.close()


def test_review_push_is_off_by_default_and_offline_safe(tmp_path, monkeypatch):
    monkeypatch.delenv("DEFECTCLS_REVIEW_REPO", raising=False)
    assert ReviewQueue(tmp_path / "a").push_status == "off"
    monkeypatch.setenv("DEFECTCLS_REVIEW_REPO", "acme/reviews")
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    q = ReviewQueue(tmp_path / "b")
    assert q.push_status.startswith("off (offline")
    q.add_pending(png(40), pred(0.2))                    # still works locally

    class Broken(_FakeHfApi):
        def create_repo(self, *a, **k):
            raise OSError("no network")

    q2 = ReviewQueue(tmp_path / "c", hf_api=Broken())
    assert q2.push_status.startswith("failed") and "no network" in q2.push_status
    q2.add_pending(png(41), pred(0.2))
    assert len(q2.items()) == 1


def test_default_root_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFECTCLS_REVIEW_DIR", str(tmp_path / "from_env"))
    q = ReviewQueue(push_repo="")
    assert q.root == (tmp_path / "from_env").resolve() and (q.root / "images").is_dir()


def test_photo_notes_reach_the_reviewer_and_older_rows_read_without_them(q):
    note = "the part looks oval (axes 0.70, a camera about 46 degrees off its axis)"
    tilted = Prediction(label="good", prob_bad=0.2, threshold=0.5, model_id="m@000000000001", notes=[note + "\n"])
    a = q.add_pending(png(1), tilted)
    b = q.add_pending(png(2), pred(0.4))
    rows = log_rows(q.root)
    assert rows[0]["photo_notes"] == [note] and rows[1]["photo_notes"] == []   # one printable line each
    items = {i["sha256"]: i for i in q.items()}
    assert items[a]["photo_notes"] == [note] and items[b]["photo_notes"] == []
    old = {k: v for k, v in rows[1].items() if k != "photo_notes"}              # a row from before notes existed
    old["sha256"] = "c" * 64
    with open(q.root / LOG_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(old) + "\n")
    assert {i["sha256"]: i for i in ReviewQueue(q.root, push_repo="").items()}["c" * 64]["photo_notes"] == []
