"""Peer-to-peer blob transfer by sha256: manifests, shards and checkpoint files.

One streaming handler serves any blob this node holds. A request is the blob's sha256 (32 raw
bytes) and a start offset; the reply is a status byte, the blob's size, then its bytes, sent in
chunks straight from the file. The receiver hashes while it writes to a temporary file and only
renames it into place when the sha256 matches, so a corrupt or forged blob is never used; it
then tries the next provider. A checkpoint travels as its ``meta.json`` (whose sha256 is the
checkpoint's identity) followed by every file that meta lists.

A fetch has a byte budget (a checkpoint's: what its record and its preset allow, see
:func:`swarm.mirror.fetch_budget`; the whole checkpoint's files count against it). A provider
whose reply announces more than what is left of the budget is refused before a byte is written.
A provider whose transfer runs below a floor rate (:data:`MIN_RATE` over any
:data:`RATE_WINDOW_S` after the first) is dropped: a drip of bytes cannot hold a fetch for longer
than about one window. Either one, like a blob that does not match its sha256, gets its provider
banned here (:class:`swarm.bans.Bans`), and the fetch goes on with the next provider.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import struct
import threading
from collections import deque
from pathlib import Path

from data.checkpoint import META_NAME, Checkpoint, verify_checkpoint
from data.manifest import sha256_file
from swarm.bans import Bans
from swarm.proxy import open_stream

PROTOCOL = "diffswarm-blob-v1"
CHUNK = 1 << 20
OK, MISSING = 0, 1
MAX_BLOB = 64 << 30  # refuse absurd sizes a peer might announce (a fetch given no budget)
# A fetched checkpoint given no budget: above the largest preset's bound (XL/2 is ~12 GB with its
# optimizer state; tests/test_blobs.py checks every preset's :func:`swarm.mirror.checkpoint_budget`
# fits). Callers that know the record pass its budget instead.
MAX_CHECKPOINT = 16 << 30
MAX_META = 16 << 20  # a checkpoint's meta.json: kilobytes (a thinned loss curve, hashes); never this
MIN_RATE = 1e6  # bytes/s: a provider slower than this over a whole window is dropped and banned
RATE_WINDOW_S = 10.0  # the window the rate is measured over (the first one is free: a slow start)


class BlobError(RuntimeError):
    """No provider could deliver a blob that matches its sha256."""


class _BadProvider(BlobError):
    """A provider sent bytes that are not the blob it announced, announced more than the budget,
    or sent too slowly: it gets banned."""


class BlobStore:
    """The blobs this node can provide: sha256 → a verified local file."""

    def __init__(self) -> None:
        self._paths: dict[str, Path] = {}
        self._lock = threading.Lock()

    def add_file(self, path: Path, sha256: str | None = None) -> str:
        digest = sha256 or sha256_file(path)
        with self._lock:
            self._paths[digest] = Path(path)
        return digest

    def add_checkpoint(self, ckpt: Checkpoint) -> None:
        """Provide a verified checkpoint: its meta.json under the checkpoint's sha256, and its files."""
        self.add_file(ckpt.path / META_NAME, ckpt.sha256)
        for rel, digest in ckpt.meta["files"].items():
            self.add_file(ckpt.path / rel, digest)

    def path(self, sha256: str) -> Path | None:
        with self._lock:
            return self._paths.get(sha256)

    def items(self) -> list[tuple[str, Path]]:
        """Held blobs whose files still exist (pruned checkpoints drop out here)."""
        with self._lock:
            self._paths = {d: p for d, p in self._paths.items() if p.is_file()}
            return list(self._paths.items())

    def __contains__(self, sha256: str) -> bool:
        return self.path(sha256) is not None


class BlobService:
    """Serves :class:`BlobStore` over the node's libp2p daemon and fetches from other peers.

    hivemind's P2P API is asyncio; it runs in a private event-loop thread so the rest of the
    node stays synchronous.
    """

    def __init__(
        self,
        dht,
        store: BlobStore,
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        bans: Bans | None = None,
        min_rate: float = MIN_RATE,
        rate_window: float = RATE_WINDOW_S,
    ) -> None:
        self.store, self.timeout, self.connect_timeout = store, timeout, connect_timeout
        self.min_rate, self.rate_window = min_rate, rate_window  # the floor a transfer must keep up
        self.bans = bans or Bans()  # a provider that sends a wrong blob is skipped for a while
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="blob-service", daemon=True)
        self._thread.start()
        self._handlers = {PROTOCOL: self._serve}  # every protocol this endpoint serves
        self.p2p = self._run(dht.replicate_p2p())
        self._run(self.p2p.add_binary_stream_handler(PROTOCOL, self._serve))

    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, coro, timeout: float | None = None):
        """Run a coroutine on this node's P2P event loop from synchronous code and wait for it."""
        return self._run(coro, timeout)

    def add_stream_handler(self, protocol: str, handler) -> None:
        """Serve another binary stream protocol on the same libp2p endpoint (e.g. denoising)."""
        self._run(self.p2p.add_binary_stream_handler(protocol, handler))
        self._handlers[protocol] = handler

    def rebind(self, dht) -> None:
        """Serve and fetch through ``dht``'s p2p daemon from now on (its node restarted it: see
        :meth:`swarm.dht.SwarmNode.on_restart`); every handler is registered there again."""
        old, self.p2p = self.p2p, self._run(dht.replicate_p2p())
        for protocol, handler in self._handlers.items():
            self._run(self.p2p.add_binary_stream_handler(protocol, handler))
        try:
            self._run(old.shutdown(), timeout=5)
        except Exception:  # its daemon is gone already
            pass

    async def _serve(self, _info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readexactly(40)
            digest, offset = request[:32].hex(), struct.unpack(">Q", request[32:])[0]
            path = self.store.path(digest)
            if path is None or not path.is_file():
                writer.write(struct.pack(">BQ", MISSING, 0))
                await writer.drain()
                return
            size = path.stat().st_size
            writer.write(struct.pack(">BQ", OK, size))
            with open(path, "rb") as f:
                f.seek(min(offset, size))
                while chunk := f.read(CHUNK):
                    writer.write(chunk)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the requester went away; nothing to clean up
        finally:
            writer.close()

    async def _fetch_one(self, peer: str, digest: str, dest: Path, max_bytes: int) -> None:
        # A dead provider must cost seconds, not the whole transfer budget: bound the connect and
        # every silence separately; a live but slow one is judged by its rate (below).
        _, reader, writer = await open_stream(self.p2p, peer, PROTOCOL, self.connect_timeout)
        tmp = dest.with_name(dest.name + ".part")
        try:
            writer.write(bytes.fromhex(digest) + struct.pack(">Q", 0))
            await writer.drain()
            status, size = struct.unpack(">BQ", await asyncio.wait_for(reader.readexactly(9), self.connect_timeout))
            if status != OK:
                raise BlobError(f"peer {peer[:12]}… does not have blob {digest[:12]}")
            budget = min(max_bytes, MAX_BLOB)
            if size > budget:  # before a byte is written
                raise _BadProvider(
                    f"peer {peer[:12]}… announced {size} bytes for {digest[:12]}, over the budget of {budget}"
                )
            h = hashlib.sha256()
            loop = asyncio.get_running_loop()
            started = last = loop.time()
            recent: deque[tuple[float, int]] = deque()  # (arrival, bytes) of the chunks in the last window
            in_window = 0
            with open(tmp, "wb") as f:
                left = size
                while left:
                    try:  # wake at least every second, so a drip is judged on time
                        chunk = await asyncio.wait_for(reader.read(min(CHUNK, left)), min(1.0, self.connect_timeout))
                    except TimeoutError:
                        chunk = None
                    now = loop.time()
                    if chunk == b"":
                        raise BlobError(f"peer {peer[:12]}… closed the stream early")
                    if chunk:
                        h.update(chunk)
                        f.write(chunk)
                        left -= len(chunk)
                        recent.append((now, len(chunk)))
                        in_window += len(chunk)
                        last = now
                    elif now - last > self.connect_timeout:
                        raise BlobError(f"peer {peer[:12]}… sent nothing for {self.connect_timeout:.0f}s")
                    while recent and recent[0][0] < now - self.rate_window:
                        in_window -= recent.popleft()[1]
                    if left and now - started >= self.rate_window and in_window < self.min_rate * self.rate_window:
                        raise _BadProvider(
                            f"peer {peer[:12]}… sent {in_window} bytes of {digest[:12]} in {self.rate_window:.0f}s, "
                            f"below the floor of {self.min_rate / 1e6:g} MB/s"
                        )
            if h.hexdigest() != digest:
                raise _BadProvider(f"blob from peer {peer[:12]}… does not match sha256 {digest[:12]}; refused")
            tmp.rename(dest)
        except BaseException:
            tmp.unlink(missing_ok=True)  # nothing of a refused or broken transfer stays on disk
            raise
        finally:
            writer.close()

    def fetch(self, digest: str, providers: list[str], dest: Path, max_bytes: int = MAX_BLOB) -> Path:
        """Fetch blob ``digest`` into ``dest`` from the first provider that delivers it intact in
        time, writing at most ``max_bytes``."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        held = self.store.path(digest)
        if held is not None and held.is_file():  # already here (another folder): copy, no network
            if held.stat().st_size > max_bytes:
                raise BlobError(f"blob {digest[:12]} held here has {held.stat().st_size} bytes, over {max_bytes}")
            if held.resolve() != dest.resolve():
                shutil.copyfile(held, dest)
            return dest
        errors = []
        for peer in providers:
            if self.bans.banned(peer):
                errors.append(f"peer {peer[:12]}… is banned here")
                continue
            try:
                self._run(asyncio.wait_for(self._fetch_one(peer, digest, dest, max_bytes), self.timeout))
                self.store.add_file(dest, digest)
                return dest
            except _BadProvider as e:
                self.bans.ban(peer, str(e))
                errors.append(str(e))
            except Exception as e:  # any failure of one provider means: try the next one
                errors.append(str(e) or repr(e))
        raise BlobError(f"could not fetch {digest[:12]} from {len(providers)} provider(s): " + "; ".join(errors[-3:]))

    def fetch_checkpoint(
        self, sha256: str, providers: list[str], dest: Path, max_bytes: int = MAX_CHECKPOINT
    ) -> Checkpoint:
        """Fetch a whole checkpoint folder and verify it before returning it.

        ``max_bytes`` is the budget of the whole folder (meta.json and every file it lists): what
        a checkpoint record's size and its preset allow (:func:`swarm.mirror.fetch_budget`). Each
        file is fetched with what is left of it, so no more than that is ever written.

        Files land in a staging folder beside ``dest`` that is renamed into place only once the
        whole checkpoint verifies: a transfer cut off halfway (its provider died) leaves nothing
        that looks like a checkpoint.
        """
        stage = dest.parent / f".fetching-{dest.name}"
        shutil.rmtree(stage, ignore_errors=True)
        try:
            meta_path = self.fetch(sha256, providers, stage / META_NAME, min(max_bytes, MAX_META))
            left = max_bytes - meta_path.stat().st_size
            files = json.loads(meta_path.read_bytes())["files"]
            for rel, digest in files.items():
                target = (stage / rel).resolve()
                if not str(target).startswith(str(stage.resolve()) + "/"):
                    raise BlobError(f"checkpoint {sha256[:12]} lists a file outside its folder: {rel!r}")
                self.fetch(digest, providers, target, left)
                left -= target.stat().st_size
            staged = verify_checkpoint(stage, expected_sha256=sha256)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        shutil.rmtree(dest, ignore_errors=True)  # an incomplete or unverifiable copy from before
        stage.rename(dest)
        ckpt = Checkpoint(dest, staged.meta, staged.sha256)  # verified above; a rename changes no byte
        self.store.add_checkpoint(ckpt)
        return ckpt

    def shutdown(self) -> None:
        try:
            for protocol in list(self._handlers):
                self._run(self.p2p.remove_binary_stream_handler(protocol), timeout=5)
            self._run(self.p2p.shutdown(), timeout=5)
        except Exception:  # shutting down: the daemon may already be gone
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def announce(node, store: BlobStore, ttl: float | None = None, only: set[str] | None = None) -> int:
    """Tell the swarm this node provides the blobs it holds (all, or those in ``only``);
    returns how many were announced."""
    from swarm.records import PROVIDER_TTL_S, ProviderRecord, blob_key

    n = 0
    for digest, path in store.items():
        if only is not None and digest not in only:
            continue
        if path.is_file() and node.store(
            blob_key(digest), ProviderRecord(node.peer_id, path.stat().st_size), ttl or PROVIDER_TTL_S
        ):
            n += 1
    return n


def providers(node, digest: str) -> list[str]:
    """Peers that announced ``digest``, this node excluded, in a stable order."""
    return sorted(node.providers(digest) - {node.peer_id})
