"""How a node stops: on request it finishes cleanly, and its helper processes never outlive it.

A node is one Python process plus helpers it does not write itself: hivemind's DHT process
(forked) and the DHT's ``p2pd`` daemon (its child). Two rules keep them in step:

* **Only the node hears a stop.** The DHT process moves into its own process group before it
  starts ``p2pd``, so Ctrl-C in a terminal (which signals the whole foreground group) or a
  SIGTERM sent to the node's group reaches the node alone. The node then saves and writes its
  last records *through* the DHT, and only then shuts the DHT down. If Ctrl-C reached the
  helpers too, they would die first and the last records would never be written.
* **The helpers end with the node.** The DHT process watches its parent; when the node is gone
  (even by SIGKILL, which runs no cleanup) it ends its own group, ``p2pd`` included. A SIGTERM
  sent to the DHT process itself (``pkill -f node.py``, a service manager signalling every
  process of the unit) ends its group too, but only after a grace period in which the node,
  signalled at the same time, still writes its last records.

Signal handlers are inherited across ``fork``. A handler that only sets an event would make a
forked helper ignore SIGTERM, including hivemind's own ``terminate()``, and the node would wait
on it forever. So the handlers here act only in the process that installed them; in any forked
child they fall back to the default action.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PARENT_POLL_S = 0.5  # how often a helper checks that its node is still there
HELPER_GRACE_S = 8.0  # a helper signalled directly outlives the signal this long, for its node
_ENDING = threading.Event()  # in a helper: its group is already being ended


def _pid_aware(handler: Callable[[int], None]) -> Callable:
    """Run ``handler`` in the installing process; in a forked child, behave as SIG_DFL."""
    owner = os.getpid()

    def on_signal(sig: int, _frame) -> None:
        if os.getpid() != owner:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            return
        handler(sig)

    return on_signal


def stop_on_signals(what: str = "node") -> threading.Event:
    """The first Ctrl-C / SIGTERM sets the returned event (the node finishes its step, saves,
    releases what it holds and exits 0); a second one quits at once (exit 130), and the helpers
    end with the node."""
    stop = threading.Event()

    def handler(sig: int) -> None:
        if stop.is_set():
            os._exit(128 + signal.SIGINT)  # asked twice: no more cleanup
        stop.set()
        # os.write, not print: a signal can arrive while the main thread is inside print.
        name = signal.Signals(sig).name
        os.write(2, f"{what}: stopping on {name}; press Ctrl-C again to quit at once\n".encode())

    for sig in STOP_SIGNALS:
        signal.signal(sig, _pid_aware(handler))
    return stop


def interrupt_on_signals() -> None:
    """For one-shot roles (client, eval, prepare): SIGTERM interrupts like Ctrl-C, so ``finally``
    blocks run and the DHT shuts down, and the exit status says the work was not finished."""

    def handler(_sig: int) -> None:
        raise KeyboardInterrupt

    for sig in STOP_SIGNALS:
        signal.signal(sig, _pid_aware(handler))


def _end_group_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    _end_group_from_thread()  # the node died without shutting us down


def _end_group_after_grace(_sig: int, _frame) -> None:
    """SIGTERM sent to this helper itself. It may come with one to the node (``pkill -f``, a
    service manager stopping the whole control group) while the node still writes its last
    records through us; or from the node (hivemind's terminate() once its shutdown stalled). Either
    way: give the node HELPER_GRACE_S, then end the group; sooner if the node is gone."""
    if not _ENDING.is_set():
        _ENDING.set()
        threading.Timer(HELPER_GRACE_S, _end_group_from_thread).start()


def _end_group_from_thread() -> None:
    for pid in descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError):  # p2pd may be ending already
            os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)
    os.killpg(0, signal.SIGKILL)


def detach_and_watch(parent: int) -> None:
    """First thing in a helper process: its own process group, SIGTERM that ends the group after
    a grace period, SIGINT ignored, and a thread that ends the group when ``parent`` is gone."""
    os.setpgid(0, 0)
    # SIGTERM ends the whole group, p2pd too (the default action would leave it running), after
    # a grace period for the node's last writes.
    signal.signal(signal.SIGTERM, _end_group_after_grace)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # hivemind ignores it too; the node decides
    if os.getppid() != parent:  # the node died while we were being forked
        os._exit(1)
    threading.Thread(target=_end_group_when_orphaned, args=(parent,), name="lifeline", daemon=True).start()


# ---------------------------------------------------------------- process trees (Linux /proc)
def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process; None once it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else (fields[0], int(fields[1]))


def is_alive(pid: int) -> bool:
    return _stat(pid) is not None


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (its DHT process, p2pd, loader workers...), in any group."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[1], []).append(int(entry.name))
    out, frontier = [], [pid]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, [])]
        out += frontier
    return out


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes together (those gone count 0)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total
