"""The page of `cxrkeras serve` in a real browser: Playwright for Python driving Debian's chromium.

Playwright's own browser download cannot work here; `.ci/run` installs
Debian's `chromium` package and the test skips, saying why, where it is absent.
"""

import base64
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from serving_helpers import http, start, wait_for

from cxrkeras import serving
from cxrkeras.config import IMAGE_SIZE
from cxrkeras.synth import synth_image

NAME = "cxr"

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="no chromium to drive (Debian: apt-get install chromium)"
)


@pytest.fixture(scope="module")
def page_server(exported_cascade):
    app = serving.create_app(exported_cascade["base"], NAME, serving.Settings(max_batch_size=16))
    url, server, thread = start(app)
    wait_for(lambda: http(url, "/v2/health/ready")[0] == 200)
    yield url
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Ten X-ray-like images (JPEG and PNG, several sizes) and one file that is no image."""
    folder = tmp_path_factory.mktemp("page-images")
    rng = np.random.default_rng(2)
    paths = []
    for i, label in enumerate(["normal", "non-covid", "covid"] * 3 + ["covid"]):
        path = folder / f"{i:02d}-{label}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(synth_image(label, rng), "L").resize((150 + 20 * i, 150 + 10 * i)).save(path)
        paths.append(str(path))
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    return paths, str(broken)


def served_answer(url, path):
    """What the API answers for one image (the page must show the same)."""
    with open(path, "rb") as f:
        body = {"signature_name": "explain", "instances": [{"b64": base64.b64encode(f.read()).decode()}]}
    return http(url, f"/v1/models/{NAME}:predict", body)[1]["predictions"][0]


def drop(page, paths):
    """Drop files on the drop zone as a user's drag and drop does (a DataTransfer in a drop event)."""
    files = []
    for path in paths:
        with open(path, "rb") as f:
            files.append({"name": os.path.basename(path), "data": base64.b64encode(f.read()).decode()})
    page.evaluate(
        """(files) => {
            const transfer = new DataTransfer();
            for (const f of files) {
                const bytes = Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0));
                transfer.items.add(new File([bytes], f.name));
            }
            document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        files,
    )


def results(page):
    return page.eval_on_selector_all(
        ".result",
        """(items) => items.map((item) => ({
            file: item.querySelector(".file").textContent,
            decision: item.querySelector(".decision").textContent,
            values: Array.from(item.querySelectorAll(".bars .value")).map((v) => v.textContent),
            classes: Array.from(item.querySelectorAll(".bars dt")).map((v) => v.textContent),
            error: item.querySelector(".error").hidden ? null : item.querySelector(".error").textContent,
            heat: (() => {  // how much of the canvas the overlay coloured (not gray)
                const c = item.querySelector("canvas").getContext("2d");
                const d = c.getImageData(0, 0, c.canvas.width, c.canvas.height).data;
                let coloured = 0;
                for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - d[i + 2]) > 30) coloured++;
                return coloured / (d.length / 4);
            })(),
        }))""",
    )


def test_the_page_shows_each_image_result(page_server, browser, image_files, tmp_path):
    paths, broken = image_files
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(page_server + "/")
    page.wait_for_function("document.getElementById('model-info').textContent.startsWith('Model')")
    info = page.inner_text("#model-info")
    assert f"“{NAME}”, version 1" in info and "infected > 0.50, then covid > 0.50" in info
    assert page.inner_text("#image-size") == f"{IMAGE_SIZE} × {IMAGE_SIZE}"  # the served model's, not a literal

    # keyboard: Tab reaches the drop zone, then the file input behind "Choose images…"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "drop"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "files"

    drop(page, paths[:2])
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Classified 2 of 2')")
    shown = results(page)
    assert [r["file"] for r in shown] == [os.path.basename(p) for p in paths[:2]]
    for result, path in zip(shown, paths[:2]):
        answer = served_answer(page_server, path)
        assert result["classes"] == ["normal", "non-covid", "covid"]
        assert result["values"] == [f"{100 * p:.1f}%" for p in answer["probabilities"]]
        assert result["decision"] == f"Decision: {answer['class_name']}" and result["error"] is None
        assert result["heat"] > 0.05  # the Grad-CAM overlay is drawn

    page.set_input_files("input[type=file]", paths + [broken])  # ten images and one that is none
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Classified 10 of 11')", timeout=60000)
    shown = results(page)
    assert len(shown) == 11 and all(r["error"] is None and len(r["values"]) == 3 for r in shown[:10])
    assert shown[10]["decision"] == "Cannot read this image" and "does not decode as PNG" in shown[10]["error"]
    assert "1 could not be read" in page.inner_text("#status")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert Image.open(tmp_path / "page.png").size[0] == 1100
    page.close()


@pytest.mark.parametrize("width", [360, 390])
def test_the_page_fits_a_phone_after_an_upload(page_server, browser, image_files, width):
    paths, broken = image_files
    page = browser.new_page(viewport={"width": width, "height": 740})
    page.goto(page_server + "/")
    page.wait_for_function("document.getElementById('model-info').textContent.startsWith('Model')")
    page.set_input_files("input[type=file]", paths[:2] + [broken])
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Classified 2 of 3')", timeout=60000)
    assert page.evaluate("document.documentElement.scrollWidth") == width  # no sideways scrolling
    rights = page.eval_on_selector_all(
        ".result, .result .decision, .result .bars .value, .result .error:not([hidden]), .result canvas",
        "(items) => items.map((item) => item.getBoundingClientRect().right)",
    )
    assert len(rights) == 3 + 3 + 6 + 1 + 3 and max(rights) <= width
    page.close()
