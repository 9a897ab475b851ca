"""A network lab for tests: Linux network namespaces wired into a tiny internet, built per test, removed after.

Topology (each box is a network namespace; nothing is configured in the root namespace, so the host's own
network is never touched and the lab's traffic never leaves its namespaces)::

    public host "pub"      internet namespace "<prefix>_inet"      NAT router "<prefix>-home_nat"
    <prefix>-pub           bridge br0, one port (p0, p1, ...)       wan0 11.99.0.x --+-- lan0 192.168.N.1/24
    eth0 11.99.0.x ------- per public host or router WAN ---------- (masquerade out,  |
                                                                    no new conn. in)  +-- home host <prefix>-home
                                                                                          eth0 192.168.N.2/24,
                                                                                          default via 192.168.N.1

- The "internet" is one flat IPv4 subnet, 11.99.0.0/24, on a bridge in a namespace of its own. Public hosts
  and home routers have an address there; there is no default route on it (a destination outside it fails
  at once with "network unreachable", as a private 192.168.x address dialled across the internet would
  never arrive). The subnet is a globally routed one on purpose: libp2p treats private ranges (10/8 and the
  like) as a LAN, and neither announces relay addresses nor relays through peers it only knows there, so a
  private "internet" would hide exactly what the lab is for. Nothing leaves the lab: the internet namespace
  has no link to the host or anywhere else.
- A home is one host behind a NAT router: the router masquerades what leaves through its WAN leg
  (nftables) and drops every new connection arriving on it (``ct state new`` on input and forward), so a
  home host can dial out and be answered, and nobody outside can dial in: not public hosts, not other
  homes. Other peers see a home host at its router's WAN address (:meth:`NetLab.public_addr`).
- Each host has its own loopback: 127.0.0.1 in one host is that host alone.
- IPv6 is off in every lab namespace: the lab models an IPv4 internet with IPv4 NAT, and link-local IPv6
  between bridge ports would be a path around it. Bind to 0.0.0.0 or the host's address, not ``::``.
- Faults, applied on the bridge (so a dropped packet simply vanishes in flight, as on a real network; a
  rule in the sender's own namespace would instead fail its ``send``/``connect`` with EPERM):
  :meth:`NetLab.partition` drops everything between two hosts, or between one host and everyone;
  :meth:`NetLab.loss` drops each packet crossing a host's link with probability N% (nftables
  ``numgen random mod 100 < N drop``). :meth:`NetLab.heal` removes exactly the rules of one fault.
- This kernel has no ``netem`` (sch_netem), so there is no latency, jitter or bandwidth knob: only loss and
  partitions.

Names: each lab has a short unique prefix, ``nl<pid>x<4 hex>``; a host's namespace is ``<prefix>-<name>``.
Interface names live inside each namespace (``br0``, ``p<i>``, ``eth0``, ``wan0``, ``lan0``), so they never
collide between labs and always fit Linux's 15 characters. Opening a lab first removes leftovers of earlier
runs that crashed: namespaces of a prefix whose process is gone (or of the same explicit ``prefix``).

Use::

    with NetLab() as lab:                    # or the ``lab`` fixture: ``from tests.netlab import lab_fixture``
        lab.add_public("boot")
        lab.add_home("alice")
        proc = lab.popen("boot", [sys.executable, "node.py", ...], stdout=log)   # its own session
        lab.run("alice", ["python3", "-c", "..."])                               # short, with a timeout
        cut = lab.partition("alice", "boot"); ...; lab.heal(cut)
    # closed: every process still in a lab namespace is killed, every namespace removed

Needs root, ``ip`` (iproute2) and ``nft`` (nftables); :func:`unavailable` says why not, and :func:`open_lab`
skips the test with that reason. Every command runs with a timeout, so a broken setup fails rather than hangs.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

INTERNET = ipaddress.ip_network("11.99.0.0/24")  # routed-looking on purpose: see the docstring
# Every lab's namespaces start with this; the pid says whose they are, so leftovers of a dead run are found.
_AUTO_PREFIX = re.compile(r"^nl(\d+)x[0-9a-f]{4}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
_CMD_TIMEOUT = 15.0  # an ip/nft command takes milliseconds; this only keeps a wedged one from hanging a test
_BRIDGE_TABLE = "netlab"  # bridge-family table in the internet namespace that holds the fault rules
_FAULT_CHAIN = "faults"


class NetLabError(RuntimeError):
    """A lab command failed (its command line and stderr are in the message)."""


def _sh(args: Sequence[str], input: str | None = None, timeout: float = _CMD_TIMEOUT, check: bool = True) -> str:
    """Run a setup command (ip, nft) to completion; its stdout, or :class:`NetLabError` on failure."""
    try:
        res = subprocess.run(
            list(args),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise NetLabError(f"{' '.join(args)} ran past {timeout}s") from None
    except OSError as e:
        raise NetLabError(f"{' '.join(args)}: {e}") from None
    if check and res.returncode != 0:
        raise NetLabError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
    return res.stdout


def _namespaces() -> list[str]:
    """Names of the network namespaces that ``ip netns`` knows (those under /run/netns)."""
    out = _sh(["ip", "netns", "list"])
    # Lines read "NAME" or "NAME (id: N)".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace(ns: str) -> None:
    """Kill every process still inside namespace ``ns`` and remove it."""
    # Again until none is left (for a few seconds at most): one may fork between the listing and its kill,
    # and a killed one is listed until it has actually died.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pids = _sh(["ip", "netns", "pids", ns], check=False).split()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(0.05)
    # Removing the name works even while a process holds the namespace; the kernel frees it when the last goes.
    _sh(["ip", "netns", "del", ns], check=False)


def remove_leftovers(prefix: str | None = None) -> list[str]:
    """Remove lab namespaces left by runs that died before closing their lab: those of an automatic prefix
    whose process is gone, and, with ``prefix``, every namespace of that prefix. Returns the names removed."""
    removed = []
    for ns in _namespaces():
        head = re.split(r"[-_]", ns, maxsplit=1)[0]
        m = _AUTO_PREFIX.match(head)
        if (prefix is not None and head == prefix) or (m and not _pid_alive(int(m.group(1)))):
            _kill_namespace(ns)
            removed.append(ns)
    return removed


@functools.cache
def unavailable() -> str | None:
    """Why a lab cannot be built on this machine (no root, no ip/nft, no namespaces), or None if it can.
    Asked once per session: the probe makes a namespace and loads nftables rules in it."""
    if not os.path.exists("/proc/self/ns/net"):
        return "the network lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, nftables)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"the network lab needs `{tool}` (apt-get install -y {package}; `make test` installs it)"
    probe = f"nl{os.getpid()}x{secrets.token_hex(2)}_probe"
    try:
        _sh(["ip", "netns", "add", probe])
        try:
            # Loads the nf_tables pieces the lab uses, so a kernel without them is found here, not mid-test.
            _sh(
                ["ip", "netns", "exec", probe, "nft", "-f", "-"],
                input="table bridge probe {\n"
                "  chain c { type filter hook forward priority 0; numgen random mod 100 < 1 drop; }\n"
                "}\n"
                "table ip probenat {\n"
                "  chain c { type nat hook postrouting priority srcnat; masquerade; }\n"
                "}\n",
            )
        finally:
            _sh(["ip", "netns", "del", probe], check=False)
    except NetLabError as e:
        # One line: the first of the command's complaint is the one that says what is missing.
        return f"the network lab cannot build namespaces or nftables rules here: {str(e).splitlines()[0]}"
    return None


@dataclass
class Host:
    """One lab host: its namespace, its own address, the address the internet sees it at, and its bridge port."""

    name: str
    ns: str
    addr: str
    public_addr: str
    port: str  # its link's port on the internet bridge (a home host's is its router's WAN port)
    home: int | None = None  # N of its 192.168.N.0/24, for a home host
    router_ns: str | None = None


@dataclass
class Fault:
    """A partition or a packet-loss setting: the bridge rules it added, removed by :meth:`NetLab.heal`."""

    kind: str
    hosts: tuple[str, ...]
    handles: list[int] = field(default_factory=list)
    lab: NetLab | None = field(default=None, repr=False)

    def heal(self) -> None:
        """Remove this fault's rules (the same as ``lab.heal(fault)``)."""
        assert self.lab is not None
        self.lab.heal(self)


class NetLab:
    """A lab of network namespaces; use it as a context manager (or via :func:`open_lab` / the ``lab``
    fixture) so it is removed, with every process left in it, however the test ends."""

    def __init__(self, prefix: str | None = None) -> None:
        if prefix is not None and not re.fullmatch(r"[a-z0-9]{1,16}", prefix):
            raise ValueError(f"lab prefix {prefix!r}: 1 to 16 lowercase letters and digits")
        self.prefix = prefix
        self.inet_ns = ""
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []  # in creation order; removed in reverse
        self._procs: list[subprocess.Popen] = []
        self._faults: list[Fault] = []
        self._next_ip = 1
        self._next_home = 1
        self._next_port = 0
        self._open = False

    # ----- life cycle -------------------------------------------------------------------------------------------

    def start(self) -> NetLab:
        """Remove leftovers, then build the internet namespace and its bridge (with an empty fault chain)."""
        remove_leftovers(self.prefix)
        if self.prefix is None:
            existing = set(_namespaces())
            while True:
                prefix = f"nl{os.getpid()}x{secrets.token_hex(2)}"
                if not any(re.split(r"[-_]", ns, maxsplit=1)[0] == prefix for ns in existing):
                    break
            self.prefix = prefix
        self._open = True
        try:
            self.inet_ns = self._add_namespace(f"{self.prefix}_inet")
            self._ip(self.inet_ns, "link", "add", "br0", "type", "bridge")
            self._ip(self.inet_ns, "link", "set", "br0", "up")
            self._nft(
                self.inet_ns,
                f"table bridge {_BRIDGE_TABLE} {{\n"
                f"  chain {_FAULT_CHAIN} {{ type filter hook forward priority 0; policy accept; }}\n"
                "}\n",
            )
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill what the lab started and whatever else runs in its namespaces, then remove every namespace.
        Safe to call twice."""
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self._namespaces):
            _kill_namespace(ns)
        self._namespaces.clear()
        self._procs.clear()
        self._open = False

    def __enter__(self) -> NetLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- building ---------------------------------------------------------------------------------------------

    def add_public(self, name: str) -> Host:
        """A host with a public address on the internet bridge: anyone can reach it."""
        ns = self._add_host_namespace(name)
        addr = self._internet_ip()
        port = self._attach(ns, "eth0")
        self._ip(ns, "addr", "add", f"{addr}/{INTERNET.prefixlen}", "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")
        host = Host(name, ns, addr, addr, port)
        self.hosts[name] = host
        return host

    def add_home(self, name: str) -> Host:
        """A host on a home LAN 192.168.N.0/24 behind its own NAT router: it can dial out, nobody can dial in.
        The router's namespace is ``<prefix>-<name>_nat``."""
        ns = self._add_host_namespace(name)
        router = self._add_namespace(f"{self.prefix}-{name}_nat")
        n = self._next_home
        self._next_home += 1
        wan = self._internet_ip()
        lan_gw, lan_host = f"192.168.{n}.1", f"192.168.{n}.2"

        port = self._attach(router, "wan0")
        self._ip(router, "addr", "add", f"{wan}/{INTERNET.prefixlen}", "dev", "wan0")
        self._ip(router, "link", "set", "wan0", "up")
        # The LAN veth is made from the router's side, straight into the home host's namespace.
        self._ip(router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._ip(router, "addr", "add", f"{lan_gw}/24", "dev", "lan0")
        self._ip(router, "link", "set", "lan0", "up")
        self._ip(ns, "addr", "add", f"{lan_host}/24", "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")
        self._ip(ns, "route", "add", "default", "via", lan_gw)
        self._sysctl(router, {"net/ipv4/ip_forward": "1"})
        # Outbound: rewrite the source to the WAN address. Inbound: conntrack lets replies back in and
        # drops anything that would open a new connection, to the router itself or through it.
        self._nft(
            router,
            "table ip netlab_nat {\n"
            '  chain postrouting { type nat hook postrouting priority srcnat; oifname "wan0" masquerade; }\n'
            "}\n"
            "table inet netlab_fw {\n"
            '  chain input { type filter hook input priority filter; iifname "wan0" ct state new drop; }\n'
            '  chain forward { type filter hook forward priority filter; iifname "wan0" ct state new drop; }\n'
            "}\n",
        )
        host = Host(name, ns, lan_host, wan, port, home=n, router_ns=router)
        self.hosts[name] = host
        return host

    # ----- running things ---------------------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        """The namespace name of ``host``."""
        return self.hosts[host].ns

    def addr(self, host: str) -> str:
        """``host``'s own IPv4 address (what it binds and sees on its eth0; a home host's is 192.168.N.2)."""
        return self.hosts[host].addr

    def public_addr(self, host: str) -> str:
        """The address the internet sees ``host`` at: its own for a public host, its router's WAN for a home host
        (which, the NAT being what it is, no one can dial)."""
        return self.hosts[host].public_addr

    def cmd(self, host: str, args: Sequence[str]) -> list[str]:
        """``args`` as a command line that runs inside ``host``'s namespace (``ip netns exec NS ...``)."""
        return ["ip", "netns", "exec", self.ns(host), *args]

    def popen(self, host: str, args: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start ``args`` in ``host``'s namespace in a session of its own (``os.killpg(proc.pid, ...)`` stops it
        and its children); ``kw`` goes to :class:`subprocess.Popen` (stdin defaults to /dev/null). The lab kills
        it at close if it is still running."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw["start_new_session"] = True
        proc = subprocess.Popen(self.cmd(host, args), **kw)
        self._procs.append(proc)
        return proc

    def run(
        self, host: str, args: Sequence[str], timeout: float = 30.0, check: bool = False, **kw: Any
    ) -> subprocess.CompletedProcess:
        """Run a short command in ``host``'s namespace, capturing text output; its whole process group is killed
        if it outlives ``timeout`` (then :class:`subprocess.TimeoutExpired` is raised)."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("text", True)
        proc = subprocess.Popen(self.cmd(host, args), start_new_session=True, **kw)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            res.check_returncode()
        return res

    # ----- faults -----------------------------------------------------------------------------------------------

    def partition(self, a: str, b: str | None = None) -> Fault:
        """Drop all traffic between hosts ``a`` and ``b`` (both ways), or, without ``b``, between ``a`` and every
        other host on the internet (a home host still reaches its own router). Undo with :meth:`heal`."""
        pa = self.hosts[a].port
        if b is None:
            rules = [f'iifname "{pa}" drop', f'oifname "{pa}" drop']
            return self._add_fault("partition", (a,), rules)
        pb = self.hosts[b].port
        if pa == pb:
            raise ValueError(f"{a} and {b} share a link to the internet; a partition between them is not possible")
        rules = [f'iifname "{pa}" oifname "{pb}" drop', f'iifname "{pb}" oifname "{pa}" drop']
        return self._add_fault("partition", (a, b), rules)

    def loss(self, host: str, percent: int, direction: str = "both") -> Fault:
        """Drop each packet crossing ``host``'s link to the internet with probability ``percent``/100: packets it
        sends (``direction="out"``), packets sent to it (``"in"``) or both (each way on its own, so a round trip
        through a 50% ``both`` link survives a quarter of the time). Undo with :meth:`heal`."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss of {percent}%: must be 0 to 100")
        if direction not in ("in", "out", "both"):
            raise ValueError(f"direction {direction!r}: in, out or both")
        port = self.hosts[host].port
        match = {"out": [f'iifname "{port}"'], "in": [f'oifname "{port}"']}
        matches = match["out"] + match["in"] if direction == "both" else match[direction]
        # numgen draws 0..99 per packet and below N is dropped (nft refuses "< 100": 100% is a plain drop);
        # 0% adds no rule at all.
        draw = "" if percent == 100 else f" numgen random mod 100 < {percent}"
        rules = [f"{m}{draw} drop" for m in matches] if percent else []
        return self._add_fault(f"loss {percent}% {direction}", (host,), rules)

    def heal(self, fault: Fault) -> None:
        """Remove exactly the rules ``fault`` added (a fault healed twice, or after the lab closed, is left alone)."""
        for handle in fault.handles if self._open else ():
            self._sh_nft(self.inet_ns, ["delete", "rule", "bridge", _BRIDGE_TABLE, _FAULT_CHAIN, "handle", str(handle)])
        fault.handles.clear()
        if fault in self._faults:
            self._faults.remove(fault)

    def heal_all(self) -> None:
        """Remove every fault still in place."""
        for fault in list(self._faults):
            self.heal(fault)

    def fault_rules(self) -> str:
        """The fault chain as nft lists it (for a failing test's message)."""
        return self._sh_nft(self.inet_ns, ["-a", "list", "chain", "bridge", _BRIDGE_TABLE, _FAULT_CHAIN])

    # ----- internals --------------------------------------------------------------------------------------------

    def _add_fault(self, kind: str, hosts: tuple[str, ...], rules: list[str]) -> Fault:
        fault = Fault(kind, hosts, lab=self)
        self._faults.append(fault)
        try:
            for rule in rules:
                # --echo --handle prints the rule back with the handle that deleting it needs.
                out = self._sh_nft(
                    self.inet_ns, ["--echo", "--handle", "add", "rule", "bridge", _BRIDGE_TABLE, _FAULT_CHAIN, rule]
                )
                m = re.search(r"# handle (\d+)", out)
                if not m:
                    raise NetLabError(f"nft did not say the handle of the rule {rule!r}: {out!r}")
                fault.handles.append(int(m.group(1)))
        except BaseException:
            self.heal(fault)
            raise
        return fault

    def _add_namespace(self, ns: str) -> str:
        assert self._open, "the lab is not open: use it as a context manager (or call start())"
        _sh(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        # IPv6 off before any interface arrives (new interfaces take the namespace's defaults), loopback up.
        self._sysctl(ns, {"net/ipv6/conf/all/disable_ipv6": "1", "net/ipv6/conf/default/disable_ipv6": "1"})
        self._ip(ns, "link", "set", "lo", "up")
        return ns

    def _add_host_namespace(self, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"host name {name!r}: lowercase letters, digits and '-', at most 24")
        if name in self.hosts:
            raise ValueError(f"the lab already has a host {name!r}")
        return self._add_namespace(f"{self.prefix}-{name}")

    def _attach(self, ns: str, ifname: str) -> str:
        """A veth from a new port of the internet bridge to ``ifname`` in ``ns``; returns the port's name. Both
        ends are created by the kernel straight in their namespaces, never in the root one."""
        port = f"p{self._next_port}"
        self._next_port += 1
        self._ip(self.inet_ns, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns)
        self._ip(self.inet_ns, "link", "set", port, "master", "br0")
        self._ip(self.inet_ns, "link", "set", port, "up")
        return port

    def _internet_ip(self) -> str:
        if self._next_ip >= INTERNET.num_addresses - 1:
            raise NetLabError(f"the lab's internet {INTERNET} is full")
        addr = str(INTERNET.network_address + self._next_ip)
        self._next_ip += 1
        return addr

    def _ip(self, ns: str, *args: str) -> str:
        return _sh(["ip", "-n", ns, *args])

    def _nft(self, ns: str, script: str) -> str:
        return _sh(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script)

    def _sh_nft(self, ns: str, args: list[str]) -> str:
        return _sh(["ip", "netns", "exec", ns, "nft", *args])

    def _sysctl(self, ns: str, values: dict[str, str]) -> None:
        # /proc/sys/net is per network namespace for whoever opens it, hence the write from inside ``ns``;
        # a missing key (a kernel without IPv6) is skipped rather than failing the lab.
        script = "; ".join(f"[ ! -e /proc/sys/{k} ] || echo {v} > /proc/sys/{k}" for k, v in values.items())
        _sh(["ip", "netns", "exec", ns, "sh", "-c", script])


@contextmanager
def open_lab(prefix: str | None = None) -> Iterator[NetLab]:
    """A :class:`NetLab`, open for the ``with`` block and removed after; skips the calling test (one reason)
    where this machine cannot build one."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with NetLab(prefix) as lab:
        yield lab


@pytest.fixture(name="lab")
def lab_fixture() -> Iterator[NetLab]:
    """The ``lab`` fixture: an empty open :class:`NetLab` (add hosts to it), removed after the test.
    Bring it into a test module with ``from tests.netlab import lab_fixture  # noqa: F401``."""
    with open_lab() as lab:
        yield lab


def wait_gone(prefix: str, timeout: float = 5.0) -> list[str]:
    """The namespaces of ``prefix`` still listed after ``timeout`` s (empty once the lab is gone)."""
    deadline = time.time() + timeout
    while True:
        left = [ns for ns in _namespaces() if re.split(r"[-_]", ns, maxsplit=1)[0] == prefix]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.1)
