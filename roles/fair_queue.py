"""Fair serving: the queue between an expert server's stream handlers and its worker, fair across peers.

Every peer — one peer id, however many streams it opens — has its own FIFO of requests, counted in
images (rows), not requests. A peer may have at most ``peer_rows`` images waiting; a request beyond
that is refused at once (:class:`Busy`), so a peer that keeps every stream full of the largest valid
requests holds a bounded share of the queue, never all of it. The whole queue holds at most
``max_requests`` requests (memory); when it is full, the peer holding the most requests gives up its
newest one (answered busy) to a peer holding fewer, so many small requests from one peer cannot lock
the others out either.

The worker takes one batch at a time (:meth:`FairQueue.take`): the peer served least recently picks
the checkpoint (its oldest request's), and the batch's rows are shared evenly among every peer
waiting for that checkpoint, a share one peer does not need going to the others. A request larger
than its share is served in slices over several batches and answered when its last rows are done.

With more than one peer active (waiting now, or sent a request within ``active_s``) the worker asks
for smaller batches: :class:`ForwardCost` says how many rows a forward pass can take within a time
quantum, so a peer's request never waits behind much more than one quantum of another peer's work
— but never so few that the server's throughput would halve (where a pass costs the same for 1 row
or 32, as a large model on a GPU, the batches stay large). A forward pass is not preemptible, and on
a CPU its cost grows with its rows: a full batch of a flooder's rows in flight is what an honest
one-image request would otherwise wait for at every step. With one peer active, batches are as
large as ``max_batch`` allows.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class Busy(Exception):
    """A request refused (or pushed out of the queue) for its peer's load: not a fault of the
    request, so a client goes to another replica and nobody is banned."""


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    key: Hashable
    rows: int
    taken: int = 0  # rows already handed to the worker

    @property
    def left(self) -> int:
        return self.rows - self.taken


@dataclass(frozen=True)
class Slice(Generic[T]):
    """Rows ``start:stop`` of a queued request, for one batch; ``last``: its final rows."""

    item: T
    start: int
    stop: int
    last: bool

    @property
    def rows(self) -> int:
        return self.stop - self.start


class FairQueue(Generic[T]):
    """Per-peer request queues served fairly (see the module docstring); thread-safe: stream
    handlers put, one worker takes."""

    def __init__(
        self,
        peer_rows: int,
        max_requests: int,
        active_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if peer_rows < 1 or max_requests < 1:
            raise ValueError("peer_rows and max_requests must be positive")
        self.peer_rows, self.max_requests, self.active_s, self.clock = peer_rows, max_requests, active_s, clock
        self._peers: dict[str, collections.deque[_Entry[T]]] = {}  # only peers with something waiting
        self._where: dict[T, tuple[str, _Entry[T]]] = {}
        self._seen: dict[str, float] = {}  # peer → when it last put a request
        self._served: dict[str, int] = {}  # peer → the last batch that held rows of it
        self._batches = 0
        self._cond = threading.Condition()

    def __len__(self) -> int:
        """Requests waiting (a partly served one counts until its last rows are taken)."""
        with self._cond:
            return len(self._where)

    def rows(self, peer: str) -> int:
        """Images of ``peer`` waiting to be served."""
        with self._cond:
            return self._rows(peer)

    def _rows(self, peer: str) -> int:
        return sum(e.left for e in self._peers.get(peer, ()))

    def admits(self, peer: str, rows: int) -> bool:
        """Whether :meth:`put` would take a request of ``rows`` from ``peer`` now: a cheap check a
        handler makes from a request's header, before it reads and checks the payload."""
        with self._cond:
            if self._rows(peer) + rows > self.peer_rows:
                return False
            if len(self._where) < self.max_requests:
                return True
            mine = len(self._peers.get(peer, ()))
            return any(len(q) > mine for q in self._peers.values())

    def put(self, peer: str, item: T, rows: int, key: Hashable) -> list[T]:
        """Queue ``item`` (``rows`` images, batched only with items of the same ``key``); raise
        :class:`Busy` if ``peer`` is over its share. Returns the items pushed out to make room
        (another peer's, each to be answered busy)."""
        if rows < 1:
            raise ValueError("a request has at least one row")
        with self._cond:
            now = self.clock()
            self._forget(now)
            self._seen[peer] = now
            held = self._rows(peer)
            if held + rows > self.peer_rows:
                raise Busy(f"busy: {held} of your images are waiting here (at most {self.peer_rows} per peer)")
            evicted = []
            if len(self._where) >= self.max_requests:
                evicted.append(self._push_out(peer))
            entry = _Entry(item, key, rows)
            self._peers.setdefault(peer, collections.deque()).append(entry)
            self._where[item] = (peer, entry)
            self._cond.notify()
            return evicted

    def _push_out(self, peer: str) -> T:
        """Make room for one request of ``peer``: the newest unstarted request of the peer holding
        the most requests goes, unless that peer is ``peer`` itself (or ties with it)."""
        mine = len(self._peers.get(peer, ()))
        heavy = max(self._peers, key=lambda p: (len(self._peers[p]), self._rows(p)))
        victim = next((e for e in reversed(self._peers[heavy]) if e.taken == 0), None)
        if len(self._peers[heavy]) <= mine or victim is None:
            raise Busy(f"busy: {len(self._where)} requests are waiting here, the most this server queues")
        self._remove(heavy, victim)
        return victim.item

    def discard(self, item: T) -> None:
        """Drop what is left of ``item`` (answered, timed out, or its client gone); no-op if none."""
        with self._cond:
            found = self._where.get(item)
            if found is not None:
                self._remove(*found)

    def _remove(self, peer: str, entry: _Entry[T]) -> None:
        del self._where[entry.item]
        q = self._peers[peer]
        q.remove(entry)
        if not q:
            del self._peers[peer]

    def _forget(self, now: float) -> None:
        """Peers idle past ``active_s`` with nothing waiting: their history no longer matters (a
        returning peer is served first anyway), and the tables stay as small as the active set."""
        for p in [p for p, t in self._seen.items() if now - t > self.active_s and p not in self._peers]:
            del self._seen[p]
            self._served.pop(p, None)

    def contended(self) -> bool:
        """More than one peer is waiting now, or has put a request within ``active_s``."""
        with self._cond:
            return self._contended(self.clock())

    def _contended(self, now: float) -> bool:
        active = {p for p, t in self._seen.items() if now - t <= self.active_s} | self._peers.keys()
        return len(active) > 1

    def take(
        self,
        max_rows: int,
        contended_rows: int | None = None,
        timeout: float = 0.0,
        live: Callable[[T], bool] | None = None,
    ) -> tuple[list[Slice[T]], list[T]]:
        """The next batch: at most ``max_rows`` rows (``contended_rows`` while several peers are
        active), all of one key, shared fairly. Waits up to ``timeout`` s for something to take.
        Items for which ``live`` is false are dropped first and returned as the second value (the
        caller answers them). The first value is empty if nothing was waiting."""
        with self._cond:
            if not self._where:
                self._cond.wait(timeout)
            dropped = [e.item for _, e in list(self._where.values()) if live is not None and not live(e.item)]
            for item in dropped:
                self._remove(*self._where[item])
            if not self._peers:
                return [], dropped
            limit = max_rows
            if contended_rows is not None and self._contended(self.clock()):
                limit = max(1, min(max_rows, contended_rows))
            # The peer served longest ago picks the key; peers never served (or forgotten) first.
            first = min(self._peers, key=lambda p: self._served.get(p, -1))
            key = self._peers[first][0].key
            want = {p: sum(e.left for e in q if e.key == key) for p, q in self._peers.items()}
            order = sorted((p for p in want if want[p]), key=lambda p: (p != first, self._served.get(p, -1)))
            share = _water_fill(order, want, limit)
            self._batches += 1
            batch: list[Slice[T]] = []
            for p in order:
                n = share[p]
                if n:
                    self._served[p] = self._batches
                for e in [e for e in self._peers[p] if e.key == key]:
                    if n == 0:
                        break
                    k = min(n, e.left)
                    batch.append(Slice(e.item, e.taken, e.taken + k, e.taken + k == e.rows))
                    e.taken += k
                    n -= k
                    if e.left == 0:
                        self._remove(p, e)
            return batch, dropped


def _water_fill(order: list[str], want: dict[str, int], limit: int) -> dict[str, int]:
    """Share ``limit`` rows evenly among the peers of ``order``, none given more than it wants,
    what one does not need going to the rest; leftover single rows go in ``order``."""
    got = dict.fromkeys(order, 0)
    left, open_ = limit, list(order)
    while left > 0 and open_:
        each = max(1, left // len(open_))
        for p in list(open_):
            give = min(each, want[p] - got[p], left)
            got[p] += give
            left -= give
            if got[p] == want[p]:
                open_.remove(p)
            if left == 0:
                break
    return got


class ForwardCost:
    """The seconds of one forward pass as ``a + b·rows``, fitted by least squares over recent batches
    (each older batch weighs ``decay`` times less, so the fit follows a change of load or weights)."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self._w = self._r = self._s = self._rr = self._rs = 0.0

    def add(self, rows: int, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1.0
        self._r = d * self._r + rows
        self._s = d * self._s + seconds
        self._rr = d * self._rr + rows * rows
        self._rs = d * self._rs + rows * seconds

    def fit(self) -> tuple[float, float] | None:
        """(a, b) in seconds and seconds per row; ``None`` before any batch."""
        if self._w == 0:
            return None
        mr, ms = self._r / self._w, self._s / self._w
        var = self._rr / self._w - mr * mr
        if var < 1e-6 * max(mr * mr, 1.0):  # one batch size only: assume the cost is all per row
            return 0.0, ms / mr
        b = max(0.0, (self._rs / self._w - mr * ms) / var)
        return max(0.0, ms - b * mr), b

    def rows_within(self, budget_s: float, cap: int) -> int:
        """The most rows (1..``cap``) one forward pass can take and end within ``budget_s``; but never
        so few that a row costs more than twice what it does in a full batch of ``cap`` (where the
        fixed cost of a pass dominates, a large model on a GPU, smaller passes would halve the
        server's throughput and more). ``cap`` before any measurement."""
        fitted = self.fit()
        if fitted is None:
            return cap
        a, b = fitted
        if b <= 0:
            return cap
        # (a + b·r) / r <= 2 (a + b·cap) / cap  ⇔  r >= a / (2a/cap + b)
        floor = math.ceil(a / (2 * a / cap + b) - 1e-9)
        within = int((budget_s - a) / b + 1e-9)  # 1e-9: 0.025 s at 0.005 s a row is 5 rows, not 4
        return max(1, min(cap, max(floor, within)))
