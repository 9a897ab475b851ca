"""The network lab (tests/netlab.py) with plain tools only: python's own sockets run inside the lab's namespaces.

Home hosts dial out through their NAT and nobody dials in; partitions and packet loss come and go; the lab
leaves no namespace or process behind, also when the test inside it fails; leftovers of a dead run are removed.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys

import pytest

from tests.netlab import NetLab, lab_fixture, open_lab, unavailable, wait_gone  # noqa: F401 (the `lab` fixture)

PORT = 7000
# A TCP server answering each connection with the address it came from, and a UDP echo server, on PORT.
SERVER = """
import socket, sys, threading
port = int(sys.argv[1])
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", port))
t.listen(64)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", port))
def echo():
    while True:
        data, peer = u.recvfrom(2048)
        u.sendto(data, peer)
threading.Thread(target=echo, daemon=True).start()
print("ready", flush=True)
while True:
    c, peer = t.accept()
    c.sendall(peer[0].encode() + b"\\n")
    c.close()
"""
# Connect to argv[1]:argv[2] within argv[3] s; prints what the server said, or the error (exit 1).
DIAL = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        print(s.makefile().readline().strip())
except OSError as e:
    print(type(e).__name__, e)
    sys.exit(1)
"""
# Send argv[3] numbered UDP datagrams to argv[1]:argv[2], each waiting argv[4] s for its echo; prints the echoes.
ECHO = """
import socket, sys, time
n, wait = int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
got = 0
for i in range(n):
    s.sendto(str(i).encode(), (sys.argv[1], int(sys.argv[2])))
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            if s.recv(64) == str(i).encode():  # a late echo of an earlier datagram is not this one's
                got += 1
                break
        except TimeoutError:
            break
print(got)
"""


def serve(lab: NetLab, host: str, port: int = PORT) -> subprocess.Popen:
    """Start SERVER in ``host`` and wait until it listens."""
    proc = lab.popen(host, [sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    assert ready and proc.stdout.readline().strip() == "ready", f"the server in {host} did not start"
    return proc


def dial(lab: NetLab, src: str, ip: str, port: int = PORT, timeout: float = 1.0) -> str | None:
    """Open a TCP connection from ``src`` to ``ip``: the address the server saw it come from, or None."""
    ok, said = attempt(lab, src, ip, port, timeout)
    return said if ok else None


def attempt(lab: NetLab, src: str, ip: str, port: int = PORT, timeout: float = 1.0) -> tuple[bool, str]:
    """Open a TCP connection from ``src`` to ``ip``: (connected, what the server said or the error)."""
    res = lab.run(src, [sys.executable, "-c", DIAL, ip, str(port), str(timeout)], timeout=timeout + 10)
    return res.returncode == 0, res.stdout.strip()


def blackholed(lab: NetLab, src: str, ip: str) -> bool:
    """Whether a connection from ``src`` to ``ip`` times out: its packets vanish, as at a NAT or in a partition
    (not refused, not an error from ``src``'s own stack)."""
    ok, said = attempt(lab, src, ip, timeout=0.5)
    assert ok or said.startswith("TimeoutError"), said
    return not ok


def unroutable(lab: NetLab, src: str, ip: str) -> bool:
    """Whether ``src`` is told at once that ``ip`` is out of reach (a private address behind someone's NAT)."""
    ok, said = attempt(lab, src, ip, timeout=0.5)
    assert ok or "unreachable" in said, said
    return not ok


def echoes(lab: NetLab, src: str, ip: str, n: int, wait: float = 0.1, port: int = PORT) -> int:
    """How many of ``n`` UDP datagrams from ``src`` to ``ip`` came back echoed."""
    res = lab.run(src, [sys.executable, "-c", ECHO, ip, str(port), str(n), str(wait)], timeout=n * wait + 10)
    assert res.returncode == 0, res.stderr
    return int(res.stdout)


def test_home_host_dials_out_through_its_nat(lab: NetLab) -> None:
    lab.add_public("server")
    lab.add_home("alice-with-a-long-name")
    serve(lab, "server")
    assert lab.addr("alice-with-a-long-name").startswith("192.168.")
    # The server sees the router's WAN address: the router masquerades.
    assert dial(lab, "alice-with-a-long-name", lab.addr("server")) == lab.public_addr("alice-with-a-long-name")
    assert lab.public_addr("alice-with-a-long-name") != lab.addr("alice-with-a-long-name")
    # Every interface, in every namespace, fits Linux's 15 characters.
    for ns in (lab.inet_ns, lab.ns("server"), lab.ns("alice-with-a-long-name")):
        names = re.findall(r"^\d+: ([^:@]+)", subprocess.check_output(["ip", "-n", ns, "-o", "link"], text=True), re.M)
        assert names and all(len(n) <= 15 for n in names), names


def test_nobody_dials_into_a_home(lab: NetLab) -> None:
    lab.add_public("server")
    lab.add_home("alice")
    serve(lab, "alice")
    assert dial(lab, "alice", "127.0.0.1"), "the home's own server does not answer at home"
    # At its router's WAN address: the NAT drops the SYN (a timeout); at its LAN address: no route there at all.
    assert blackholed(lab, "server", lab.public_addr("alice"))
    assert unroutable(lab, "server", lab.addr("alice"))


def test_two_homes_cannot_dial_each_other(lab: NetLab) -> None:
    lab.add_public("server")
    lab.add_home("alice")
    lab.add_home("bob")
    for host in ("server", "alice", "bob"):
        serve(lab, host)
    for a, b in (("alice", "bob"), ("bob", "alice")):
        assert dial(lab, a, lab.addr("server")) == lab.public_addr(a)
        assert blackholed(lab, a, lab.public_addr(b))
        assert unroutable(lab, a, lab.addr(b))


def test_partition_blocks_and_heal_restores(lab: NetLab) -> None:
    lab.add_public("server")
    lab.add_public("other")
    lab.add_home("alice")
    serve(lab, "server")
    assert dial(lab, "alice", lab.addr("server"))

    cut = lab.partition("alice", "server")
    assert blackholed(lab, "alice", lab.addr("server"))
    assert dial(lab, "other", lab.addr("server")), "a partition between two hosts cut a third one off"
    lab.heal(cut)
    assert dial(lab, "alice", lab.addr("server")), lab.fault_rules()

    alone = lab.partition("server")
    assert blackholed(lab, "alice", lab.addr("server"))
    assert blackholed(lab, "other", lab.addr("server"))
    alone.heal()
    assert dial(lab, "alice", lab.addr("server"))
    assert dial(lab, "other", lab.addr("server"))
    assert "drop" not in lab.fault_rules(), "heal left a rule behind"


def test_packet_loss(lab: NetLab) -> None:
    lab.add_public("a")
    lab.add_public("b")
    serve(lab, "b")
    # Neighbours resolved before any loss, so ARP's own lost packets do not muddle the counts below.
    assert echoes(lab, "a", lab.addr("b"), 5) == 5

    total = lab.loss("a", 100)
    assert echoes(lab, "a", lab.addr("b"), 5) == 0
    assert blackholed(lab, "a", lab.addr("b"))
    lab.heal(total)
    assert echoes(lab, "a", lab.addr("b"), 20) == 20

    none = lab.loss("a", 0)
    assert echoes(lab, "a", lab.addr("b"), 20) == 20
    lab.heal(none)

    # Half of what a sends is lost; the echoes come back untouched. 40 tries: mean 20, sd 3.2.
    half = lab.loss("a", 50, direction="out")
    got = echoes(lab, "a", lab.addr("b"), 40)
    assert 8 <= got <= 32, f"{got} of 40 echoes through a 50% lossy link"
    lab.heal(half)
    assert echoes(lab, "a", lab.addr("b"), 20) == 20


def test_two_labs_at_once_do_not_collide() -> None:
    with open_lab() as one, open_lab() as two:
        assert one.prefix != two.prefix
        for lab in (one, two):
            lab.add_public("server")  # the same names and addresses in both
            lab.add_home("alice")
            serve(lab, "server")
        one.partition("server")
        assert blackholed(one, "alice", one.addr("server"))
        assert dial(two, "alice", two.addr("server")) == two.public_addr("alice")


def _root_lab_links() -> set[str]:
    out = subprocess.check_output(["ip", "-o", "link"], text=True, timeout=10)
    return {n for n in re.findall(r"^\d+: ([^:@]+)", out, re.M) if re.fullmatch(r"p\d+|wan0|lan0|br0", n)}


def test_everything_is_gone_after_the_lab_even_on_error() -> None:
    before = _root_lab_links()
    with pytest.raises(RuntimeError, match="the test failed"):
        with open_lab() as lab:
            lab.add_public("server")
            lab.add_home("alice")
            sleeper = lab.popen("alice", ["sleep", "600"])
            # A process that left its session is still found: it is in the lab's namespace.
            stray = lab.run("server", ["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 & echo $!"], check=True)
            assert _root_lab_links() == before, "the lab configured the root namespace"
            raise RuntimeError("the test failed")
    assert wait_gone(lab.prefix) == []
    assert sleeper.poll() is not None
    pid = int(stray.stdout)
    assert not os.path.exists(f"/proc/{pid}") or "State:\tZ" in open(f"/proc/{pid}/status").read()
    assert _root_lab_links() == before


def test_leftovers_of_a_dead_run_are_removed() -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [f"nl{dead.pid}xbeef_inet", f"nl{dead.pid}xbeef-alice"]
    alive = f"nl{os.getpid()}xbeef-keep"  # a live run's (this one's): kept
    named = "leftover12-server"  # an explicit prefix: cleared by the next lab of that prefix
    for ns in (*stale, alive, named):
        subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        with NetLab() as lab:
            assert wait_gone(f"nl{dead.pid}xbeef") == []
            assert alive in subprocess.check_output(["ip", "netns", "list"], text=True, timeout=10)
            assert wait_gone(lab.prefix, timeout=0) != []
        with NetLab(prefix="leftover12") as lab:
            assert named not in subprocess.check_output(["ip", "netns", "list"], text=True, timeout=10)
            lab.add_public("server")
        assert wait_gone("leftover12") == []
    finally:
        for ns in (*stale, alive, named):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
