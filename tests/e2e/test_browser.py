"""Headless Chromium clicks through the three tabs: inspect a bad part, compare models, review it, export it."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.test_app import FAKE_BENCH, load_app

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture()
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not found: install Debian's Chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_three_tabs_in_chromium(browser, tiny_model, tmp_path, monkeypatch):
    from defectcls.synth import render_part

    shots = Path(os.environ.get("DEFECTCLS_SCREENSHOT_DIR") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.delenv("DEFECTCLS_AUTH", raising=False)
    models = []
    for name in ("mobilenet_v3_large_gray", "second_model"):
        shutil.copytree(tiny_model, tmp_path / "models" / name)
        models.append(tmp_path / "models" / name)
    import defectcls.bench

    monkeypatch.setattr(defectcls.bench, "benchmark", lambda *a, **k: FAKE_BENCH)  # the real one: test_app
    app = load_app()
    demo = app.build_demo(model_dirs=models, review_root=tmp_path / "rq", device="cpu", auth_enabled=False,
                          bench_models={"mobilenet_v3_large_gray": str(models[0]), "resnet50": None}, bench_iters=2)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                            **{**app.launch_kwargs(tmp_path / "rq"), "auth": None})
    part = tmp_path / "bad_part.png"
    render_part(5, bad=True, size=192)[0].save(part)
    sha = hashlib.sha256(part.read_bytes()).hexdigest()
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(url)
        # ---- Inspect: upload the bad part, see the verdict and the heat-map
        page.locator("#inspect-image input[type=file]").set_input_files(str(part))
        page.locator("#inspect-image img").first.wait_for()
        page.locator("#inspect-run").click()
        page.locator("#verdict-md h2").wait_for()
        verdict = page.locator("#inspect-label").inner_text().lower()
        assert "bad" in verdict or "good" in verdict
        heat = page.locator("#inspect-heatmap img").first
        heat.wait_for()
        assert heat.evaluate("img => img.naturalWidth") > 0
        assert sha[:12] in page.locator("#verdict-md").inner_text()
        page.screenshot(path=str(shots / "inspect.png"), full_page=True)

        # ---- a broken file: an error, and the previous part's written verdict is gone
        broken = tmp_path / "broken.png"
        broken.write_bytes(part.read_bytes()[:200])
        page.locator("#inspect-image input[type=file]").set_input_files(str(broken))
        page.locator("#inspect-run").click()
        page.get_by_text("broken.png: ").first.wait_for()
        assert page.locator("#verdict-md h2").count() == 0
        page.locator("#inspect-image input[type=file]").set_input_files(str(part))      # back to the part
        page.locator("#inspect-image img").first.wait_for()

        # ---- Models: the table, the timing-only row, switching the active model
        page.get_by_role("tab", name="Models").click()
        page.locator("#models-table").get_by_text("second_model").first.wait_for()
        page.wait_for_function("() => (document.querySelector('#bench-table')?.innerText || '').includes('timing only')")
        assert "defectcls train" in page.locator("#bench-md").inner_text()
        page.locator("#model-pick input").click()
        page.get_by_role("option", name="second_model").click()
        page.get_by_text("Inspect now uses second_model").wait_for()
        page.screenshot(path=str(shots / "models.png"), full_page=True)

        # ---- Review: the item is pending; a reviewer marks it bad with the B key
        page.get_by_role("tab", name="Review").click()           # opening the tab refreshes the queue
        page.locator("#review-sha textarea, #review-sha input").first.wait_for()
        page.wait_for_function("sha => [...document.querySelectorAll('#review-sha textarea, #review-sha input')]"
                               ".some(e => e.value === sha)", arg=sha)
        page.locator("#review-image img").first.wait_for()
        page.locator("#review-heatmap img").first.wait_for()
        page.locator("#review-reviewer textarea, #review-reviewer input").first.fill("browser-qa")
        page.locator("#review-note textarea, #review-note input").first.fill("dent at 3 o'clock")
        page.locator("h1").first.click()                 # focus out of the text fields, then the shortcut
        page.screenshot(path=str(shots / "review.png"), full_page=True)
        page.keyboard.press("b")
        page.get_by_text("Nothing to review with these filters.").wait_for()
        page.locator("#review-stats").get_by_text("overturned").wait_for()
        page.screenshot(path=str(shots / "review_done.png"), full_page=True)
    finally:
        demo.close()
    out = tmp_path / "labels.csv"
    from defectcls.cli import main

    assert main(["review", "export", "--out", str(out), "--review-dir", str(tmp_path / "rq")]) == 0
    rows = list(csv.DictReader(out.open(newline="", encoding="utf-8")))
    mine = [r for r in rows if r["sha256"] == sha]
    assert len(mine) == 1 and mine[0]["label"] == "bad" and mine[0]["reviewer"] == "browser-qa"
    assert mine[0]["note"] == "dent at 3 o'clock"
