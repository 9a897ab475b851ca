"""The status node's read-only web page: the swarm's latest snapshot as a page, a JSON API and loss charts.

``python node.py --role status --web HOST:PORT`` collects a snapshot of the swarm every few seconds and
hands each one to :meth:`StatusWeb.publish`; :class:`StatusWeb` serves it with aiohttp on a daemon
thread that has its own asyncio event loop, so nothing a web client does can stall the node's own work:

- ``GET /``: the page (``roles/static/status.html``, ``status.js``, ``status.css``). It polls
  ``/api/status`` every 3 s with ``If-None-Match``, only while the tab is visible, and builds its DOM
  with ``textContent``/``createElement`` only: every string in a snapshot comes from untrusted peers.
- ``GET /api/status``: the latest snapshot as JSON, plus ``chart_etags`` (one per run: the version of
  that run's chart, so a page fetches a chart again only when its loss history changed).
- ``GET /api/ledger``: ``{"time": ..., "runs": [{"ref": ..., "ledger": ...}]}``.
- ``GET /chart/N.png``: loss against step for every job of run N (training loss as a line, held-out
  loss at verified checkpoints as markers).

Each JSON body is serialized once per publish (not per request), with a strong ETag (a hash of its
bytes) and a gzip copy made at the same time; a request whose ``If-None-Match`` names the current
ETag gets a 304. Charts are PNGs drawn on the server with matplotlib's Agg canvas (the object API,
no pyplot, so no global state is shared with the node), lazily on the first request after their
run's history changed, in a worker thread (``run_in_executor``; the event loop never draws), one
drawing shared by every request that wants it: N open tabs cost one drawing per change of
history, not N. A server-side PNG needs no JavaScript toolchain at install time (the page is three
static files), and its drawing cost is paid once per change whatever the number of viewers.

It only reads: no key, no form, no write anywhere; any method other than GET and HEAD is a 405.
Every response carries a strict Content-Security-Policy (scripts and styles from this server's own
files only, no inline code), ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer`` and
``X-Frame-Options: DENY``.

Bounded, so a slow or hostile HTTP client holds at most a bounded share of it, for a bounded time:

- at most ``max_connections`` connections at once: one beyond it is aborted (RST) as soon as it is
  accepted, before a byte of it is read (:class:`_Slot`, wrapped around aiohttp's protocol factory);
- a connection that sends no complete request within ``idle_timeout`` s, whether it is silent,
  trickles header bytes (slowloris) or idles between requests, is closed (aiohttp's keep-alive
  timer: it starts when the connection opens and after each response, and partial data does not
  reset it);
- a request body is never read (``client_max_size`` is tiny, and an unread body is drained for at
  most ``lingering_time`` = 1 s before the connection closes);
- a client that does not read its responses (output left unsent for ``write_timeout`` s) is aborted;
- a handler whose client went away is cancelled (``handler_cancellation``), and a stop aborts every
  connection rather than wait for clients.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import hashlib
import io
import json
import logging
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# The page's files, served from memory: a fixed list, so no request path ever reaches the filesystem.
STATIC_FILES = {
    "status.js": "text/javascript",
    "status.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
CHART_SIZE = (6.4, 3.0)  # inches at CHART_DPI: a 640x300 PNG, some 20-40 KB
CHART_DPI = 100
CHART_MAX_JOBS = 32  # a run lists a handful of jobs; more would be an unreadable legend anyway
CHART_MAX_POINTS = 2000  # per series: more points than pixels only cost drawing time
CHART_CACHE = 64  # drawn charts kept (the latest of each run asked for), least recently used dropped
CHART_EVERY_S = 10.0  # a run's chart is drawn anew at most this often, however often its history moves
GZIP_MIN = 1024  # smaller bodies are sent as they are: gzip would save next to nothing


@dataclass(frozen=True)
class _Body:
    """One representation of a resource, made once: its bytes, a gzip copy and a strong ETag."""

    data: bytes
    content_type: str
    etag: str
    gz: bytes | None = None

    @classmethod
    def of(cls, data: bytes, content_type: str, compress: bool = True) -> _Body:
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        gz = gzip.compress(data, compresslevel=6, mtime=0) if compress and len(data) >= GZIP_MIN else None
        return cls(data, content_type, etag, gz)


@dataclass(frozen=True)
class _Chart:
    """What run N's chart is drawn from, and the version it is cached under."""

    etag: str
    history: Any
    title: str


@dataclass(frozen=True)
class _Published:
    """Everything the handlers serve from one snapshot; replaced whole by each publish (no locking
    needed to read it: a handler takes the reference once)."""

    status: _Body
    ledger: _Body
    charts: tuple[_Chart, ...] = field(default_factory=tuple)


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None: JSON has neither, and a diverged
    trainer's loss is one (json.dumps would write ``NaN``, which a browser's JSON.parse rejects)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _dumps(value: Any) -> bytes:
    # default=str: a value of an unexpected type is shown as text rather than failing the node's publish.
    return json.dumps(_finite(value), separators=(",", ":"), default=str, allow_nan=False).encode()


def _json_body(value: Any) -> _Body:
    return _Body.of(_dumps(value), "application/json")


def _empty_published() -> _Published:
    return _Published(_json_body({"time": None, "runs": [], "chart_etags": []}), _json_body({"time": None, "runs": []}))


def _charts_of(status: dict) -> list[_Chart]:
    """Each run's chart, versioned by a hash of its loss history."""
    charts = []
    for index, run in enumerate(status.get("runs") or []):
        history = run.get("history") if isinstance(run, dict) else None
        digest = hashlib.sha256(_dumps(history)).hexdigest()[:24]
        title = str(run.get("ref") or run.get("name") or f"run {index}") if isinstance(run, dict) else f"run {index}"
        charts.append(_Chart(f'"{digest}"', history, title))
    return charts


def _publishable(status: dict, charts: list[_Chart] | None = None) -> _Published:
    """Serialize one snapshot: the JSON bodies, and each run's chart version (``charts``: the ones
    to serve, by default drawn from this snapshot's histories)."""
    runs = status.get("runs") or []
    charts = _charts_of(status) if charts is None else charts
    body = dict(status)
    body["chart_etags"] = [c.etag.strip('"') for c in charts]
    ledger = {
        "time": status.get("time"),
        "runs": [{"ref": r.get("ref"), "ledger": r.get("ledger")} for r in runs if isinstance(r, dict)],
    }
    return _Published(_json_body(body), _json_body(ledger), tuple(charts))


def _matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (weak forms and ``*`` included)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _points(series: Any) -> tuple[list[float], list[float]]:
    """The finite (step, loss) pairs of one series, thinned to at most CHART_MAX_POINTS; anything
    malformed (peers report these numbers) is skipped, never drawn or raised."""
    xs: list[float] = []
    ys: list[float] = []
    if not isinstance(series, list):
        return xs, ys
    for point in series:
        if not isinstance(point, list | tuple) or len(point) < 2:
            continue
        x, y = point[0], point[1]
        if _is_number(x) and _is_number(y) and math.isfinite(x) and math.isfinite(y):
            xs.append(float(x))
            ys.append(float(y))
    if len(xs) > CHART_MAX_POINTS:
        stride = math.ceil(len(xs) / CHART_MAX_POINTS)
        last = (xs[-1], ys[-1])
        xs, ys = xs[::stride], ys[::stride]
        if (xs[-1], ys[-1]) != last:  # the newest point is the one a viewer looks for
            xs.append(last[0])
            ys.append(last[1])
    return xs, ys


def _label(job: Any) -> str:
    """A job name as a legend label taken literally: matplotlib reads ``$...$`` as mathtext (slow,
    and it can raise) and leaves out labels that start with an underscore."""
    text = str(job)[:40].replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _minor_label(value: float, _: Any = None) -> str:
    if value <= 0:
        return ""
    mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
    return f"{value:g}" if mantissa in (2, 3, 5) else ""


def render_chart(history: Any, title: str = "") -> bytes:
    """One run's loss chart as PNG bytes: a line per job for its training loss, markers in the same
    colour for its held-out loss at verified checkpoints, log-scale y when every loss is positive.
    A run with no points yet gets a small PNG saying so. Runs in a worker thread: matplotlib's
    object API with an Agg canvas, no pyplot, so no state is shared with other threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    series = []
    if isinstance(history, dict):
        for job in list(history)[:CHART_MAX_JOBS]:
            points = history[job] if isinstance(history[job], dict) else {}
            train, held = _points(points.get("train")), _points(points.get("heldout"))
            if train[0] or held[0]:
                series.append((_label(job), train, held))
    if not series:
        fig = Figure(figsize=(CHART_SIZE[0], 0.6), dpi=CHART_DPI)
        fig.text(0.5, 0.5, "no loss reported yet", ha="center", va="center", color="#666666", fontsize=11)
    else:
        fig = Figure(figsize=CHART_SIZE, dpi=CHART_DPI, layout="constrained")
        ax = fig.add_subplot()
        handles = []
        for i, (label, (tx, ty), (hx, hy)) in enumerate(series):
            colour = f"C{i % 10}"  # matplotlib's default cycle: ten distinct, saturated colours
            if tx:
                ax.plot(tx, ty, color=colour, linewidth=1.4)
            if hx:
                ax.plot(hx, hy, linestyle="none", marker="D", markersize=5, color=colour, markeredgecolor="white")
            handles.append(Line2D([], [], color=colour, linewidth=1.4, label=label))
        handles.append(
            Line2D([], [], linestyle="none", marker="D", markersize=5, color="#555555", label="held-out (verified)")
        )
        if all(y > 0 for _, (_, ty), (_, hy) in series for y in (*ty, *hy)):
            ax.set_yscale("log")
            # Plain numbers (0.3, 2) rather than 3 x 10^-1: losses are read, not their exponents.
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))  # 2, 3 and 5 of each decade: no crowding
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel("loss", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, which="major", color="#e5e5e5", linewidth=0.8)
        ax.legend(handles=handles, fontsize=8, loc="upper right", ncols=2 if len(handles) > 4 else 1, framealpha=0.9)
        if title:
            ax.set_title(title[:80].replace("$", r"\$"), fontsize=9, loc="left", color="#444444")
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


class _Slot(asyncio.Protocol):
    """One connection's place among ``max_connections``: the HTTP is aiohttp's own handler, made
    only once the connection has a place, and every event is passed on to it.

    Connections are counted here, at ``connection_made`` (called one at a time on the event loop,
    so the count is exact), rather than in the protocol factory, which asyncio may call for
    several accepted sockets before any of them is made. The slot also aborts a connection whose
    output has sat unsent for ``write_timeout`` s: a client that never reads would otherwise hold
    its place for ever (even a close waits for the output to be flushed first)."""

    def __init__(self, owner: StatusWeb) -> None:
        self._owner = owner
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._unsent_since: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        owner = self._owner
        self._transport = transport  # type: ignore[assignment]
        runner = owner._runner
        if owner._closing or len(owner._slots) >= owner.max_connections or runner is None or runner.server is None:
            # Full: no handler, no read; an RST now tells the client at once, not after a timeout.
            owner.refused += 1
            transport.abort()  # type: ignore[attr-defined]
            return
        owner._slots.add(self)
        self._inner = runner.server()
        self._inner.connection_made(transport)
        self._timer = owner._loop.call_later(1.0, self._watch)

    def _watch(self) -> None:
        transport, loop = self._transport, self._owner._loop
        if transport is None or self._inner is None:
            return
        if transport.get_write_buffer_size() == 0:
            self._unsent_since = None
        elif self._unsent_since is None:
            self._unsent_since = loop.time()
        elif loop.time() - self._unsent_since > self._owner.write_timeout:
            transport.abort()
            return
        self._timer = loop.call_later(1.0, self._watch)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._owner._slots.discard(self)
        inner, self._inner, self._transport = self._inner, None, None
        if inner is not None:
            inner.connection_lost(exc)


class StatusWeb:
    """The read-only web page of a status node: :meth:`start` it, :meth:`publish` each snapshot,
    :meth:`stop` it. ``port`` 0 picks a free port (:meth:`start` returns the real one).

    ``idle_timeout``: a connection that has not sent a whole request within this many seconds of
    opening, or of its last response, is closed. ``write_timeout``: one whose responses sit unread
    this long is aborted."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        max_connections: int = 32,
        *,
        idle_timeout: float = 5.0,
        write_timeout: float = 15.0,
        chart_every: float = CHART_EVERY_S,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.host, self.port, self.max_connections = host, port, max_connections
        self.idle_timeout, self.write_timeout = idle_timeout, write_timeout
        self.chart_every = chart_every
        self._chart_since: dict[int, float] = {}  # run index → when its chart's version last moved
        self.refused = 0  # connections aborted for want of a slot (read by tests and for diagnosis)
        self.renders = 0  # charts drawn (each a change of some run's history that someone looked at)
        # Answers by (route, status), e.g. ("status", 304): what the clients cost, for tests and diagnosis.
        self.answered: collections.Counter[tuple[str, int]] = collections.Counter()
        self.url: str | None = None
        self._published = _empty_published()
        self._lock = threading.Lock()
        self._static: dict[str, _Body] = {}
        self._slots: set[_Slot] = set()
        self._charts: collections.OrderedDict[int, tuple[str, _Body]] = collections.OrderedDict()
        self._drawing: dict[tuple[int, str], asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closing = False

    @property
    def connections(self) -> int:
        """How many connections hold a place now."""
        return len(self._slots)

    # --- the node's side (its own thread) -------------------------------------------------------------

    def start(self) -> str:
        """Serve on a daemon thread with its own event loop; returns ``http://HOST:PORT``, or raises
        what stopped the server from starting (the port taken, say)."""
        if self._thread is not None:
            raise RuntimeError("StatusWeb is already started")
        self._ready.clear()
        self._error, self._closing, self.url = None, False, None
        self._static = {"/": _Body.of((STATIC / "status.html").read_bytes(), "text/html; charset=utf-8")}
        for name, kind in STATIC_FILES.items():
            charset = "" if kind.startswith("image/") else "; charset=utf-8"
            self._static[f"/static/{name}"] = _Body.of((STATIC / name).read_bytes(), kind + charset)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="status-web-chart")
        self._thread = threading.Thread(target=self._run, name="status-web", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the status web server did not start within 30 s")
        if self._error is not None:
            self._thread.join(5)
            self._thread = None
            raise self._error
        assert self.url is not None
        return self.url

    def publish(self, status: dict) -> None:
        """The latest snapshot, served from now on. Thread-safe, and the only cost paid per snapshot:
        it is serialized here once, whatever the number of clients. A run's chart moves to a new
        version at most every ``chart_every`` s: a trainer reports its loss every few seconds, and
        each new version is a drawing (~0.1 s of a core) as soon as one page is open."""
        now = time.monotonic()
        with self._lock:
            before = self._published.charts
            charts = []
            for i, chart in enumerate(_charts_of(status)):
                old = before[i] if i < len(before) else None
                if old is not None and old.etag != chart.etag and old.title == chart.title:
                    if now - self._chart_since.get(i, -math.inf) < self.chart_every:
                        chart = old  # drawn again once the interval has passed
                if old is None or chart.etag != old.etag:
                    self._chart_since[i] = now
                charts.append(chart)
            self._published = _publishable(status, charts)

    def stop(self) -> None:
        """Stop serving: every connection aborted, the thread joined (a few seconds at most)."""
        thread, loop, stopped = self._thread, self._loop, self._stopped
        if thread is None:
            return
        if loop is not None and stopped is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopped.set)
            except RuntimeError:  # the loop closed in between
                pass
        thread.join(10)
        if thread.is_alive():
            log.warning("the status web thread did not stop within 10 s; it is a daemon, left behind")
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._thread = None

    # --- the web thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            # asyncio.run: whatever is still pending at the end is cancelled, then the loop closed.
            asyncio.run(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported by start(), or logged if it came later
            if not self._ready.is_set():
                self._error = e
            else:
                log.exception("the status web server failed")
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        app = web.Application(middlewares=[self._only_reads], client_max_size=1024)
        app.on_response_prepare.append(self._secure)
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._page)
        app.router.add_get("/api/status", self._status, name="status")
        app.router.add_get("/api/ledger", self._ledger, name="ledger")
        app.router.add_get(r"/chart/{index:\d{1,6}}.png", self._chart, name="chart")
        self._runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a handler whose client left stops there
            keepalive_timeout=self.idle_timeout,  # also the deadline for a first request (see the docstring)
            lingering_time=1.0,  # an unread body is drained for at most this long
            max_line_size=4096,
            max_field_size=8190,
            access_log=None,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        server = None
        try:
            server = await self._loop.create_server(
                lambda: _Slot(self), self.host, self.port, backlog=self.max_connections, reuse_address=True
            )
            sockname = server.sockets[0].getsockname()
            host = f"[{sockname[0]}]" if server.sockets[0].family == socket.AF_INET6 else sockname[0]
            self.url = f"http://{host}:{sockname[1]}"
            self._ready.set()
            await self._stopped.wait()
        finally:
            self._closing = True  # a connection accepted from now on is aborted at once (see _Slot)
            if server is not None:
                # Accepts already under way finish first (and are aborted): asyncio drops, without
                # closing it, a socket it accepted just before server.close() but made a transport after.
                await asyncio.sleep(0.05)
                server.close()
            for slot in list(self._slots):
                slot.abort()
            await self._runner.cleanup()
            self._runner = None
            for fut in self._drawing.values():
                fut.cancel()
            # An abort closes its socket in a callback: let those run (and any accept already under
            # way reach its connection_made, which aborts it) before the loop goes.
            for _ in range(3):
                for slot in list(self._slots):
                    slot.abort()
                await asyncio.sleep(0.01)

    @web.middleware
    async def _only_reads(self, request: web.Request, handler) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        return await handler(request)

    async def _secure(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(SECURITY_HEADERS)

    def _send(self, request: web.Request, body: _Body) -> web.Response:
        headers = {"ETag": body.etag, "Cache-Control": "no-cache", "Vary": "Accept-Encoding"}
        route = request.match_info.route.name or "page"
        if _matches(request.headers.get("If-None-Match"), body.etag):
            self.answered[route, 304] += 1
            return web.Response(status=304, headers=headers)
        self.answered[route, 200] += 1
        if body.gz is not None and "gzip" in request.headers.get("Accept-Encoding", ""):
            headers["Content-Encoding"] = "gzip"
            return web.Response(body=body.gz, headers=headers | {"Content-Type": body.content_type})
        return web.Response(body=body.data, headers=headers | {"Content-Type": body.content_type})

    async def _page(self, request: web.Request) -> web.Response:
        body = self._static.get(request.path)
        if body is None:
            raise web.HTTPNotFound()
        return self._send(request, body)

    async def _status(self, request: web.Request) -> web.Response:
        return self._send(request, self._published.status)

    async def _ledger(self, request: web.Request) -> web.Response:
        return self._send(request, self._published.ledger)

    async def _chart(self, request: web.Request) -> web.Response:
        index = int(request.match_info["index"])
        charts = self._published.charts
        if index >= len(charts):
            raise web.HTTPNotFound()
        chart = charts[index]
        if _matches(request.headers.get("If-None-Match"), chart.etag):
            # The client holds this version already: nothing to draw or send.
            self.answered["chart", 304] += 1
            return web.Response(status=304, headers={"ETag": chart.etag, "Cache-Control": "no-cache"})
        cached = self._charts.get(index)
        if cached is not None and cached[0] == chart.etag:
            self._charts.move_to_end(index)
            return self._send(request, cached[1])
        body = await asyncio.shield(self._draw(index, chart))
        return self._send(request, body)

    def _draw(self, index: int, chart: _Chart) -> asyncio.Future:
        """The drawing of ``chart``: started once, shared by every request that wants that version
        meanwhile (shielded: a client that leaves does not cancel it for the others)."""
        key = (index, chart.etag)
        fut = self._drawing.get(key)
        if fut is not None:
            return fut
        assert self._loop is not None and self._pool is not None

        def draw() -> _Body:
            try:
                png = render_chart(chart.history, chart.title)
            except Exception:  # noqa: BLE001 - peers' numbers should never fail a chart, but if they do: say so
                log.exception("could not draw the loss chart of %s", chart.title)
                png = render_chart(None)
            return _Body(png, "image/png", chart.etag)  # PNG is compressed already: no gzip copy

        fut = self._loop.run_in_executor(self._pool, draw)
        self._drawing[key] = fut
        self.renders += 1

        def done(f: asyncio.Future) -> None:
            self._drawing.pop(key, None)
            if not f.cancelled() and f.exception() is None:
                self._charts[index] = (chart.etag, f.result())
                self._charts.move_to_end(index)
                while len(self._charts) > CHART_CACHE:
                    self._charts.popitem(last=False)

        fut.add_done_callback(done)
        return fut
