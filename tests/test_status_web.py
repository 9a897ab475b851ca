"""The status node's web page (roles/web.py), without a swarm: a fixture snapshot of two runs is
published and read back over HTTP and in headless Chromium.

Every string a peer controls carries markup here; the page must show it as text and run none of it.
The HTTP checks cover what the server promises: one serialization and one chart drawing per change
(ETag and 304 for the rest), 404/405, the security headers, and connections that are bounded in
number and in time (idle, trickling and non-reading clients are closed; a normal client is served).
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from roles.web import StatusWeb
from tests.browser import chromium, colour_pixels, console_errors, element_image, screenshot, wait_until

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
BOLD = "<b>bold</b>"
KEY_A = "a1" * 16
KEY_B = "b2" * 16
PEER_A = "12D3KooWAlicePeerIdXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
PEER_B = "12D3KooWBobPeerIdYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYY"
PEER_EVIL = "12D3KooW" + HOSTILE
NOW = time.time()


def snapshot(now: float = NOW) -> dict:
    """Two runs on one DHT: a busy one (4 experts and a router, a chart, servers, peers, a ledger of
    two keys, refusals and bans with markup in every field a peer fills) and one with nothing yet."""
    jobs = [
        {
            "job": "expert_0", "target": 2000, "done": False, "owner": PEER_A, "owner_key": KEY_A, "since": now - 600,
            "step": 1200, "loss": 0.3123, "samples_per_s": 41.5, "step_age_s": 2.4, "pending": 1,
            "refused": [{"step": 900, "sha256": "c3" * 32, "owner": KEY_B, "reason": HOSTILE}],
            "checkpoint": {
                "step": 1000, "sha256": "d4" * 32, "size": 123456, "age_s": 95.0, "providers": [PEER_A, PEER_B],
                "verdicts": [
                    {"verifier": KEY_B, "ok": True, "loss": 0.2931, "reason": "", "t": now - 80},
                    {"verifier": "e5" * 16, "ok": False, "loss": None, "reason": BOLD, "t": now - 70},
                ],
            },
        },
        {
            "job": "expert_1", "target": 2000, "done": True, "owner": PEER_B, "owner_key": KEY_B, "since": now - 900,
            "step": 2000, "loss": 0.2811, "samples_per_s": 0.0, "step_age_s": 300.0, "pending": 0, "refused": [],
            "checkpoint": {"step": 2000, "sha256": "f6" * 32, "size": 1, "age_s": 290.0, "providers": [PEER_B],
                           "verdicts": [{"verifier": KEY_A, "ok": True, "loss": 0.27, "reason": "", "t": now}]},
        },
        {"job": "expert_2", "target": 2000, "done": False, "owner": None, "owner_key": None, "since": None,
         "step": 0, "loss": None, "samples_per_s": 0.0, "step_age_s": None, "pending": 0, "refused": [],
         "checkpoint": None},
        {"job": "router", "target": 120, "done": False, "owner": PEER_EVIL, "owner_key": KEY_B, "since": now - 60,
         "step": 30, "loss": 1.25, "samples_per_s": 90.0, "step_age_s": 1.0, "pending": 0, "refused": [],
         "checkpoint": None},
    ]  # fmt: skip
    history = {
        "expert_0": {
            "train": [[s, 1.0 / (1 + s / 200)] for s in range(0, 1201, 20)],
            "heldout": [[500, 0.45], [1000, 0.33]],
        },
        "expert_1": {"train": [[s, 1.2 / (1 + s / 300)] for s in range(0, 2001, 50)], "heldout": [[2000, 0.27]]},
        "router": {"train": [[s, 2.0 - s / 40] for s in range(0, 31)], "heldout": []},
    }
    busy = {
        "ref": "demo@" + KEY_A, "name": "demo", "owner": KEY_A, "manifest_sha256": "9a" * 32, "num_clusters": 4,
        "presets": ["tiny", "tiny-text"], "objectives": ["fm", "ddpm"], "expert_steps": 2000, "router_steps": 120,
        "admission": "allowlist", "allowed": 3, "complete": False, "jobs": jobs,
        "servers": [
            {"expert": 1, "peer": PEER_B, "state": "online", "rps": 1.5, "queue": 2, "step": 2000, "ckpt": "f6" * 32,
             "max_batch": 16, "reach": "direct"},
            {"expert": 1, "peer": PEER_EVIL, "state": HOSTILE, "rps": 0.0, "queue": 0, "step": 2000,
             "ckpt": "f6" * 32, "max_batch": 16, "reach": HOSTILE},
        ],
        "peers": [
            {"peer": PEER_A, "role": "trainer", "state": "training", "job": "expert_0", "step": 1200, "loss": 0.31,
             "samples_per_s": 41.5, "bans": [], "reach": "direct"},
            {"peer": PEER_B, "role": "server", "state": "serving", "job": None, "step": None, "loss": None,
             "samples_per_s": None, "bans": [f"{KEY_B[:8]}: {HOSTILE}"], "reach": "relayed"},
            {"peer": PEER_EVIL, "role": BOLD, "state": HOSTILE, "job": HOSTILE, "step": "many", "loss": "NaN",
             "samples_per_s": None, "bans": [HOSTILE], "reach": "unreachable"},
        ],
        "history": history,
        "ledger": {
            "digest": "7b" * 32, "entries": 12, "checked": True, "problems": [HOSTILE], "total_steps": 300,
            "total_flops": 1.2e15,
            "contributors": [
                {"key": KEY_A, "steps": 200, "samples": 1600, "flops": 7.92e14, "share": 0.66, "first": now - 3600,
                 "last": now - 60, "jobs": {"expert_0": {"steps": 200, "samples": 1600}}},
                {"key": KEY_B, "steps": 100, "samples": 800, "flops": 4.08e14, "share": 0.34, "first": now - 1800,
                 "last": now - 30, "jobs": {"expert_1": {"steps": 90, "samples": 720},
                                            "router": {"steps": 10, "samples": 80}}},
            ],
        },
    }  # fmt: skip
    empty = {
        "ref": "<i>second</i>@" + KEY_B, "name": "<i>second</i>", "owner": KEY_B, "manifest_sha256": "11" * 32,
        "num_clusters": 2, "presets": ["tiny"], "objectives": ["fm"], "expert_steps": 0, "router_steps": 0,
        "admission": "open", "allowed": 0, "complete": False,
        "jobs": [{"job": "expert_0", "target": 0, "done": False, "owner": None, "owner_key": None, "since": None,
                  "step": 0, "loss": None, "samples_per_s": 0.0, "step_age_s": None, "pending": 0, "refused": [],
                  "checkpoint": None}],
        "servers": [], "peers": [], "history": {}, "ledger": None,
    }  # fmt: skip
    return {"time": now, "self": "12D3KooWStatusNodeZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ", "bans": [HOSTILE, BOLD],
            "runs": [busy, empty]}  # fmt: skip


@pytest.fixture(autouse=True)
def _seed_torch():
    """Nothing here uses torch: conftest's fixture of this name would import it (seconds) for nothing."""


@pytest.fixture
def web():
    page = StatusWeb("127.0.0.1", 0, chart_every=0.0)
    page.start()
    try:
        yield page
    finally:
        page.stop()


def get(url: str, headers: dict | None = None, method: str = "GET", timeout: float = 10.0):
    """(status, headers, body) of one request; an HTTP error status is returned, not raised."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def set_visibility(driver, state: str) -> None:
    """Tell the page it is ``state`` ("hidden" or "visible"), as the browser does when a tab is switched."""
    driver.execute_script(
        "Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => arguments[0]});"
        "document.dispatchEvent(new Event('visibilitychange'));",
        state,
    )


def loaded(driver, img) -> int:
    """The natural width of an <img> once it has loaded (0 before, or if it failed)."""
    return driver.execute_script("return arguments[0].complete ? arguments[0].naturalWidth : 0", img)


SECURITY = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def assert_secured(headers) -> None:
    for name, value in SECURITY.items():
        assert headers.get(name, "").startswith(value), (name, headers.get(name))


@pytest.mark.timeout(120)
def test_the_page_shows_the_swarm_and_runs_no_peer_markup(web, tmp_path):
    web.publish(snapshot())
    with chromium(tmp_path) as driver:
        from selenium.webdriver.common.by import By

        driver.get(web.url + "/")
        wait_until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "table.jobs tr[data-job=expert_0]"), what="jobs")
        runs = driver.find_elements(By.CSS_SELECTOR, "section.run")
        assert len(runs) == 2
        busy, empty = runs
        jobs = {r.get_attribute("data-job"): r.text for r in busy.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr")}
        assert set(jobs) == {"expert_0", "expert_1", "expert_2", "router"}
        assert "1,200 / 2,000" in jobs["expert_0"] and "0.3123" in jobs["expert_0"], jobs["expert_0"]
        assert "step 1,000" in jobs["expert_0"] and "2 providers" in jobs["expert_0"]
        assert "ok" in jobs["expert_0"] and "0.2931" in jobs["expert_0"] and BOLD in jobs["expert_0"]
        assert "done" in jobs["expert_1"] and "unclaimed" in jobs["expert_2"]
        facts = busy.find_element(By.CSS_SELECTOR, "dl.facts").text
        assert "allowlist of 3" in facts and "tiny, tiny-text" in facts
        assert "experts 2,000 steps · router 120 steps" in facts
        assert "no target" in empty.find_element(By.CSS_SELECTOR, "dl.facts").text

        # The charts: the busy run's has its series' colours, the empty run's is the "nothing yet" one (greys).
        chart = driver.find_element(By.ID, "chart-0")
        wait_until(driver, lambda d: loaded(d, chart), what="the chart")
        assert driver.execute_script("return arguments[0].naturalWidth", chart) == 640
        assert colour_pixels(element_image(chart)) > 500
        nothing = driver.find_element(By.ID, "chart-1")
        wait_until(driver, lambda d: loaded(d, nothing), what="the empty run's chart")
        assert colour_pixels(element_image(nothing)) == 0

        row = busy.find_element(By.CSS_SELECTOR, f"table.ledger tr[data-key='{KEY_A}']")
        assert "66.0 %" in row.text and "200 / 1,600" in row.text, row.text
        assert "34.0 %" in busy.find_element(By.CSS_SELECTOR, f"table.ledger tr[data-key='{KEY_B}']").text
        assert "checked out" in busy.find_element(By.CSS_SELECTOR, ".ledger-sum").text
        servers = busy.find_element(By.CSS_SELECTOR, "table.servers").text
        assert "direct" in servers and "1.5" in servers

        # Peers' markup is text: shown literally, never parsed, never run.
        assert HOSTILE in busy.find_element(By.CSS_SELECTOR, "ul.refused").text
        assert HOSTILE in busy.find_element(By.CSS_SELECTOR, "ul.peer-bans").text
        assert HOSTILE in driver.find_element(By.ID, "bans").text and BOLD in driver.find_element(By.ID, "bans").text
        peers = busy.find_element(By.CSS_SELECTOR, "table.peers").text
        assert BOLD in peers and HOSTILE in peers
        assert HOSTILE[:40] + "…" in servers  # a state or reach is a word: a long one is cut, still as text
        assert "<i>second</i>" in empty.find_element(By.TAG_NAME, "h2").text
        assert driver.execute_script("return typeof window.pwned") == "undefined"
        assert not driver.find_elements(By.CSS_SELECTOR, "main b, main i, main img[src='x'], main script")
        assert len(driver.find_elements(By.TAG_NAME, "script")) == 1
        assert console_errors(driver) == []  # no script error, no load blocked by the CSP, no failed load
        screenshot(driver, tmp_path / "status.png")
        assert (tmp_path / "status.png").stat().st_size > 10_000

        # Left alone, the page asks every 3 s and is told 304 (nothing rebuilt, nothing sent); hidden, it
        # asks nothing; shown again, it asks at once. (Headless Chromium is never hidden by itself: the
        # page is told so as a browser would tell it, by visibilityState and a visibilitychange event.)
        def polls() -> int:
            return web.answered["status", 200] + web.answered["status", 304]

        fresh = web.answered["status", 200]
        seen = web.answered["status", 304]
        wait_until(driver, lambda d: web.answered["status", 304] > seen, 8, "a poll answered 304")
        assert web.answered["status", 200] == fresh
        set_visibility(driver, "hidden")
        time.sleep(0.5)  # a poll already in flight may still land
        asked = polls()
        time.sleep(4)
        assert polls() == asked, "a hidden page kept polling"
        set_visibility(driver, "visible")
        wait_until(driver, lambda d: polls() > asked, 1.5, "a poll as soon as the page is visible again")

        web.publish({"time": time.time(), "self": "x", "bans": [], "runs": []})
        wait_until(driver, lambda d: "no run published yet" in d.find_element(By.ID, "runs").text, 10, "the empty page")
        assert not driver.find_elements(By.CSS_SELECTOR, "section.run")


@pytest.mark.timeout(60)
def test_http_etags_errors_and_headers(web):
    web.publish(snapshot())
    status, headers, body = get(web.url + "/api/status")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert_secured(headers)
    data = json.loads(body)
    assert [r["name"] for r in data["runs"]] == ["demo", "<i>second</i>"] and len(data["chart_etags"]) == 2
    etag = headers["ETag"]
    assert get(web.url + "/api/status", {"If-None-Match": etag})[0] == 304
    status, zipped, zbody = get(web.url + "/api/status", {"Accept-Encoding": "gzip"})
    assert zipped["Content-Encoding"] == "gzip" and gzip.decompress(zbody) == body
    # A NaN loss (a diverged trainer) is null: the browser's JSON.parse rejects NaN.
    nan = snapshot()
    nan["runs"][0]["jobs"][0]["loss"] = float("nan")
    web.publish(nan)
    status, headers, body = get(web.url + "/api/status", {"If-None-Match": etag})
    assert status == 200 and headers["ETag"] != etag and json.loads(body)["runs"][0]["jobs"][0]["loss"] is None

    ledger = json.loads(get(web.url + "/api/ledger")[2])
    assert ledger["time"] == NOW and ledger["runs"][0]["ref"] == "demo@" + KEY_A
    assert ledger["runs"][0]["ledger"]["contributors"][0]["share"] == 0.66 and ledger["runs"][1]["ledger"] is None

    status, headers, png = get(web.url + "/chart/0.png")
    assert status == 200 and headers["Content-Type"] == "image/png" and png.startswith(b"\x89PNG")
    assert_secured(headers)
    assert get(web.url + "/chart/0.png", {"If-None-Match": headers["ETag"]})[0] == 304
    assert get(web.url + "/chart/2.png")[0] == 404
    for path in ("/nope", "/static/../roles/web.py", "/static/status.html", "/api", "/chart/x.png", "/chart/0.svg"):
        status, headers, _ = get(web.url + path)
        assert status == 404, path
        assert_secured(headers)
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        status, headers, _ = get(web.url + "/api/status", method=method)
        assert status == 405, method
        assert_secured(headers)
    assert get(web.url + "/nope", method="POST")[0] == 405
    status, headers, body = get(web.url + "/", method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Type"].startswith("text/html")
    for path in ("/", "/static/status.js", "/static/status.css", "/static/favicon.svg"):
        status, headers, body = get(web.url + path)
        assert status == 200 and body and headers["ETag"], path
        assert get(web.url + path, {"If-None-Match": headers["ETag"]})[0] == 304, path


@pytest.mark.timeout(60)
def test_a_chart_is_drawn_once_per_change_of_its_history(web):
    web.publish(snapshot())
    with ThreadPoolExecutor(12) as pool:  # twelve tabs asking at once share one drawing
        answers = list(pool.map(lambda _: get(web.url + "/chart/0.png"), range(12)))
    assert {a[0] for a in answers} == {200} and len({a[2] for a in answers}) == 1
    assert web.renders == 1
    web.publish(snapshot(now=NOW + 2))  # a new snapshot, the same history: the same chart
    assert get(web.url + "/chart/0.png")[2] == answers[0][2] and web.renders == 1
    changed = snapshot(now=NOW + 4)
    changed["runs"][0]["history"]["expert_0"]["train"].append([1220, 0.14])
    web.publish(changed)
    for _ in range(3):
        status, _, png = get(web.url + "/chart/0.png")
        assert status == 200 and png != answers[0][2]
    assert web.renders == 2
    # A history that moves every snapshot is drawn anew at most every chart_every seconds.
    web.chart_every = 3600.0
    moved = snapshot(now=NOW + 5)
    moved["runs"][0]["history"]["expert_0"]["train"].append([1230, 0.13])
    web.publish(moved)
    assert get(web.url + "/chart/0.png")[2] == png and web.renders == 2
    web.chart_every = 0.0
    # Peers' numbers that are not numbers are skipped, not drawn and not raised.
    bad = snapshot(now=NOW + 6)
    bad["runs"][0]["history"] = {"$\\frac{": {"train": [["a", 1], [1, None], [2, float("inf")], [3, 0.5], 7]}, "_x": 3}
    web.publish(bad)
    status, _, png = get(web.url + "/chart/0.png")
    assert status == 200 and png.startswith(b"\x89PNG")


def _closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closed ``sock`` (EOF or reset), or None if it was still open after
    ``timeout`` s. Whatever the server sent first is read and dropped."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < timeout:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:  # reset
            return time.monotonic() - start
    return None


@pytest.mark.timeout(90)
def test_connections_are_bounded_in_number_and_time(tmp_path):
    page = StatusWeb("127.0.0.1", 0, max_connections=4, idle_timeout=1.5, write_timeout=3.0)
    url = page.start()
    port = int(url.rsplit(":", 1)[1])
    socks: list[socket.socket] = []

    def connect() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks.append(s)
        return s

    try:
        page.publish(snapshot())
        # Four idle sockets (sending nothing) take every place; a fifth is refused at once, a
        # normal client too, and the node's publish does not notice any of it.
        idle = [connect() for _ in range(4)]
        time.sleep(0.3)
        assert page.connections == 4
        extra = connect()
        assert (_closed_within(extra, 1.0) or 99) < 1.0
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            get(url + "/api/status", timeout=5)
        assert page.refused >= 2
        start = time.monotonic()
        page.publish(snapshot(now=NOW + 1))
        assert time.monotonic() - start < 0.5
        # The idle ones are closed after idle_timeout; then a normal client is served.
        for s in idle:
            assert (_closed_within(s, 5.0) or 99) < 3.5
        status, _, body = get(url + "/api/status", timeout=5)
        assert status == 200 and json.loads(body)["time"] == NOW + 1

        # Slowloris: a request trickled a byte at a time is closed at the same deadline.
        slow = connect()
        start, closed = time.monotonic(), None
        for byte in b"GET /api/status HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            try:
                slow.send(bytes([byte]))
            except OSError:
                closed = time.monotonic() - start
                break
            time.sleep(0.05)
        closed = closed or _closed_within(slow, 3.0)
        assert closed is not None and closed < 3.5, closed

        # A client that asks and never reads is aborted once its answers sit unsent write_timeout s:
        # 400 charts (12 MB) outgrow the kernel's buffers, so the answers back up in the server's
        # own; its idle timer (1.5 s) never fires, for the connection is busy writing, not idle.
        assert get(url + "/chart/0.png", timeout=30)[0] == 200  # drawn now: the clock below times the stall alone
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", port))
        socks.append(reader)
        reader.sendall(b"GET /chart/0.png HTTP/1.1\r\nHost: x\r\n\r\n" * 400)
        start = time.monotonic()
        while not page.connections and time.monotonic() - start < 5:  # the server has it: then measure
            time.sleep(0.02)
        while page.connections and time.monotonic() - start < 15:
            time.sleep(0.1)
        assert page.connections == 0, "a client that never reads still holds its place"
        assert 3.0 <= time.monotonic() - start < 6.0
        assert get(url + "/api/status", timeout=5)[0] == 200

        # stop() returns promptly with clients still connected, and the port is closed after it.
        held = [connect() for _ in range(3)]
        start = time.monotonic()
        page.stop()
        assert time.monotonic() - start < 5
        for s in held:
            assert _closed_within(s, 2.0) is not None
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        for s in socks:
            s.close()
        page.stop()


def test_the_page_never_parses_a_string_as_markup():
    """The page's script has no way to turn a peer's string into markup or code, and the page no
    inline script or style (the CSP would block it, so it would also be a broken page)."""
    static = Path(__file__).resolve().parent.parent / "roles" / "static"
    script = (static / "status.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function(", "srcdoc"):
        assert sink not in script, sink
    assert "setAttribute(name" in script  # the one attribute setter: names chosen by the page (data-*)
    html = (static / "status.html").read_text()
    assert "<style" not in html and not re.search(r"<[^>]*\s(style|on[a-z]+)\s*=", html)
    assert html.count("<script") == 1 and 'src="/static/status.js"' in html


def test_start_reports_a_port_in_use():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        page = StatusWeb("127.0.0.1", taken.getsockname()[1])
        with pytest.raises(OSError):
            page.start()
        page.stop()
    finally:
        taken.close()


def save_page(path: Path) -> None:
    """Publish the fixture snapshot and photograph the page (to look at it: python -m tests.test_status_web)."""
    import tempfile

    page = StatusWeb()
    page.start()
    try:
        page.publish(snapshot())
        with tempfile.TemporaryDirectory() as tmp, chromium(Path(tmp)) as driver:
            from selenium.webdriver.common.by import By

            driver.get(page.url + "/")
            wait_until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "table.jobs tr"), what="the jobs")
            chart = driver.find_element(By.ID, "chart-0")
            wait_until(driver, lambda d: loaded(d, chart), what="the chart")
            screenshot(driver, path)
    finally:
        page.stop()


if __name__ == "__main__":
    save_page(Path("/tmp/status_page.png"))
    print("saved /tmp/status_page.png")
