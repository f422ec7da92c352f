"""Review station latency and memory: time to first image, slider-to-image latency, server peak RSS.

    python bench/review_latency.py --openkbp ../shared/data/openkbp/train/pt_1     # a 128^3 OpenKBP patient
    python bench/review_latency.py --phantom 512 512 350                          # a full-size phantom

Prepares a one-patient cohort (a link to the OpenKBP folder, or `synth`), trains a small model a few steps
and encodes it with --reconstruct (all under a temporary folder), starts `deepdosimetrics review --model` and
drives the system Chromium (selenium): page open -> patient selected -> first non-blank slice image; the
opacity slider and a traversal slider -> the view's image changes. The server's peak RSS is its VmHWM.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def cli(*arguments: str, env=None) -> None:
    subprocess.run([sys.executable, "-m", "DeepDosimetricsLib.cli", *arguments, "--quiet"], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--openkbp", type=Path, help="one OpenKBP patient folder (flat NRRD layout)")
    source.add_argument("--phantom", type=int, nargs=3, metavar=("X", "Y", "Z"), help="synthesise one phantom")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="review-bench-"))
    cohort, model, enc = work / "cohort", work / "model", work / "enc"
    env = {**os.environ, "DEEPDOSIMETRICS_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "2"}
    if not (enc / "encode.json").is_file():
        if args.openkbp:
            cohort.mkdir(parents=True, exist_ok=True)
            link = cohort / args.openkbp.name
            if not link.exists():
                link.symlink_to(args.openkbp.resolve())
        else:
            cli("synth", "--out", str(cohort), "--patients", "1", "--shape", *map(str, args.phantom), env=env)
        cli("train", "--cohort", str(cohort), "--out", str(model), "--tile", "32", "--widths", "16", "32", "32",
            "--batch", "4", "--steps", str(args.steps), "--val-fraction", "0", env=env)
        cli("encode", "--model", str(model), "--cohort", str(cohort), "--out", str(enc), "--reconstruct", env=env)

    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    log = open(work / "server.log", "w+")
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "DeepDosimetricsLib.cli", "review", "--encoding", str(enc),
                               "--cohort", str(cohort), "--model", str(model), "--port", "0"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    url = None
    while url is None and server.poll() is None:
        log.seek(0)
        found = [x for x in log.read().splitlines() if x.startswith("review station: ")]
        url = found[0].split(": ", 1)[1] if found else None
        time.sleep(0.2)
    serving_s = time.perf_counter() - started
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1500,900",
              f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(a)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)

    def image():
        element = driver.find_elements(By.CSS_SELECTOR, "img.image-display-area")[0]
        return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("L"), np.float32)

    def wait(check, timeout=120.0):
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            value = check()
            if value is not None:
                return time.perf_counter() - start, value
            time.sleep(0.05)
        return None, image()

    def changed(before):
        return lambda: (lambda i: i if i.shape == before.shape and np.abs(i - before).mean() > 0.05 else None)(image())

    def set_range(element_id, value):
        driver.execute_script("const e=document.getElementById(arguments[0]); e.value=arguments[1];"
                              "e.dispatchEvent(new Event('input',{bubbles:true}))", element_id, str(value))

    try:
        opened = time.perf_counter()
        driver.get(url)
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#patient-select option") or None)
        page_s = time.perf_counter() - opened
        patient = driver.find_elements(By.CSS_SELECTOR, "#patient-select option")[0].get_attribute("value")
        Select(driver.find_element(By.ID, "patient-select")).select_by_value(patient)
        first_s, first = wait(lambda: (lambda i: i if i.std() > 5 else None)(image()))
        time.sleep(2)
        first = image()
        print("first image", first_s, flush=True)
        opacity_s, second = wait(changed(first)) if set_range("opacity", 1.0) is None else (None, None)
        print("opacity", opacity_s, flush=True)
        traversal = []
        before = second
        for value in (1.0, 2.0, 3.0):
            set_range("slider-z00", value)
            seconds, before = wait(changed(before))
            traversal.append(seconds)
            print("traversal", value, seconds, driver.find_element(By.ID, "traversal-message").text, flush=True)
        message = driver.find_element(By.ID, "traversal-message").text
    finally:
        driver.quit()
    peak = vm_hwm_mb(server.pid)
    server.terminate()
    server.wait(20)
    print(json.dumps({"source": str(args.openkbp or args.phantom), "server_ready_s": round(serving_s, 2),
                      "page_s": round(page_s, 2), "patient_to_first_image_s": round(first_s, 2),
                      "opacity_to_image_s": opacity_s and round(opacity_s, 2),
                      "traversal_to_image_s": [t and round(t, 2) for t in traversal], "traversal_message": message,
                      "server_peak_rss_mb": round(peak, 1)}))


if __name__ == "__main__":
    main()
