"""The status page in a real headless Chromium (Debian's chromium + chromium-driver) against
a real three-node cluster with its backends: sign in with the bootstrap token, see the three
members, the leader and every backend; then `halb backend drain` from the CLI and see the
backend's admin state and the drain event change on the page without a reload; sign out.

HALB_STATUS_PAGE_SCREENSHOT=docs/status-page.png (`make status-page-screenshot`) also saves
what the browser shows after the drain; a normal run writes no file outside its tmp dir.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.integration.browser import WINDOW, chromium
from tests.integration.status_page_client import origin_of

pytestmark = pytest.mark.timeout(150)
WAIT_S = 15  # every wait below is bounded by this


def _wait(driver: Any, predicate: Any, message: str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(predicate, message)
    except TimeoutException:  # say what the browser showed instead
        raise AssertionError(f"timed out after {WAIT_S}s waiting for {message}; the browser is at "
                             f"{driver.current_url}:\n{driver.page_source[:3000]}") from None


def _attr_map(driver: Any, selector: str, key: str, value: str) -> dict[str, str]:
    """{element[key]: element[value]} for every element matching selector, read in one call
    (the page replaces its elements every second, so no element handle outlives a poll)."""
    return driver.execute_script(
        "var sel = arguments[0], key = arguments[1], value = arguments[2], out = {};"
        "document.querySelectorAll(sel).forEach(function (el) { out[el.getAttribute(key)] = el.getAttribute(value); });"
        "return out;",
        selector, key, value)


def test_status_page_in_chromium_shows_cluster_and_a_live_drain(cluster_factory: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    # each backend on its own failure domain, as in the demo, so the resilience verdict has something to say
    c = cluster_factory(run_backends=True, backend_options={b: {"server": f"server-{b.lower()}"} for b in "ABC"})
    origin = origin_of(c.api("n1"))
    leader = c.leader()
    backends = sorted(name for name, _ in c.spec.backends)
    with chromium(origin, tmp_path) as driver:
        driver.get(origin.url + "/ui")
        field = _wait(driver, lambda d: d.find_element(By.ID, "token"), "the login form")
        assert not driver.find_elements(By.ID, "live")
        field.send_keys(c.token)
        driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
        _wait(driver, lambda d: d.find_elements(By.ID, "live"), "the status page after signing in")
        assert c.token not in driver.page_source
        assert driver.execute_script("return document.cookie;") == ""  # HttpOnly: no script reads the token

        # three members with their roles, the leader, every backend (healthy once checked)
        roles = _wait(driver, lambda d: (lambda m: m if len(m) == 3 and "leader" in m.values() else None)(
            _attr_map(d, "tr[data-member]", "data-member", "data-role")), "three members, one leader")
        assert sorted(roles) == ["n1", "n2", "n3"], roles
        assert [n for n, r in roles.items() if r == "leader"] == [leader], roles
        assert driver.find_element(By.ID, "leader").get_attribute("data-leader") == leader
        verdicts = _wait(driver, lambda d: (lambda v: v if sorted(v) == [f"checkout/{b}" for b in backends]
                                            and set(v.values()) == {"up"} else None)(
            _attr_map(d, "tr[data-backend]", "data-backend", "data-verdict")), "every backend listed and up")
        assert set(verdicts.values()) == {"up"}
        states = _attr_map(driver, "tr[data-backend]", "data-backend", "data-admin-state")
        assert states["checkout/A"] == "active", states

        # a drain from the CLI shows up live: no reload (the marker set in this document survives)
        driver.execute_script("window.halbNoReload = 'same-document';")
        c.cli("backend", "drain", "A")
        _wait(driver, lambda d: _attr_map(d, "tr[data-backend]", "data-backend", "data-admin-state")
              .get("checkout/A") == "drain", "checkout/A shown as drained")
        drained = _wait(driver, lambda d: [t for k, t in _event_rows(d) if k == "backend.drain"],
                        "the drain event in the latest events")
        assert any("checkout/A" in t and "drain" in t for t in drained), drained
        assert driver.execute_script("return window.halbNoReload;") == "same-document"
        assert driver.find_element(By.ID, "refresh").text == "live"

        shot = os.environ.get("HALB_STATUS_PAGE_SCREENSHOT")
        if shot:  # exactly WINDOW, whatever the headless window's decorations take
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False})
            driver.execute_script("window.scrollTo(0, 0);")
            Path(shot).write_bytes(driver.get_screenshot_as_png())

        # signing out (a same-site post the CSRF check must let through) ends the session
        driver.find_element(By.CSS_SELECTOR, "header form button[type=submit]").click()
        _wait(driver, lambda d: d.find_elements(By.ID, "token"), "the login form after signing out")
        assert driver.execute_async_script(
            "var done = arguments[arguments.length - 1];"
            "fetch('/ui/live', {credentials: 'same-origin'}).then(function (r) { done(r.status); });") == 401


def _event_rows(driver: Any) -> list[tuple[str, str]]:
    return [tuple(x) for x in driver.execute_script(
        "return Array.from(document.querySelectorAll('#events tr[data-kind]')).map(function (tr) {"
        " return [tr.getAttribute('data-kind'), tr.textContent]; });")]
