"""Serving costs, measured side by side in one run on loopback:

1. per-step overhead of a remote expert (one open stream per server, ``swarm.protocol``) vs the
   same expert in this process: p50 / p95 of one guided forward (cond + uncond, 1 image);
2. server throughput (requests/s) with 8 concurrent clients ÷ 1 client (the server batches);
3. seconds per image with top-1, top-2 and the full ensemble, every expert remote.

The experts are ``tiny`` presets with random weights (cost does not depend on training); a
``node.py --role server`` subprocess serves all four, fetching them peer-to-peer from this process.
With ``--pin`` (what ``make bench`` runs) the server and everything it started are pinned to the
last core and this process (the client) to the others, one torch thread each: two machines on one
box, so neither side's OpenMP threads spin on the other's core and the figures are the protocol's.

    .venv/bin/python benchmarks/serving.py
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hivemind.p2p import PeerID  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402

from benchmarks.results import RESULTS, append_section, machine  # noqa: E402
from data.checkpoint import save_checkpoint  # noqa: E402
from data.job_id import JobId  # noqa: E402
from diffswarm.remote import RemotePool  # noqa: E402
from experts.latent_space import load_space  # noqa: E402
from experts.presets import build_expert, get_preset  # noqa: E402
from experts.text_encoder import MiniLMEncoder, TextEncoder, TextEncoderConfig, load_text_encoder  # noqa: E402
from roles.local import LOOPBACK, NodeProcess  # noqa: E402
from router.network import build_router, get_router_preset  # noqa: E402
from router.sampling import LocalExpert, SamplerConfig, generate  # noqa: E402
from swarm.blobs import BlobService, BlobStore  # noqa: E402
from swarm.dht import SwarmConfig, SwarmNode  # noqa: E402
from swarm.mirror import publish_checkpoint  # noqa: E402
from swarm.protocol import PROTOCOL, DenoiseRequest, encode_request, parse_reply, read_frame  # noqa: E402
from swarm.records import RUN_TTL_S, RunDirRecord, RunRecord, Verdict, run_key, runs_key  # noqa: E402

K = 4
RUN = "5e" * 32  # a run id for the random-weight set


def publish_random_set(tmp: Path, node: SwarmNode, store: BlobStore, text_dim: int) -> dict:
    preset = get_preset("tiny")
    run = RunRecord(RUN, K, ["tiny"] * K, ["fm"] * K, 1, name=node.ref.name)
    node.store(run_key(), run, RUN_TTL_S)
    node.store(runs_key(), RunDirRecord(run.name, RUN), RUN_TTL_S)
    models = {}
    for k in range(K):
        torch.manual_seed(k)
        models[k] = build_expert(preset, text_dim)
        meta = {"kind": "expert", "cluster": k, "objective": "fm", "preset": preset.to_dict()}
        meta |= {"text_encoder": "minilm", "space": "pixel", "manifest_sha256": RUN}
        job = JobId.expert(k)
        ckpt = save_checkpoint(job.folder(tmp), 1, models[k], meta)
        publish_checkpoint(node, store, run, str(job), ckpt)
        _vouch(node, run, str(job), ckpt)
    rp = get_router_preset("tiny")
    router = build_router(rp, K, preset.channels, preset.sample_size).eval()
    meta = {"kind": "router", "num_experts": K, "router_preset": rp.to_dict(), "space": "pixel"}
    ckpt = save_checkpoint(JobId.ROUTER.folder(tmp), 1, router, meta | {"manifest_sha256": RUN})
    publish_checkpoint(node, store, run, str(JobId.ROUTER), ckpt)
    _vouch(node, run, str(JobId.ROUTER), ckpt)
    return {"models": models, "router": router, "run": run}


def _vouch(node: SwarmNode, run: RunRecord, job: str, ckpt) -> None:
    """The run owner's verdict on its own random checkpoint: this run has no data to measure a
    held-out loss on, and everyone trusts the owner's verdicts."""
    node.publish_verdict(job, run, Verdict(ckpt.sha256, ckpt.step, node.fingerprint, True, get_dht_time(), 1.0))


class RandomStates(TextEncoder):
    """MiniLM-shaped token states (16 x 384), a fixed random tensor per caption: for machines
    without the MiniLM package. The experts have random weights anyway, and the cost of a step
    depends only on the shapes."""

    def __init__(self, dim: int = 384, tokens: int = 16) -> None:
        super().__init__("minilm")
        self.dim, self.tokens = dim, tokens

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out, masks = [], []
        for c in captions:
            g = torch.Generator().manual_seed(int(hashlib.sha256(c.encode()).hexdigest()[:8], 16))
            out.append(torch.randn(self.tokens, self.dim, generator=g))
            n = min(self.tokens, 2 + len(c.split()))  # [CLS] words [SEP], as a tokenizer would
            masks.append((torch.arange(self.tokens) < n).long())
        return torch.stack(out), torch.stack(masks)


def text_encoder() -> TextEncoder:
    try:
        return load_text_encoder(TextEncoderConfig())
    except ImportError:
        print("MiniLM is not installed here: random text states of the same shape", flush=True)
        return RandomStates()


def _tree(pid: int) -> list[int]:
    """``pid`` and every process it started, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` and of its descendants to ``cpus``."""
    for p in _tree(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except OSError:  # a thread that just ended
                pass


def percentiles(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[int(0.95 * (len(xs) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=10.0, help="per throughput measurement")
    ap.add_argument("--pin", action="store_true", help="server on the last core, client on the rest, 1 thread each")
    ap.add_argument("--device", default="cpu", help="where the server (and the local reference) run forwards")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.pin and len(cores) < 2:
        raise SystemExit("--pin needs at least 2 cores")
    if args.pin:
        torch.set_num_threads(1)
    encoder = text_encoder()
    cond, cmask = encoder.encode(["red apple"])
    uncond, umask = encoder.encode([""])
    states, mask = torch.cat([cond, uncond]), torch.cat([cmask, umask])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        node = SwarmNode(SwarmConfig(str(tmp / "me"), host_maddrs=[LOOPBACK], own_run="bench"))
        blobs = BlobService(node.dht, BlobStore())
        server = None
        try:
            made = publish_random_set(tmp / "set", node, blobs.store, encoder.dim)
            server = NodeProcess(
                "server",
                ["--role", "server", "--expert", ",".join(map(str, range(K))), "--workdir", str(tmp / "server")]
                + ["--initial-peers", *node.maddrs(), "--host-maddrs", LOOPBACK]
                + (["--threads", "1"] if args.pin else [])
                + ["--device", args.device],
                tmp / "server.log",
            )
            server.wait_for("serving expert", 300)
            if args.pin:
                pin(server.pid, {cores[-1]})
                pin(os.getpid(), set(cores[:-1]))  # this process, its DHT process and p2p daemon
            deadline = time.monotonic() + 60
            while len(servers := node.servers(made["run"], list(range(K)))) < K:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server never announced itself:\n" + server.tail())
                time.sleep(0.5)
            x, t = torch.randn(1, 3, 32, 32), torch.full((1,), 0.5)

            # 1. one step of expert 0: in this process vs on the server, alternating
            local = LocalExpert(made["models"][0], "fm", args.device)
            pool = RemotePool(blobs, servers)
            local_t, remote_t = [], []
            for i in range(args.calls + 20):
                t0 = time.perf_counter()
                local(x, t, states, mask, 3.0)
                t1 = time.perf_counter()
                pool.call(0, x, t, states, mask, 3.0, 0.45)
                t2 = time.perf_counter()
                if i >= 20:  # warm-up: first stream, first allocations
                    local_t.append(t1 - t0)
                    remote_t.append(t2 - t1)
            pool.close()
            lp50, lp95 = percentiles(local_t)
            rp50, rp95 = percentiles(remote_t)
            overhead = [r - loc for r, loc in zip(remote_t, local_t, strict=True)]
            op50, op95 = percentiles(overhead)
            # What the remote path adds to the server's own forward pass of that request
            # (transport, serialisation, queue hand-offs), from the timing in every reply.
            server_fwd = [tm["forward_ms"] / 1e3 for _, tm in pool.latency[20:]]
            added = [rtt - tm["forward_ms"] / 1e3 for rtt, tm in pool.latency[20:]]
            ap50, ap95 = percentiles(added)
            in_server = [(tm["server_ms"] - tm["forward_ms"]) / 1e3 for _, tm in pool.latency[20:]]
            isp50, isp95 = percentiles(in_server)
            sp50, _ = percentiles(server_fwd)
            print(f"step: local p50 {lp50 * 1e3:.2f} ms, remote p50 {rp50 * 1e3:.2f} ms", flush=True)

            # 2. requests/s with 1 and 8 concurrent clients, each its own session (stream) to the
            # server, all driven from this process's event loop so client-side Python costs little
            # and the figure is the server's; every request is a full guided step of 1 image.
            def throughput(clients: int) -> float:
                rec = servers[0][0]
                body = [
                    encode_request(DenoiseRequest(i, 0, rec.ckpt, x, t, 0.45, states, mask, 3.0))
                    for i in range(clients)
                ]

                async def client(i: int, stop: float) -> int:
                    _, reader, writer = await blobs.p2p.call_binary_stream_handler(
                        PeerID.from_base58(rec.peer), PROTOCOL
                    )
                    n = 0
                    try:
                        while time.monotonic() < stop:
                            writer.write(body[i])
                            await writer.drain()
                            header, payload = await read_frame(reader, 1 << 24)
                            parse_reply(header, payload, tuple(x.shape))
                            n += 1
                    finally:
                        writer.close()
                    return n

                async def run() -> int:
                    stop = time.monotonic() + args.seconds
                    return sum(await asyncio.gather(*(client(i, stop) for i in range(clients))))

                return blobs.call(run()) / args.seconds

            one, eight = throughput(1), throughput(8)
            print(f"throughput: 1 client {one:.0f} req/s, 8 clients {eight:.0f} req/s", flush=True)

            # 3. seconds per image, every expert remote
            pool = RemotePool(blobs, servers)
            space = load_space("")
            per_image = {}
            prompts = ["red apple", "rocket", "sun", "dog face"]
            for mode, k in (("top1", 1), ("topk", 2), ("full", K)):
                cfg = SamplerConfig(mode=mode, k=k, steps=30)
                t0 = time.perf_counter()
                generate(prompts, made["router"], pool.experts(), encoder, space, (3, 32, 32), cfg)
                per_image[f"{mode}{k if mode == 'topk' else ''}"] = (time.perf_counter() - t0) / len(prompts)
            pool.close()
        finally:
            if server is not None:
                server.stop()
            blobs.shutdown()
            node.shutdown()
    lines = [
        f"## Serving ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Loopback; one `node.py --role server` serving 4 random-weight `tiny` experts "
        f"on {args.device}; "
        "the client in the benchmark process; measured side by side in one run"
        + (
            f"; server pinned to core {cores[-1]} and the client to core(s) {','.join(map(str, cores[:-1]))}, "
            "1 torch thread each (two machines on one box)."
            if args.pin
            else "; client and server share every core."
        ),
        "",
        "| measurement | value | side-by-side reference | ratio |",
        "|---|---:|---:|---:|",
        "| one step of one expert (1 image, cond + uncond), remote, p50 / p95 | "
        f"{rp50 * 1e3:.2f} / {rp95 * 1e3:.2f} ms "
        f"| same expert in-process {lp50 * 1e3:.2f} / {lp95 * 1e3:.2f} ms | {rp50 / lp50:.2f} |",
        "| per-step overhead of remote (remote − local, paired), p50 / p95 | "
        f"{op50 * 1e3:.2f} / {op95 * 1e3:.2f} ms "
        "| target ≤ 2 ms p50 | |",
        "| time a remote step adds to the server's forward pass (round trip − forward_ms in the reply), p50 / p95 | "
        f"{ap50 * 1e3:.2f} / {ap95 * 1e3:.2f} ms | server forward p50 {sp50 * 1e3:.2f} ms | {ap50 / sp50:.2f} |",
        "| … of which inside the server (parse, validate, queue, hand-off to the forward, reply), p50 / p95 | "
        f"{isp50 * 1e3:.2f} / {isp95 * 1e3:.2f} ms | | |",
        f"| server throughput, 8 concurrent client sessions | {eight:.0f} requests/s | 1 session {one:.0f} requests/s "
        f"| {eight / one:.2f} |",
        f"| seconds per image, 30 steps, every expert remote: top-1 / top-2 / full | {per_image['top1']:.3f} / "
        f"{per_image['topk2']:.3f} / {per_image['full']:.3f} s | top-1 "
        f"| 1.00 / {per_image['topk2'] / per_image['top1']:.2f} / {per_image['full'] / per_image['top1']:.2f} |",
        "",
        f"Command: `.venv/bin/python benchmarks/serving.py{' --pin' if args.pin else ''}"
        f"{'' if args.device == 'cpu' else ' --device ' + args.device}`"
        + ("" if isinstance(encoder, MiniLMEncoder) else " (MiniLM not installed: random text states, same shape)"),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    data = {"local_ms": [lp50 * 1e3, lp95 * 1e3], "remote_ms": [rp50 * 1e3, rp95 * 1e3]}
    data |= {"overhead_ms": [op50 * 1e3, op95 * 1e3], "added_ms": [ap50 * 1e3, ap95 * 1e3]}
    data |= {"rps_1": one, "rps_8": eight, "s_per_image": per_image}
    print(json.dumps(data))
    append_section(text, args.out)


if __name__ == "__main__":
    main()
