"""Review station latency and memory: time to first image, slider-to-image latency, server peak RSS.

    python bench/review_latency.py --openkbp ../shared/data/openkbp/train/pt_1     # a 128^3 OpenKBP patient
    python bench/review_latency.py --phantom 256 256 175                          # a half-size phantom
    python bench/review_latency.py --phantom-fullsize                             # the 512x512x350 phantom
    python bench/review_latency.py --phantom 256 256 175 --prepare-only           # synth/train/encode only
    python bench/review_latency.py --phantom-fullsize --mode both --work DIR      # previous and current, one run
    python bench/review_latency.py --phantom-fullsize --mode both --work DIR --decode-only  # no browser

Prepares a one-patient cohort (a link to the OpenKBP folder, or `synth`), trains a small model a few steps
and encodes it with --reconstruct (all under a temporary folder), starts `deepdosimetrics review --model` and
drives the system Chromium (selenium): page open -> patient selected -> first non-blank slice image; the
opacity slider and a traversal slider -> the view's image changes (each traversal step waits for its own
message, then for the whole volume decoded in the background before the next step). The server's peak RSS is
its VmHWM. Besides wall-clock times it records the server's CPU seconds per update (utime + stime): on a
shared, loaded machine that is the fairer figure (an idle 2-core machine answers in about that time or less,
the decoder using both cores). The load average is recorded at the start and the end. Prints one JSON line per
server, then one summary line: per traversal update, the preview (slider to the changed image: the displayed
planes) and the exact volume (slider to the whole volume in place).

``--mode previous`` serves with the library of ``--previous REV`` (a git revision of this repository, extracted
to a temporary folder: by default the last commit before issue 20's traversal work), ``--mode both`` runs the
previous and the current library one after the other on the same prepared data. ``--decode-only`` times the
station's traverser in a fresh process per library, without the server and the browser: the displayed planes
through the volume's centre and the whole volume, per update.
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

REPO = Path(__file__).resolve().parents[1]
#: the last commit before issue 20's traversal work (planes decoded from whole tiles, every channel)
PREVIOUS = "e2e65f6"


def cli(*arguments: str, env=None) -> None:
    subprocess.run([sys.executable, "-m", "DeepDosimetricsLib.cli", *arguments, "--quiet"], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    source.add_argument("--phantom-fullsize", action="store_true", help="the 512x512x350 phantom of the issue")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prepare-only", action="store_true", help="synth/train/encode into --work, no browser")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--mode", choices=("current", "previous", "both"), default="current",
                        help="serve with this checkout's library, --previous's, or both one after the other")
    parser.add_argument("--previous", default=PREVIOUS, metavar="REV", help=f"the previous version (default {PREVIOUS})")
    parser.add_argument("--decode-only", action="store_true", help="time the traverser in-process, no browser")
    args = parser.parse_args()
    if args.phantom_fullsize:
        args.phantom = [512, 512, 350]
    load_start = os.getloadavg()

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
    if args.prepare_only:
        print(f"prepared {work}")
        return
    results = {}
    for mode in (("previous", "current") if args.mode == "both" else (args.mode,)):
        run_env = dict(env)
        if mode == "previous":
            library = Path(tempfile.mkdtemp(prefix="review-previous-"))
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.previous, "DeepDosimetrics"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(library)], input=archive, check=True)
            run_env["PYTHONPATH"] = os.pathsep.join([str(library / "DeepDosimetrics"), env.get("PYTHONPATH", "")])
        else:
            run_env["PYTHONPATH"] = os.pathsep.join([str(REPO / "DeepDosimetrics"), env.get("PYTHONPATH", "")])
        if args.decode_only:
            out = subprocess.run([sys.executable, "-c", DECODE_ONLY, str(enc), str(cohort), str(model)], env=run_env,
                                 check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
            results[mode]["library"] = args.previous if mode == "previous" else "current"
            print(json.dumps(results[mode]), flush=True)
            continue
        results[mode] = measure(args, work, cohort, model, enc, run_env, mode)
        results[mode]["library"] = args.previous if mode == "previous" else "current"
        print(json.dumps(results[mode]), flush=True)

    if args.decode_only:
        print("traverser only, per update (z00 +1, +2, +3 SD, load "
              f"{load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}): " + "; ".join(
                  f"{mode}: planes {', '.join(f'{v:.2f}' for v in r['planes_s'])} s (CPU "
                  f"{', '.join(f'{v:.2f}' for v in r['planes_cpu_s'])} s; {r['plane_tiles']} tiles), "
                  f"whole volume {', '.join(f'{v:.2f}' for v in r['volume_s'])} s (CPU "
                  f"{', '.join(f'{v:.2f}' for v in r['volume_cpu_s'])} s; {r['tiles']} tiles), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB" for mode, r in results.items()))
        return

    def seconds(values):
        return ", ".join("-" if v is None else f"{v:.2f}" for v in values)

    parts = [f"{mode}: preview {seconds(r['traversal_to_image_s'])} s, exact {seconds(r['traversal_whole_volume_s'])} s"
             f" (server peak RSS {r['server_peak_rss_mb']:.0f} MB)" for mode, r in results.items()]
    print(f"traversal per update (z00 +1, +2, +3 SD, {args.openkbp or 'x'.join(map(str, args.phantom))}, load "
          f"{load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}): " + "; ".join(parts))


#: run in a fresh process with one library on PYTHONPATH: argv = ENC_DIR COHORT MODEL; prints one JSON line
DECODE_ONLY = """
import json, resource, sys, time
from DeepDosimetricsLib.review.catalog import Catalog
from DeepDosimetricsLib.review.traversal import Traverser
catalog = Catalog(sys.argv[1], sys.argv[2])
traverser = Traverser(sys.argv[3], catalog)
patient, label = catalog.ids[0], "window:soft_tissue"
shape = traverser.patient_shape(patient)
planes = tuple(s // 2 for s in shape)
traverser.planes(patient, {"z01": 0.5}, label, planes)  # warm-up (first convolutions, the patient's load)
planes_s, volume_s, planes_cpu_s, volume_cpu_s, tiles = [], [], [], [], 0
for value in (1.0, 2.0, 3.0):
    cpu = time.process_time()
    result = traverser.planes(patient, {"z00": value}, label, planes)
    planes_cpu_s.append(round(time.process_time() - cpu, 3))
    planes_s.append(round(result.seconds, 3))
    tiles = result.tiles
    cpu = time.process_time()
    volume = traverser.full(patient, {"z00": value}, label)
    volume_cpu_s.append(round(time.process_time() - cpu, 3))
    volume_s.append(round(volume.seconds, 3))
    del volume
print(json.dumps({"planes_s": planes_s, "planes_cpu_s": planes_cpu_s, "plane_tiles": tiles, "volume_s": volume_s,
                  "volume_cpu_s": volume_cpu_s,
                  "tiles": len(traverser.positions), "shape": list(shape),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def measure(args, work: Path, cohort: Path, model: Path, enc: Path, env: dict, mode: str) -> dict:
    """One server (the library on ``env``'s PYTHONPATH) driven by Chromium: the figures as a dict."""
    from PIL import Image
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    load_start = os.getloadavg()
    log = open(work / f"server-{mode}.log", "w+")
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
        try:  # while the layout settles an image may have no height yet: a blank answer, asked again
            element = driver.find_elements(By.CSS_SELECTOR, "img.image-display-area")[0]
            return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("L"), np.float32)
        except (IndexError, WebDriverException):
            return np.zeros((1, 1), np.float32)

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

    def message():
        return driver.find_element(By.ID, "traversal-message").text

    def set_range(element_id, value):
        driver.execute_script("const e=document.getElementById(arguments[0]); e.value=arguments[1];"
                              "e.dispatchEvent(new Event('input',{bubbles:true}))", element_id, str(value))

    try:
        opened = time.perf_counter()
        driver.get(url)
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#patient-select option") or None)
        page_s = time.perf_counter() - opened
        patient = driver.find_elements(By.CSS_SELECTOR, "#patient-select option")[0].get_attribute("value")
        time.sleep(1.0)
        empty = image()  # the views before a patient is chosen (annotations only)
        Select(driver.find_element(By.ID, "patient-select")).select_by_value(patient)
        first_s, first = wait(lambda: (lambda i: i if i.std() > 5 and i.shape == empty.shape
                                       and np.abs(i - empty).mean() > 1.0 else None)(image()))
        print("first image", first_s, flush=True)
        surfaces_s, _ = wait(lambda: True if "3D surfaces in" in driver.find_element(By.ID, "surfaces").text
                             else None, timeout=600.0)
        surfaces_s = surfaces_s and first_s + surfaces_s
        surfaces = driver.find_element(By.ID, "surfaces").text
        print("3D surfaces", surfaces_s, surfaces, flush=True)
        time.sleep(2)
        first = image()
        cpu0 = cpu_s(server.pid)
        set_range("opacity", 1.0)
        opacity_s, second = wait(changed(first))
        opacity_cpu = cpu_s(server.pid) - cpu0
        print("opacity", opacity_s, flush=True)
        time.sleep(1.0)
        second = image()
        traversal, traversal_cpu, whole, messages = [], [], [], []
        before = second
        for value in (1.0, 2.0, 3.0):
            cpu0 = cpu_s(server.pid)
            set_range("slider-z00", value)
            tag = f"z00 {value:+.1f} SD: decoded"  # the previous and the current library's message
            seconds, before = wait(lambda tag=tag, old=before: (
                lambda i: i if tag in message() and np.abs(i - old).mean() > 0.05 else None)(image()), timeout=600.0)
            traversal.append(seconds)
            traversal_cpu.append(cpu_s(server.pid) - cpu0)
            rest, _ = wait(lambda tag=tag: True if tag in message() and "whole volume in" in message() else None,
                           timeout=600.0)
            whole.append(rest and seconds and seconds + rest)
            time.sleep(0.5)
            before = image()
            messages.append(message())
            print("traversal", value, seconds, traversal_cpu[-1], messages[-1], flush=True)
        message = messages[-1]
    finally:
        driver.quit()
        peak = vm_hwm_mb(server.pid)
        server.terminate()  # also when a step failed: no server left behind
        server.wait(20)
    return {"mode": mode, "source": str(args.openkbp or args.phantom), "server_ready_s": round(serving_s, 2),
                      "page_s": round(page_s, 2), "patient_to_first_image_s": round(first_s, 2),
                      "patient_to_3d_surfaces_s": surfaces_s and round(surfaces_s, 2), "surfaces": surfaces,
                      "opacity_to_image_s": opacity_s and round(opacity_s, 2),
                      "opacity_server_cpu_s": round(opacity_cpu, 2),
                      "traversal_to_image_s": [t and round(t, 2) for t in traversal],
                      "traversal_server_cpu_s": [round(t, 2) for t in traversal_cpu],
                      "traversal_whole_volume_s": [t and round(t, 2) for t in whole],
                      "traversal_messages": messages, "traversal_message": message,
                      "server_peak_rss_mb": round(peak, 1),
                      "load_average_start": [round(v, 1) for v in load_start],
                      "load_average_end": [round(v, 1) for v in os.getloadavg()]}


if __name__ == "__main__":
    main()
