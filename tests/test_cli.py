import json
import subprocess
import sys
from pathlib import Path

import pytest

from defectcls.cli import build_parser, main
from tests.helpers import share_threshold

from .badfiles import write_corpus

COMMANDS = ["synth", "train", "evaluate", "predict"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "defectcls", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help_with_example(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([cmd, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"defectcls {cmd}" in out
    assert "--json" in out


def test_all_registered_commands_documented():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        assert "example:" in parser.description, name


def test_synth_is_byte_identical_and_sized(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = run_cli("synth", "--out", str(out), "--good", "3", "--bad", "2", "--seed", "7", "--size", "64", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["n_good"] == 3
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 5
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    from PIL import Image

    assert Image.open(a / files[0]).size == (64, 64)


def test_predict_json_lines_and_error_lines(tmp_path, tiny_model, tiny_data):
    from PIL import Image

    corpus = write_corpus(tmp_path / "odd")
    good = sorted((tiny_data / "good").glob("*.png"))[0]
    dark = tmp_path / "lamp_off.png"                  # no part in sight: held, bad whatever the model says
    Image.new("L", (96, 96), 3).save(dark)
    r = run_cli("predict", "--model", str(tiny_model), str(good), str(corpus["text.png"]), str(corpus["cmyk.jpg"]),
                str(dark), "--json", "--cam-dir", str(tmp_path / "cams"))
    assert r.returncode == 1  # one file failed
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["path"] for row in rows] == [str(good), str(corpus["text.png"]), str(corpus["cmyk.jpg"]), str(dark)]
    assert rows[0]["label"] in ("good", "bad") and 0 <= rows[0]["prob_bad"] <= 1 and rows[0]["latency_ms"] > 0
    assert rows[0]["notes"] == [] and rows[0]["held"] is False   # a round part straight on: nothing to add
    assert "error" in rows[1] and "not a recognised image" in rows[1]["error"]
    assert rows[2]["label"] in ("good", "bad")
    assert rows[3]["held"] is True and rows[3]["label"] == "bad" and rows[3]["notes"][0].startswith("no round part")
    cams = list((tmp_path / "cams").glob("*.jpg"))
    assert len(cams) == 3 and all(c.parent == tmp_path / "cams" for c in cams)
    text = run_cli("predict", "--model", str(tiny_model), str(dark)).stdout
    assert text.startswith(f"{dark}: bad (held) (P(bad)") and "note: no round part" in text


def test_predict_whole_corpus_never_crashes(tmp_path, tiny_model):
    corpus = write_corpus(tmp_path / "odd")
    r = run_cli("predict", "--model", str(tiny_model), *map(str, corpus.values()), "--json")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == len(corpus)
    errors = {Path(row["path"]).name for row in rows if "error" in row}
    from .badfiles import invalid_files

    assert errors == set(invalid_files())
    assert r.returncode == 1 and "could not be judged" in r.stderr
    # the human line names the file once
    text = str(corpus["text.png"])
    r = run_cli("predict", "--model", str(tiny_model), text)
    line = next(ln for ln in r.stdout.splitlines() if "ERROR" in ln)
    assert line.count(text) == 1 and "not a recognised image" in line


def test_evaluate_json_keys_and_report(tmp_path, tiny_model, tiny_data):
    r = run_cli("evaluate", "--model", str(tiny_model), "--data", str(tiny_data), "--json",
                "--report-dir", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    for key in ("n", "tp", "fp", "tn", "fn", "fnr", "fpr", "auroc", "ece", "threshold"):
        assert key in m
    assert m["split"] == "test"  # the model's own held-out part, never its training images
    split = json.loads((tiny_model / "split.json").read_text())
    assert m["n"] == len(split["test"])
    assert (tmp_path / "rep" / "roc.png").is_file() and (tmp_path / "rep" / "metrics.json").is_file()
    # each photo's score and verdict: the test part's photos, counted as the metrics count them
    import csv

    with open(tmp_path / "rep" / "scores.csv", newline="") as fh:
        photos = list(csv.DictReader(fh))
    assert sorted(Path(r["path"]).name for r in photos) == sorted(Path(p).name for p, _ in split["test"])
    assert all(r["verdict"] == ("bad" if float(r["p_bad"]) >= m["threshold"] else "good") for r in photos)
    assert sum(r["label"] == "good" and r["verdict"] == "bad" for r in photos) == m["fp"]
    assert sum(r["label"] == "bad" and r["verdict"] == "good" for r in photos) == m["fn"]
    # the ranking's floor, recomputed from the photos: good parts at or above the lowest bad part a threshold must catch
    low = min(float(r["p_bad"]) for r in photos if r["label"] == "bad" and r["held"] == "no")
    good = [r for r in photos if r["label"] == "good"]
    assert m["fpr_at_no_miss"] == pytest.approx(
        sum(r["held"] == "yes" or float(r["p_bad"]) >= low for r in good) / len(good))
    text = run_cli("evaluate", "--model", str(tiny_model), "--data", str(tiny_data)).stdout
    assert f"FPR at no miss {m['fpr_at_no_miss']:.4f}" in text


def test_errors_are_one_line_with_nonzero_exit(tmp_path):
    r = run_cli("evaluate", "--model", str(tmp_path / "nomodel"), "--data", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    r = run_cli("train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_evaluate_recognises_its_training_folder_after_a_move(tmp_path, tiny_model, tiny_data):
    import shutil

    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_data, moved)
    r = run_cli("evaluate", "--model", str(tiny_model), "--data", str(moved), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["split"] == "test"


def test_default_model_is_found_from_any_folder(tmp_path, monkeypatch, default_model_dir):
    from defectcls.cli import default_model_dir as resolve

    monkeypatch.delenv("DEFECTCLS_MODELS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)                                    # no ./models here: the checkout's own
    assert Path(resolve()).resolve() == default_model_dir.resolve()
    (tmp_path / "models" / default_model_dir.name).mkdir(parents=True)
    assert Path(resolve()).resolve() == (tmp_path / "models" / default_model_dir.name).resolve()   # ./models first
    monkeypatch.setenv("DEFECTCLS_MODELS_DIR", str(tmp_path / "elsewhere"))
    assert resolve() == str(tmp_path / "elsewhere" / default_model_dir.name)                  # the setting wins


def test_aug_set_changes_single_ranges_and_refuses_unknown_ones(tmp_path, tiny_data, capsys):
    from defectcls.cli import _aug_overrides
    from defectcls.errors import DefectclsError

    assert _aug_overrides(["brightness=0.3", "gamma=0.45", "rotate=false", "jpeg_quality=40"]) == \
        {"brightness": 0.3, "gamma": 0.45, "rotate": False, "jpeg_quality": 40}
    for bad in (["fog=1"], ["brightness"], ["brightness=lots"], ["bad_degrade=1"]):
        with pytest.raises(DefectclsError, match="--aug-set"):
            _aug_overrides(bad)
    out = tmp_path / "m"
    assert main(["train", "--data", str(tiny_data), "--out", str(out), "--epochs", "1", "--img-size", "32",
                 "--epoch-size", "0", "--tta", "1", "--aug-set", "brightness=0.3", "gamma=0.45", "--no-miss-share",
                 "0.6", "--no-miss-min-fpr", "0", "--weight-decay", "0.05", "--json"]) == 0
    card = json.loads((out / "card.json").read_text())
    aug = card["train"]["config"]["aug"]
    assert aug["brightness"] == 0.3 and aug["gamma"] == 0.45 and aug["contrast"] == 0.35
    assert card["train"]["config"]["weight_decay"] == 0.05
    pol = card["threshold_policy"]                         # target 0: 0.6 of the lowest validation bad score
    assert card["train"]["config"]["no_miss_share"] == pol["no_miss_share"] == 0.6
    assert card["threshold"] == pytest.approx(share_threshold(card, 0.6))   # no floor of good parts asked
    assert card["train"]["config"]["no_miss_min_fpr"] == pol["no_miss_min_fpr"] == 0
    assert main(["train", "--data", str(tiny_data), "--out", str(out), "--aug-set", "fog=1"]) == 2
    assert "--aug-set 'fog=1'" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny_data), "--out", str(out), "--no-miss-share", "0"]) == 2
    assert "--no-miss-share must be in (0, 1]" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny_data), "--out", str(out), "--no-miss-min-fpr", "1"]) == 2
    assert "--no-miss-min-fpr must be in [0, 1)" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny_data), "--out", str(out), "--weight-decay", "-0.1"]) == 2
    assert "--weight-decay must be 0 or more" in capsys.readouterr().err


def test_commands_keep_freed_memory_on_glibc(monkeypatch):
    """Large tensors are not handed back to the kernel after each batch (Linux with glibc); off on request."""
    import platform

    from defectcls.config import tune_malloc

    assert tune_malloc() is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
    monkeypatch.setenv("DEFECTCLS_MALLOC", "default")
    assert tune_malloc() is False
