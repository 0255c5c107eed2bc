"""report.html in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by selenium), offline, at desktop (1280x900) and phone (390x844) size.

Under CI (`CI` or `FEDKD_CI` set; `.ci/run` sets FEDKD_CI and installs Chromium) a missing or
unlaunchable browser FAILS the test; elsewhere it skips with one line saying what to install.
Full-page screenshots land in tests/artifacts/browser/ (gitignored) for a person to look at.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from report_runs import synthetic_run

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "quickstart.yaml"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "browser"
SIZES = {"desktop": (1280, 900), "phone": (390, 844)}
INSTALL = "apt-get install chromium chromium-driver (Debian's headless browser and its driver)"
UNDER_CI = bool(os.environ.get("CI") or os.environ.get("FEDKD_CI"))


def _unavailable(reason: str) -> None:
    if UNDER_CI:
        pytest.fail(f"browser test under CI: {reason}; {INSTALL}")
    pytest.skip(f"{reason}: {INSTALL}")


@pytest.fixture(scope="module")
def browser() -> Iterator["object"]:
    """One headless Chromium for the module, offline: every host name resolves to nothing."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[dev]')")
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        _unavailable("chromium or chromedriver not found on PATH")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost",
                "--hide-scrollbars", "--window-size=1280,900"):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    except WebDriverException as exc:
        _unavailable(f"Chromium did not start ({str(exc).splitlines()[0]})")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The quickstart's report and a report with a failed client. The failed one is a real run
    (the quickstart config, in process, MLP, 2 rounds, client 3 raising in round 2: the runtime's
    own traceback); the quickstart-shaped one (10 clients, 10 rounds, Dirichlet 0.5) is written
    from numbers, which renders through the same code for a fraction of the time."""
    from fedkd.config import load_config
    from fedkd.report import write_outputs
    from fedkd.testing import InProcessGrid, run_in_process

    base = tmp_path_factory.mktemp("browser")
    quickstart = synthetic_run(base / "quickstart", 10, rounds=10)
    write_outputs(quickstart)
    cfg = load_config(QUICKSTART, ["train.rounds=2", "model.name=mlp", "faults.clients=[3]",
                                   "faults.rounds=[2]", "faults.kind=raise"])
    failed = run_in_process(cfg, base / "failed", InProcessGrid(num_nodes=2))
    return {"quickstart": quickstart / "report.html", "failed": failed / "report.html"}


def _screenshot(driver: "object", path: Path) -> None:
    """The whole page, not only the viewport."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("report", ["quickstart", "failed"])
def test_report_in_chromium(browser: "object", reports: dict[str, Path], report: str, size: str) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    width, height = SIZES[size]
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": size == "phone"})
    driver.get_log("browser"), driver.get_log("performance")  # drop what an earlier page logged
    driver.get(reports[report].as_uri())
    _screenshot(driver, ARTIFACTS / f"{report}-{width}x{height}.png")

    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    import json

    requested = [json.loads(e["message"])["message"]["params"]["request"]["url"]
                 for e in driver.get_log("performance")
                 if '"Network.requestWillBeSent"' in e["message"]]
    assert all(u.startswith(("file:", "data:")) for u in requested), requested  # no network requests
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
    assert len(images) == 3 and all(done and natural > 0 for _, done, natural in images), images
    inner = driver.execute_script("return window.innerWidth")
    page_width = driver.execute_script("return document.documentElement.scrollWidth")
    assert inner == width and page_width <= width  # the page never scrolls sideways
    headline = driver.find_element(By.XPATH, "//td[starts-with(., 'last-round accuracy (example-weighted)')]")
    value = headline.find_element(By.XPATH, "following-sibling::td").text
    assert headline.is_displayed() and 0.0 <= float(value) <= 1.0
    errors_shown = driver.find_elements(By.CSS_SELECTOR, "strong.error")
    if report == "failed":
        (error,) = errors_shown
        assert error.is_displayed() and "InjectedFailure: injected failure: client 3" in error.text
        left = driver.execute_script("return arguments[0].getBoundingClientRect().left", error)
        assert 0 <= left < width - 50  # on screen without scrolling sideways
        assert driver.find_elements(By.CSS_SELECTOR, "tr.failed")
    else:
        assert not errors_shown
