"""An honest client's seconds per image while a stranger floods its expert server, side by side in one run.

A ``node.py --role server`` subprocess serves 4 random-weight ``tiny`` experts (as
``benchmarks/serving.py``); an honest client in this process generates one image at a time (one
prompt, top-1, 30 steps, every expert remote). Quiet and flooded phases alternate: in a flooded
phase a stranger — another node in this process, one peer id — keeps 8 streams to the server
full of the largest valid request (32 images of the run's 16 MiniLM tokens), each sent again as
soon as it is answered, "busy" or not. Reported: seconds per image quiet and flooded, their ratio
(the aim: 2x or less), and what the flooder got (requests served, "busy" replies, anything else).

    .venv/bin/python benchmarks/fair_serving.py [--images 3] [--rounds 2] [--pin]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hivemind.p2p import PeerID  # noqa: E402

from benchmarks.results import RESULTS, append_section, machine  # noqa: E402
from benchmarks.serving import K, pin, publish_random_set, text_encoder  # noqa: E402
from diffswarm.remote import RemotePool  # noqa: E402
from experts.latent_space import load_space  # noqa: E402
from roles.local import LOOPBACK, NodeProcess  # noqa: E402
from router.sampling import SamplerConfig, generate  # noqa: E402
from swarm.blobs import BlobService, BlobStore  # noqa: E402
from swarm.dht import SwarmConfig, SwarmNode  # noqa: E402
from swarm.protocol import PROTOCOL, DenoiseRequest, encode_request, encoder_tokens, read_frame  # noqa: E402
from swarm.records import ServeRecord  # noqa: E402

STREAMS = 8


class Flooder:
    """A stranger keeping ``streams`` streams to one server full of one valid request each (sent
    again as soon as it is answered), from :meth:`start` until :meth:`stop`; counts the replies."""

    def __init__(self, blobs: BlobService, server: str, request: bytes, streams: int = STREAMS) -> None:
        self.blobs, self.server, self.request, self.streams = blobs, server, request, streams
        self.ok = self.busy = 0
        self.errors: list[str] = []
        self.halt = threading.Event()
        self._thread = threading.Thread(target=lambda: blobs.call(self._run(), timeout=3600), daemon=True)

    def start(self) -> Flooder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.halt.set()
        self._thread.join(timeout=120)

    async def _run(self) -> None:
        await asyncio.gather(*(self._stream() for _ in range(self.streams)))

    async def _stream(self) -> None:
        while not self.halt.is_set():
            try:
                _, reader, writer = await asyncio.wait_for(
                    self.blobs.p2p.call_binary_stream_handler(PeerID.from_base58(self.server), PROTOCOL), 10
                )
            except Exception as e:  # noqa: BLE001 (a failed dial is counted, then tried again)
                self.errors.append(repr(e))
                await asyncio.sleep(0.5)
                continue
            try:
                while not self.halt.is_set():
                    writer.write(self.request)
                    await writer.drain()
                    header, _ = await asyncio.wait_for(read_frame(reader, 1 << 24), 60)
                    if header.get("ok"):
                        self.ok += 1
                    elif header.get("busy"):
                        self.busy += 1
                    else:
                        self.errors.append(str(header.get("error")))
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as e:
                self.errors.append(repr(e))
            finally:
                writer.close()


def largest_request(rec: ServeRecord, text_encoder: str, expert: int = 0) -> bytes:
    """The largest request ``rec``'s server takes: ``max_batch`` images, the encoder's most tokens."""
    b, tokens = rec.max_batch, encoder_tokens(text_encoder)
    c, h, w = rec.shape
    x, t = torch.randn(b, c, h, w), torch.full((b,), 0.5)
    states, mask = torch.randn(2 * b, tokens, rec.text_dim), torch.ones(2 * b, tokens)
    return encode_request(DenoiseRequest(1, expert, rec.ckpt, x, t, 0.4, states, mask, 3.0))


def measure(
    tmp: Path, images: int, rounds: int, pinned: bool, streams: int = STREAMS, steps: int = 30
) -> dict[str, object]:
    """Seconds per image of an honest client, quiet and with a stranger's flood, alternating
    ``rounds`` times (``images`` each); the flooder's replies. Starts and stops its own swarm."""
    cores = sorted(os.sched_getaffinity(0))
    encoder = text_encoder()
    node = SwarmNode(SwarmConfig(str(tmp / "me"), host_maddrs=[LOOPBACK], own_run="bench"))
    blobs = BlobService(node.dht, BlobStore())
    server = stranger = stranger_blobs = None
    try:
        made = publish_random_set(tmp / "set", node, blobs.store, encoder.dim)
        server = NodeProcess(
            "server",
            ["--role", "server", "--expert", ",".join(map(str, range(K))), "--workdir", str(tmp / "server")]
            + ["--initial-peers", *node.maddrs(), "--host-maddrs", LOOPBACK]
            + (["--threads", "1"] if pinned else []),
            tmp / "server.log",
        )
        server.wait_for("serving expert", 300)
        deadline = time.monotonic() + 60
        while len(servers := node.servers(made["run"], list(range(K)))) < K:
            if time.monotonic() > deadline:
                raise RuntimeError("the server never announced itself:\n" + server.tail())
            time.sleep(0.5)
        stranger = SwarmNode(SwarmConfig(str(tmp / "stranger"), initial_peers=node.maddrs(), host_maddrs=[LOOPBACK]))
        stranger_blobs = BlobService(stranger.dht, BlobStore())
        if pinned:  # the server on the last core; this process (client and flooder) on the others
            pin(server.pid, {cores[-1]})
            pin(os.getpid(), set(cores[:-1]))
        rec = servers[0][0]
        flood_request = largest_request(rec, "minilm")
        space = load_space("")
        pool = RemotePool(blobs, servers)
        cfg = SamplerConfig(mode="top1", steps=steps)

        def image_seconds(requests: list | None = None) -> list[float]:
            """Seconds of each of ``images`` images; the honest requests' timings go to ``requests``."""
            out, first = [], len(pool.latency)
            for i in range(images):
                t0 = time.perf_counter()
                generate([f"red apple {i}"], made["router"], pool.experts(), encoder, space, (3, 32, 32), cfg)
                out.append(time.perf_counter() - t0)
            if requests is not None:
                requests += pool.latency[first:]
            return out

        image_seconds()  # warm-up: the first stream, the first allocations
        quiet, flooded = [], []
        quiet_req, flooded_req = [], []  # (round trip s, the server's timings in ms) of each honest request
        ok = busy = 0
        errors: list[str] = []
        for r in range(rounds):
            quiet += image_seconds(quiet_req)
            flooder = Flooder(stranger_blobs, rec.peer, flood_request, streams).start()
            try:
                deadline = time.monotonic() + 120
                while not (flooder.ok and flooder.busy):  # the flood is on: served, and refused
                    if time.monotonic() > deadline or flooder.errors:
                        raise RuntimeError(f"the flood never got going: {flooder.errors[:3]}\n{server.tail()}")
                    time.sleep(0.2)
                flooded += image_seconds(flooded_req)
            finally:
                flooder.stop()
            ok, busy, errors = ok + flooder.ok, busy + flooder.busy, errors + flooder.errors
            print(f"round {r + 1}: quiet {quiet[-images:]}, flooded {flooded[-images:]}", flush=True)
        failovers = list(pool.events)
        pool.close()
    finally:
        if server is not None:
            server.stop()
        for b, n in ((stranger_blobs, stranger), (blobs, node)):
            if b is not None:
                b.shutdown()
            if n is not None:
                n.shutdown()

    def per_request(reqs: list) -> dict[str, float]:
        """Medians in ms: the round trip, the server's share of it, the wait in its queue."""
        return {
            "round_trip_ms": statistics.median(rtt * 1e3 for rtt, _ in reqs),
            "server_ms": statistics.median(t.get("server_ms", 0.0) for _, t in reqs),
            "queued_ms": statistics.median(t.get("server_ms", 0.0) - t.get("forward_ms", 0.0) for _, t in reqs),
        }

    return {
        "quiet_s": statistics.median(quiet),
        "flooded_s": statistics.median(flooded),
        "quiet_request": per_request(quiet_req),
        "flooded_request": per_request(flooded_req),
        "quiet_all": quiet,
        "flooded_all": flooded,
        "flood_served": ok,
        "flood_busy": busy,
        "flood_errors": errors,
        "honest_failovers": failovers,
        "flood_request_mib": len(flood_request) / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3, help="images per phase")
    ap.add_argument("--rounds", type=int, default=2, help="quiet / flooded phase pairs")
    ap.add_argument("--pin", action="store_true", help="server on the last core, client and flooder on the rest")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("--pin needs at least 2 cores")
    if args.pin:
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        got = measure(Path(d), args.images, args.rounds, args.pin)
    print(json.dumps(got), flush=True)
    ratio = got["flooded_s"] / got["quiet_s"]
    lines = [
        f"## Fair serving under a flood ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Loopback; one `node.py --role server` serving 4 random-weight `tiny` experts; "
        "an honest client in the benchmark process draws one image at a time (1 prompt, top-1, 30 steps, every "
        f"expert remote); in flooded phases a stranger (one peer id) keeps {STREAMS} streams full of the largest "
        f"valid request ({got['flood_request_mib']:.1f} MiB: 32 images x 16 MiniLM tokens), resent as soon as "
        f"it is answered. {args.rounds} quiet and {args.rounds} flooded phases of {args.images} images, "
        "alternating; medians"
        + (
            "; server pinned to the last core, client and flooder to the others, 1 torch thread each."
            if args.pin
            else "; every process shares every core."
        ),
        "",
        "| measurement | value | side-by-side reference | ratio |",
        "|---|---:|---:|---:|",
        f"| honest client, seconds per image, flooded | {got['flooded_s']:.2f} s | quiet {got['quiet_s']:.2f} s "
        f"| {ratio:.2f} |",
        "| honest request, median round trip / in the server / waiting in its queue, flooded | "
        + " / ".join(f"{got['flooded_request'][k]:.1f}" for k in ("round_trip_ms", "server_ms", "queued_ms"))
        + " ms | quiet "
        + " / ".join(f"{got['quiet_request'][k]:.1f}" for k in ("round_trip_ms", "server_ms", "queued_ms"))
        + " ms | |",
        f"| the flood: requests served / answered busy / other replies | {got['flood_served']} / "
        f"{got['flood_busy']} / {len(got['flood_errors'])} | | |",
        f"| the honest client's failovers (a busy reply would be one) | {len(got['honest_failovers'])} | | |",
        "",
        f"Command: `.venv/bin/python benchmarks/fair_serving.py --images {args.images} --rounds {args.rounds}"
        f"{' --pin' if args.pin else ''}`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    append_section(text, args.out)


if __name__ == "__main__":
    main()
