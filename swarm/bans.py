"""Local bans: a peer that sent this node a bad blob, a bad record or a malformed request is
ignored by this node for a while.

A ban names a peer id (who sent bytes over the wire) or an owner key's fingerprint (who signed a
record). It is local: nothing is published but a short list in the node's presence record, so
the status dashboard shows who banned whom and why. Bans expire, because a peer id is cheap to
replace anyway and an honest peer may have had a broken disk for a moment.
"""

from __future__ import annotations

import threading
import time

from rich.console import Console

BAN_S = 600.0  # how long a ban lasts
MAX_LISTED = 16  # bans shown in a presence record

console = Console(stderr=True, markup=False)


class Bans:
    """Who this node ignores now, and why."""

    def __init__(self, seconds: float = BAN_S) -> None:
        self.seconds = seconds
        self._until: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def ban(self, who: str, reason: str, seconds: float | None = None) -> None:
        """Ignore ``who`` (a peer id or a key fingerprint) for ``seconds`` (default :data:`BAN_S`)."""
        if not who:
            return
        with self._lock:
            fresh = who not in self._until or self._until[who][0] < time.monotonic()
            self._until[who] = (time.monotonic() + (self.seconds if seconds is None else seconds), reason[:120])
        if fresh:
            console.log(f"banned {who[:16]} for {self.seconds if seconds is None else seconds:.0f}s: {reason[:120]}")

    def banned(self, who: str) -> bool:
        with self._lock:
            entry = self._until.get(who)
            return entry is not None and entry[0] > time.monotonic()

    def active(self) -> dict[str, str]:
        """Banned now: who → why."""
        now = time.monotonic()
        with self._lock:
            self._until = {w: e for w, e in self._until.items() if e[0] > now}
            return {w: e[1] for w, e in self._until.items()}

    def lines(self) -> list[str]:
        """The bans as short lines for a presence record (newest reasons, at most 16)."""
        return [f"{who[:16]}: {why}" for who, why in list(self.active().items())[-MAX_LISTED:]]
