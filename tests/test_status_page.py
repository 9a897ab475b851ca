"""The status node on a real swarm: its JSON when no run is published yet, and its web page opened
in headless Chromium while a preparer verifies a trainer's checkpoints and a stranger publishes a
presence record full of markup."""

from __future__ import annotations

import json

from roles.web import CHART_EVERY_S
from swarm import claims
from swarm.dht import SwarmConfig, SwarmNode
from swarm.records import PeerRecord, fingerprint, peers_key
from tests.browser import chromium, colour_pixels, console_errors, element_image, screenshot, wait_until
from tests.conftest import LOOPBACK, kill_tree, node, spawn, start_serving_preparer, wait_for, wait_in_log

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'


def _snapshot() -> dict:
    job = {"job": "expert_0", "target": 10, "done": False, "owner": "QmTrainer", "owner_key": "a" * 32, "since": 1.0,
           "step": 4, "loss": 0.5, "samples_per_s": 3.0, "step_age_s": 1.0, "pending": 0,
           "refused": [{"step": 3, "sha256": "b" * 64, "owner": "c" * 32, "reason": "[red]loud[/] " + HOSTILE}],
           "checkpoint": {"step": 4, "sha256": "d" * 64, "size": 1, "age_s": 2.0, "providers": ["QmTrainer"],
                          "verdicts": []}}  # fmt: skip
    peer = {"peer": "QmStranger", "role": "[bold]x[/]", "state": "idle", "job": "", "step": 0, "loss": 0.0,
            "samples_per_s": 0.0, "bans": ["[link=x]y[/]"], "reach": "relayed"}  # fmt: skip
    book = {"digest": None, "checked": None, "problems": [], "entries": 1, "total_steps": 4, "total_samples": 32,
            "total_flops": 1.0, "contributors": [{"key": "a" * 32, "steps": 4, "samples": 32, "flops": 1.0,
            "share": 1.0, "first": 1.0, "last": 2.0, "jobs": {"expert_0": {"steps": 4, "samples": 32}}}]}  # fmt: skip
    run = {"ref": "demo@" + "e" * 32, "name": "demo", "owner": "e" * 32, "admission": "open", "allowed": 0,
           "manifest_sha256": "f" * 64, "num_clusters": 2, "objectives": ["fm", "fm"], "presets": ["tiny", "tiny"],
           "expert_steps": 10, "router_steps": 2, "complete": False, "jobs": [job], "servers": [], "peers": [peer],
           "history": {}, "ledger": book}  # fmt: skip
    return {"time": 1.0, "self": "QmMe", "bans": [], "runs": [run]}


def test_the_terminal_dashboard_shows_peers_words_as_they_are():
    from rich.console import Console

    from roles.status import render

    console = Console(record=True, width=250)
    console.print(render(_snapshot()))
    text = console.export_text()
    for said in ("[red]loud[/]", HOSTILE, "[bold]x[/]", "[link=x]y[/]"):
        assert said in text, said
    row = next(line for line in text.splitlines() if "QmStranger" in line)
    assert "relayed" in row and "idle" in row
    assert "100.0%" in text and "a" * 16 in text  # the ledger's one contributor


def test_no_run_yet_is_an_empty_list_and_exit_0(tmp_path):
    """A script watching a new swarm can tell "nothing yet" from a failure."""
    boot = SwarmNode(SwarmConfig(str(tmp_path / "boot"), host_maddrs=[LOOPBACK]))
    try:
        out = node("--role", "status", "--once", "--json", "--workdir", str(tmp_path / "status"),
                   "--initial-peers", *boot.maddrs(), "--host-maddrs", LOOPBACK, timeout=120)  # fmt: skip
        data = json.loads(out.stdout)
        assert data["runs"] == [] and data["self"]
        text = node("--role", "status", "--once", "--workdir", str(tmp_path / "status"),
                    "--initial-peers", *boot.maddrs(), "--host-maddrs", LOOPBACK, timeout=120)  # fmt: skip
        assert "no run published yet" in text.stdout
    finally:
        boot.shutdown()


def test_the_status_page_in_a_browser_shows_jobs_loss_ledger_and_peers_words_as_text(small_run, tmp_path):
    procs: list = []
    peers, observer, _, _ = start_serving_preparer(small_run, tmp_path, procs)
    try:
        # A trainer takes expert_0 from the preparer's step 6 to step 10.
        t_log = tmp_path / "trainer.log"
        procs.append(
            spawn(
                ["--role", "trainer", "--workdir", str(tmp_path / "t"), "--expert", "0", "--steps", "10"]
                + ["--batch-size", "8", "--ckpt-every", "2", "--heartbeat", "2"]
                + ["--initial-peers", *peers, "--host-maddrs", LOOPBACK],
                t_log,
            )
        )
        # A stranger's presence: its role and its ban lines are its own words.
        stranger = PeerRecord(observer.peer_id, "<b>bold</b>", "idle", bans=[HOSTILE])
        assert observer.store(peers_key(), stranger, 600)
        web_log = tmp_path / "web.log"
        web = spawn(
            ["--role", "status", "--web", "127.0.0.1:0", "--workdir", str(tmp_path / "web")]
            + ["--initial-peers", *peers, "--host-maddrs", LOOPBACK],
            web_log,
        )
        procs.append(web)
        url = wait_in_log(web, web_log, "watch the swarm at ", 120, "the web status node")
        url = url.split("watch the swarm at ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:")

        run = wait_for(observer.run, 60, "the run record")

        def trainer_key():
            owner = claims.winner(observer.snapshot(run, ["expert_0"]), "expert_0")
            return fingerprint(owner) if owner is not None else None

        trainer = wait_for(trainer_key, 120, "the trainer's claim", logs=(t_log,))

        with chromium(tmp_path) as driver:
            driver.get(url)
            row = f"table.ledger tr[data-key='{trainer}']"
            # Once the preparer has verified one of the trainer's checkpoints (8 or 10).
            wait_until(driver, lambda d: d.find_elements("css selector", row), 300, "the trainer's ledger row")
            jobs = driver.find_elements("css selector", "table.jobs tr[data-job]")
            assert {j.get_attribute("data-job") for j in jobs} == {"expert_0", "expert_1", "router"}
            assert "%" in driver.find_element("css selector", row).text
            chart = driver.find_element("css selector", "img.chart")
            wait_until(driver, lambda d: d.execute_script("return arguments[0].naturalWidth", chart), 30, "the chart")
            history = driver.execute_script("return fetch('/api/status').then(r => r.json())")["runs"][0]["history"]
            assert any(h["train"] or h["heldout"] for h in history.values()), history
            # The points the page's data holds are drawn: a run with none gets a grey "no loss yet" image, and
            # a few held-out markers (a trainer that finished fast) are some tens of coloured pixels. A chart
            # is drawn anew at most every CHART_EVERY_S and the page polls, so the image may lag the data by
            # that much: the page must catch up on its own, without a reload.
            lag = CHART_EVERY_S + 30

            def points_drawn(d):
                return colour_pixels(element_image(d.find_element("css selector", "img.chart"))) > 20

            wait_until(driver, points_drawn, lag, "the loss chart to plot the history's points")
            body = driver.find_element("tag name", "body").text
            assert HOSTILE in body and "<b>bold</b>" in body
            assert driver.execute_script("return window.pwned") is None
            assert console_errors(driver) == []
            screenshot(driver, tmp_path / "status-page.png")
    finally:
        observer.shutdown()
        for p in procs:
            kill_tree(p)
