"""Screenshots of the demo for the README, taken in headless Chromium (Debian's chromium and chromium-driver).

    python docs/screenshots.py                 # starts `python app.py` (the proxy), writes docs/demo-1400.png, docs/demo-900.png
    python docs/screenshots.py --url http://127.0.0.1:7860/ --out /tmp/shots   # an app that is already running

For each width it loads the page, picks the first example scene, uploads a scene, asks its question, clicks
Compare with the pre-ticked methods, waits for every card, and saves the whole page. tests/test_app.py drives the
same steps (``compare_in_browser``) and saves its pictures in a temporary folder only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = (1400, 900)


def chromium() -> tuple[str | None, str | None]:
    """Paths of Debian's chromium and chromedriver (None where missing)."""
    browser = next((p for p in (shutil.which(b) for b in ("chromium", "chromium-browser")) if p), None)
    return browser, shutil.which("chromedriver")


def start_driver(width: int, height: int = 2400):
    """A headless Chromium window ``width`` px wide (selenium; the driver path is given, so nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = chromium()
    if browser is None or driver_path is None:
        raise RuntimeError(f"needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver); "
                           f"found chromium={browser}, chromedriver={driver_path}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={width},{height}", "--hide-scrollbars"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def compare_in_browser(driver, url: str, image: str, question: str, n_methods: int = 3, timeout: float = 180) -> dict:
    """Load the page, click the first example (it fills in an expected answer), upload ``image`` (which clears
    it), type ``question``, click Compare and wait for the answers, the cards and the table. Returns what the page
    showed: ``expected_after_example``, ``expected_after_upload``, ``answers`` (lines)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.set_page_load_timeout(60)
    driver.get(url)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#run-btn")
               and d.find_elements(By.CSS_SELECTOR, "#image-in input[type=file]")
               and d.find_elements(By.CSS_SELECTOR, "#question textarea"))
    expected = lambda d: d.find_element(By.CSS_SELECTOR, "#expected textarea").get_attribute("value")  # noqa: E731
    seen = {"expected_after_example": None}
    examples = driver.find_elements(By.CSS_SELECTOR, "#examples tbody tr, #examples .gallery-item, #examples button")
    if examples:
        examples[0].click()
        try:
            WebDriverWait(driver, 20).until(lambda d: expected(d).strip())
        except Exception:  # noqa: BLE001 - reported through the returned value
            pass
        seen["expected_after_example"] = expected(driver)
    driver.find_element(By.CSS_SELECTOR, "#image-in input[type=file]").send_keys(str(image))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-in img"))
    try:
        WebDriverWait(driver, 20).until(lambda d: not expected(d).strip())
    except Exception:  # noqa: BLE001 - reported through the returned value
        pass
    seen["expected_after_upload"] = expected(driver)
    box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "#run-btn").click()
    answers = lambda d: d.find_element(By.CSS_SELECTOR, "#answers textarea").get_attribute("value")  # noqa: E731
    WebDriverWait(driver, timeout).until(lambda d: answers(d).count("\n") >= n_methods)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= n_methods + 1)
    last = answers(driver).splitlines()[-1].split(":")[0]
    wait.until(lambda d: last in d.find_element(By.CSS_SELECTOR, "#results").text)
    time.sleep(1.5)  # let the gallery images and the plot finish painting before a screenshot
    seen["answers"] = answers(driver).splitlines()
    return seen


def save_page(driver, path: Path) -> Path:
    """The whole page (the window grown to the document's height) as a PNG."""
    width = driver.get_window_size()["width"]
    for _ in range(3):  # a taller window can lay the page out taller again (plots size themselves late)
        height = driver.execute_script("return Math.max(document.body.scrollHeight, "
                                       "document.documentElement.scrollHeight)")
        driver.set_window_size(width, min(int(height) + 60, 8000))
        time.sleep(1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path


def scene() -> tuple[str, str]:
    """A proxy-benchmark scene (a counting question) as a PNG in a temporary folder, and its question."""
    import tempfile

    from evals.proxy.scenes import make_sample, render, split_seed

    s = make_sample(split_seed("test", 11), "counting")
    path = Path(tempfile.mkdtemp(prefix="vlprune-shot-")) / "scene.png"
    render(s.scene).save(path)
    return str(path), s.question


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running demo (default: start `python app.py` on a free port)")
    ap.add_argument("--model", default="proxy", help="--model for the app started here (default proxy)")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for demo-<width>.png (default docs/)")
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="window widths (default 1400,900)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    proc = None
    url = args.url
    if url is None:
        port = _free_port()
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", args.model, "--port", str(port)],
                                cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    print(f"screenshots: the app did not start at {url}", file=sys.stderr)
                    return 1
                time.sleep(1)
    try:
        image, question = scene()
        for width in (int(w) for w in args.widths.split(",")):
            driver = start_driver(width)
            try:
                compare_in_browser(driver, url, image, question)
                print(save_page(driver, Path(args.out) / f"demo-{width}.png"))
            finally:
                driver.quit()
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
