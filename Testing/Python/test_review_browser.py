"""The review station end to end in a real (system) Chromium: one server, several checks.

A tiny phantom cohort is encoded by a model trained a few steps (`synth`, `train`, `encode --reconstruct`),
`deepdosimetrics review` serves it on 127.0.0.2 with a token, and headless Chromium (Debian's package,
driven by selenium through /usr/bin/chromedriver) picks a patient, moves the opacity slider, switches to the
residual, moves a traversal slider and records a verdict. Skips with a reason without Chromium.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = os.environ.get("DEEPDOSIMETRICS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DEEPDOSIMETRICS_CHROMEDRIVER", "/usr/bin/chromedriver")
HOST = "127.0.0.2"
TOKEN = "browser-test-token-0123456789"
pytestmark = [pytest.mark.slow, pytest.mark.slicer]


def _requirements() -> str:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        return f"system Chromium absent ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver"
    for module in ("selenium", "trame_slicer", "slicer"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[slicer,review,dev]')"
    return ""


def _files(*folders: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for folder in folders for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def station(tmp_path_factory):
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    from DeepDosimetricsLib.cli import main

    root = tmp_path_factory.mktemp("review")
    cohort, model, enc, cache = root / "cohort", root / "model", root / "enc", root / "cache"
    env = {**os.environ, "DEEPDOSIMETRICS_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow"}
    os.environ["DEEPDOSIMETRICS_CACHE"] = str(cache)
    assert main(["synth", "--out", str(cohort), "--patients", "3", "--shape", "48", "48", "32", "--quiet"]) == 0
    assert main(["train", "--cohort", str(cohort), "--out", str(model), "--tile", "16", "--batch", "4",
                 "--widths", "8", "16", "--steps", "5", "--checkpoint-every", "5", "--quiet"]) == 0
    assert main(["encode", "--model", str(model), "--cohort", str(cohort), "--out", str(enc),
                 "--reconstruct", "--quiet"]) == 0
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    before = _files(cohort, model, enc, cache)
    log = open(root / "server.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "DeepDosimetricsLib.cli", "review", "--encoding", str(enc), "--cohort", str(cohort),
         "--model", str(model), "--host", HOST, "--port", str(port), "--token", TOKEN, "--threads", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    driver, profile = _browser()  # Chromium starts while the server imports (one browser for the module)
    url = None
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        log.seek(0)
        lines = [line for line in log.read().splitlines() if line.startswith("review station: ")]
        if lines:
            url = lines[0].split(": ", 1)[1]
            break
        time.sleep(0.1)
    if url is None:
        process.kill()
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        log.seek(0)
        pytest.fail("the review station did not start:\n" + log.read()[-3000:])
    yield {"url": url, "port": port, "root": root, "enc": enc, "before": before,
           "folders": (cohort, model, enc, cache), "process": process, "driver": driver}
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
    os.killpg(process.pid, signal.SIGTERM)  # nothing to flush: review.csv is written atomically per verdict
    try:
        process.wait(3)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    log.close()


def _status(url: str, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_station_refuses_requests_without_the_token(station):
    base = f"http://{HOST}:{station['port']}"
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    assert station["url"] == f"{base}/index.html?token={TOKEN}"
    for path, headers in [("/index.html", {}), ("/", {}), ("/index.html?token=wrong-token-000000000", {}),
                          ("/ws", upgrade), ("/ws?token=wrong", upgrade),
                          ("/index.html", {"Authorization": "Bearer wrong"})]:
        status, body = _status(base + path, headers)
        assert status == 403 and b"<" not in body and b"script" not in body, path
    status, body = _status(f"{base}/index.html?token={TOKEN}")
    assert status == 200 and b"<html" in body.lower()


def _browser(width=1500, height=900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="review-chromium-")
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    return driver, profile


def _view_image(driver, index: int = 0) -> np.ndarray:
    """The image of view ``index`` in page order (four-up layout: 0 axial, 1 3D, 2 coronal, 3 sagittal)."""
    from PIL import Image
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:  # while the layout settles an image may have no height yet: a blank answer, asked again
        element = driver.find_elements(By.CSS_SELECTOR, "img.image-display-area")[index]
        return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("L"), np.float32)
    except (IndexError, WebDriverException):
        return np.zeros((1, 1), np.float32)


def _wait(condition, timeout=60.0, what="condition", poll=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value is not None and value is not False and not (isinstance(value, list) and not value):
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def _changed(driver, before: np.ndarray):
    def check():
        image = _view_image(driver)
        return image if image.shape == before.shape and np.abs(image - before).mean() > 0.5 else None
    return check


def _settled(driver, seconds=0.4, timeout=40.0) -> np.ndarray:
    """The view's image once two captures ``seconds`` apart agree (renders of earlier changes have arrived)."""
    previous = _view_image(driver)
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(seconds)
        image = _view_image(driver)
        if image.shape == previous.shape and np.abs(image - previous).mean() < 0.1:
            return image
        previous = image
    return previous


def _set_range(driver, element_id: str, value: float) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input', {bubbles: true})); e.dispatchEvent(new Event('change', {bubbles: true}));",
        element_id, str(value))


def test_review_in_chromium(station):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = station["driver"]
    shots = os.environ.get("DEEPDOSIMETRICS_REVIEW_SHOTS")
    driver.get(station["url"])
    select = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#patient-select option"), what="patient list")
    patient = select[0].get_attribute("value")
    Select(driver.find_element(By.ID, "patient-select")).select_by_value(patient)
    _wait(lambda: driver.find_element(By.ID, "dvh").is_displayed(), what="the patient to load")
    _wait(lambda: (lambda i: i if i.std() > 5 else None)(_view_image(driver)), what="a non-blank view")
    first = _settled(driver)
    assert first.std() > 5, "the slice view is blank"
    # the 3D view: structure surfaces on a uniform black background, built just after the slice images
    _wait(lambda: "3D surfaces in" in driver.find_element(By.ID, "surfaces").text, what="the 3D surfaces")
    threed = _wait(lambda: (lambda i: i if i.std() > 5 and (i > 20).mean() > 0.01 else None)(
        _view_image(driver, 1)), what="a non-blank 3D view")
    assert threed.std() > 5, "the 3D view is blank"
    if shots:
        driver.save_screenshot(str(Path(shots) / "review_station.png"))

    _set_range(driver, "opacity", 1.0)  # the reconstruction covers the CT
    _wait(_changed(driver, first), what="the view to change with the opacity slider")
    second = _settled(driver)

    Select(driver.find_element(By.ID, "fg-mode")).select_by_value("residual")
    _wait(_changed(driver, second), what="the view to show the residual")
    third = _settled(driver)
    if shots:
        driver.save_screenshot(str(Path(shots) / "review_station_residual.png"))

    _set_range(driver, "slider-z00", 3.0)
    _wait(lambda: "decoded" in driver.find_element(By.ID, "traversal-message").text, what="the traversal")
    _wait(_changed(driver, third), what="the view to change with the traversal slider")
    _wait(lambda: "whole volume in" in driver.find_element(By.ID, "traversal-message").text,
          what="the whole traversed volume (decoded in the background after the displayed planes)")
    assert driver.find_element(By.ID, "traversal-stage").text == "exact"  # the preview's label replaced

    driver.find_element(By.ID, "verdict-not-acceptable").click()
    driver.find_element(By.ID, "comment").send_keys("PTV edge lost, =cmd")
    driver.find_element(By.ID, "reviewer").send_keys("test reviewer")
    driver.find_element(By.ID, "save-verdict").click()
    _wait(lambda: "saved" in driver.find_element(By.ID, "verdict-message").text, what="the verdict to be saved")

    import pandas as pd

    table = pd.read_csv(station["enc"] / "review.csv", keep_default_na=False)
    assert table.to_dict("records")[-1]["patient"] == patient
    assert table.iloc[-1]["verdict"] == "not acceptable" and table.iloc[-1]["reviewer"] == "test reviewer"
    assert table.iloc[-1]["comment"] == "PTV edge lost, =cmd"
    after = _files(*station["folders"])
    changed = {path for path, stamp in after.items() if station["before"].get(path) != stamp}
    assert changed == {str(station["enc"] / "review.csv")}, changed
