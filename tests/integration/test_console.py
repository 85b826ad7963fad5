"""The web console in headless Chromium (Debian's chromium + chromium-driver, Selenium) on the
lab (TLS on, heartbeat TTL 2 s): sign-in is required, the pool figures on the page equal
`sigmactl pool -o json`, an instance page shows its containers, terminations and log tail,
and a killed host shows NotReady within TTL + 2 s without a reload.

With SIGMA_CONSOLE_SHOTS=DIR each page is saved as a PNG there (docs/console-*.png)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import wait_for
from tests.integration.labkit import LabCluster, web

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
SHOTS = os.environ.get("SIGMA_CONSOLE_SHOTS", "")
TTL = 2.0  # the lab's heartbeat TTL (tests.integration.labkit.build_lab)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("needs Debian's chromium and chromium-driver (make deps)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    options.accept_insecure_certs = True  # the lab's CA is not the system's
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, name: str, width: int = 1280) -> None:
    if SHOTS:
        driver.set_window_size(width, 1000)
        time.sleep(0.3)  # (a frame to lay out at the new width; no assertion depends on it)
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SHOTS) / f"console-{name}.png"))
        driver.set_window_size(1280, 1000)


def open_page(driver: Any, lab: LabCluster, page: str) -> None:
    driver.get(f"{lab.lab.server}/ui/#/{page}")


def sign_in(driver: Any, lab: LabCluster, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get("about:blank")  # (a URL that differs only by its #fragment would not load)
    open_page(driver, lab, "pool")
    form = wait_for(lambda: _visible(driver, "signin"), 20, "the sign-in form")
    form.find_element(By.ID, "token").send_keys(token)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def _visible(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, element_id)
    return found[0] if found and found[0].is_displayed() else None


def fetch_status(driver: Any, path: str) -> int:
    """The status of a GET of `path` made by the page (with its cookies)."""
    return int(driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {credentials: 'same-origin'}).then(r => done(r.status))"
        ".catch(() => done(0));", path))


def text(driver: Any, css: str) -> str | None:
    """The text of the first element `css` selects now (the page is drawn again on each
    change: an element found earlier may be gone)."""
    found = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css)
    return None if found is None else str(found)


def page_figures(driver: Any) -> dict[str, dict[str, int | None]]:
    """scope → {"allocatable.cpu_m": value, ...} of every figure cell of the pool page."""
    cells = driver.execute_script(
        "return [...document.querySelectorAll('td[data-figure]')].map(td => "
        "[td.dataset.scope, td.dataset.figure, td.dataset.raw]);")
    out: dict[str, dict[str, int | None]] = {}
    for scope, figure, raw in cells:
        out.setdefault(scope, {})[figure] = int(raw) if raw else None
    return out


def ctl_figures(lab: LabCluster) -> dict[str, dict[str, int | None]]:
    """The same figures from `sigmactl pool -o json`."""
    result = lab.ctl("pool", "-o", "json")
    assert result.returncode == 0, result.stderr
    pool = json.loads(result.stdout)

    def of(summary: dict[str, Any]) -> dict[str, int | None]:
        return {f"{part}.{key}": (summary[part][key] if part in summary else None)
                for part in ("allocatable", "schedulable", "requested", "limits", "used",
                             "free") for key in ("cpu_m", "memory")}

    out = {"overall": of(pool)}
    for label, values in pool["by_label"].items():
        for value, summary in values.items():
            out[f"{label}={value}"] = of(summary)
    return out


def test_the_console_needs_a_sign_in(lab: LabCluster, browser: Any) -> None:
    browser.delete_all_cookies()
    sign_in(browser, lab, "not-the-token-0123456789")
    wait_for(lambda: text(browser, "#signin-error"), 20, "the refusal")
    assert _visible(browser, "signin")
    assert not browser.find_elements("css selector", "td[data-figure]")
    for path in ("/v1/pool", "/v1/console", "/v1/console/history", "/v1/nodes"):
        assert fetch_status(browser, path) == 401, path
    shot(browser, "signin", 420)


def test_pool_figures_equal_sigmactl_pool(lab: LabCluster, browser: Any) -> None:
    lab.apply(web(lab, "shown", 3))
    try:
        lab.running("shown", 3)
        browser.delete_all_cookies()
        sign_in(browser, lab, lab.lab.token)
        wait_for(lambda: browser.find_elements("css selector", "td[data-figure]"), 20,
                 "the pool's figures")
        assert lab.lab.token not in browser.current_url
        assert fetch_status(browser, "/v1/pool") == 200  # the session cookie reads
        labels = [b.get_attribute("data-label") for b in
                  browser.find_elements("css selector", "button[data-label]")]
        assert labels, "no label to group the pool by"
        for label in labels:  # (the page is drawn again on each change: find it anew)
            browser.execute_script(
                "document.querySelector(`button[data-label='${arguments[0]}']`).click();", label)
            # the page and sigmactl agree once both saw the same revision (the pool is live)
            wait_for(lambda: _agree(page_figures(browser), ctl_figures(lab)), 20,
                     "the page's figures equal sigmactl pool -o json")
        shot(browser, "pool")
        shot(browser, "pool-phone", 420)
        open_page(browser, lab, "nodes")
        wait_for(lambda: len(browser.find_elements("css selector", "a.chip")) >= 3, 20,
                 "the nodes with their instances")
        shot(browser, "nodes")
    finally:
        lab.delete("shown")


def _agree(page: dict[str, dict[str, int | None]], ctl: dict[str, dict[str, int | None]]
           ) -> bool:
    shown = {scope: figs for scope, figs in ctl.items() if scope in page}
    assert "overall" in page and len(page) >= 2, page
    return page == shown


def test_an_instance_page_shows_containers_terminations_and_log_tail(
        lab: LabCluster, browser: Any) -> None:
    spec = web(lab, "crashy", 1)
    spec["containers"][0]["command"] = ["sh", "-c", "echo starting up; sleep 2; "
                                        "echo giving up >&2; exit 1"]
    spec["containers"][0].pop("ready")
    lab.apply(spec)
    try:
        browser.delete_all_cookies()
        sign_in(browser, lab, lab.lab.token)
        wait_for(lambda: browser.find_elements("css selector", "td[data-figure]"), 20,
                 "signed in")
        open_page(browser, lab, "instances/default/crashy-0")
        wait_for(lambda: browser.find_elements("css selector", "tr[data-container=main]"), 30,
                 "the container row")
        wait_for(lambda: browser.find_elements("css selector", "tr[data-termination=main]"),
                 60, "a termination of the container that exits 1")
        logs = wait_for(lambda: text(browser, "pre[data-logs=main]") not in (None, "…")
                        and text(browser, "pre[data-logs=main]"), 20, "the log tail")
        if "no log tail" not in logs:  # the logs route (branch observe) is here
            wait_for(lambda: "starting up" in (text(browser, "pre[data-logs=main]") or ""),
                     30, "the container's output")
        shot(browser, "instance")
        open_page(browser, lab, "apps/default/crashy")
        wait_for(lambda: browser.find_elements("css selector", "tr[data-instance=crashy-0]"),
                 20, "the app's instances")
        shot(browser, "app")
        open_page(browser, lab, "events")
        wait_for(lambda: browser.find_elements("css selector", "tr.ev-Warning, tr.ev-Normal"),
                 20, "events")
        shot(browser, "events")
    finally:
        lab.delete("crashy")


def test_a_killed_host_shows_not_ready_without_a_reload(lab: LabCluster, browser: Any) -> None:
    browser.delete_all_cookies()
    sign_in(browser, lab, lab.lab.token)
    wait_for(lambda: browser.find_elements("css selector", "td[data-figure]"), 20, "signed in")
    open_page(browser, lab, "nodes")
    wait_for(lambda: browser.find_elements(
        "css selector", "[data-node=h3][data-status=Ready]"), 30, "h3 Ready on the page")
    browser.execute_script("window.sigmaNoReload = 1;")
    killed = time.monotonic()
    lab.lab.kill_host("h3")
    try:
        wait_for(lambda: browser.find_elements(
            "css selector", "[data-node=h3][data-status=NotReady]"), 30,
            "h3 NotReady on the page", 0.05)
        took = time.monotonic() - killed
        assert browser.execute_script("return window.sigmaNoReload;") == 1  # same page
        assert took <= TTL + 2, f"NotReady shown {took:.1f}s after the kill"
        shot(browser, "nodes-notready")
    finally:
        lab.lab.heal("h3")
    wait_for(lambda: browser.find_elements(
        "css selector", "[data-node=h3][data-status=Ready]"), 90, "h3 Ready again")
