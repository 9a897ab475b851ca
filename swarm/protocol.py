"""The wire format of a denoising request between a client and an expert server.

A client opens one binary stream per server per generation and sends framed requests on it; the
server answers each in order on the same stream, so a step costs one round trip and no
connection set-up. A frame is ``>I`` header length, a UTF-8 JSON header, then ``nbytes`` of raw
little-endian tensor data named by the header — never pickle, and every field is checked before
a byte of payload is trusted.

    request  {"op": "denoise", "id", "expert", "ckpt", "x": [B,C,H,W], "states": [2B,L,D],
              "t": [B floats], "t_next", "guidance", "nbytes"}
             payload: x float32 | states float32 | mask uint8 (2B×L)
             ("expert": the served network's slot, expert K's K or data.job_id.DISTILL_SLOT
             for the distilled student)
    reply    {"id", "ok": true, "v": [B,C,H,W], "nbytes", "forward_ms", "server_ms", "sig"}  payload: v float32
             (sig: the server's signature on the request and this velocity, see swarm.proof)
             (forward_ms: the forward passes the request's rows were in; server_ms: from the
             request's arrival to its reply, queueing included)
             {"id", "ok": false, "error": "...", "nbytes": 0[, "busy": true]}

A request is bounded by what the run can produce: at most ``max_batch`` images and at most as many
text tokens L as the served experts' text encoder makes (:func:`encoder_tokens`: 16 for MiniLM, 77
for CLIP), so :meth:`ExpectedInput.max_payload` is the largest valid frame, and a header announcing
more is refused before its payload is read. ``"busy": true`` marks a refusal for the server's load
(:class:`ServerBusy` at the client): the request was valid, another replica may take it.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from data.job_id import slot_shown
from experts.text_encoder import MINILM, TextEncoderConfig

PROTOCOL = "diffswarm-denoise-v1"
MAX_HEADER = 16 << 10
MAX_TEXT_LEN = 512  # the ceiling for a text encoder this module does not know
CLIP_TOKENS = 77  # open_clip's text context: every CLIP prompt is this many token states


class ProtocolError(ValueError):
    """A malformed frame or request; the message is sent back to the peer."""


class RequestRefused(ProtocolError):
    """A well-formed request this server cannot take (another expert, an older checkpoint, a
    batch over its limit): an honest client meets these, so they are not held against it."""


class ServerBusy(RequestRefused):
    """A reply marked busy: the server refused a valid request for its load (the sender's share of
    its queue is full); another replica may take it, and the sender is not banned for it."""


def encoder_tokens(text_encoder: str) -> int:
    """The most token states per prompt that the named text encoder (a checkpoint's
    ``meta["text_encoder"]``) produces: a longer ``states`` comes from no honest client."""
    if text_encoder == MINILM:
        return TextEncoderConfig().max_tokens  # every MiniLM run encodes with the default
    if text_encoder.startswith("clip:"):
        return CLIP_TOKENS
    return MAX_TEXT_LEN


@dataclass
class DenoiseRequest:
    id: int
    expert: int
    ckpt: str
    x: torch.Tensor  # (B, C, H, W) float32 at time t
    t: torch.Tensor  # (B,) float32 in (0, 1]
    t_next: float
    states: torch.Tensor  # (2B, L, D): B cond rows, then B uncond rows
    mask: torch.Tensor  # (2B, L) 1 = real token
    guidance: float


def _f32(t: torch.Tensor) -> bytes:
    return t.detach().to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()


def encode_request(req: DenoiseRequest) -> bytes:
    return frame(*request_parts(req))


def request_parts(req: DenoiseRequest) -> tuple[dict, bytes]:
    """The header and payload of a request frame."""
    payload = _f32(req.x) + _f32(req.states) + req.mask.to(torch.uint8).contiguous().numpy().tobytes()
    header = {
        "op": "denoise",
        "id": req.id,
        "expert": req.expert,
        "ckpt": req.ckpt,
        "x": list(req.x.shape),
        "states": list(req.states.shape),
        "t": [float(v) for v in req.t],
        "t_next": float(req.t_next),
        "guidance": float(req.guidance),
        "nbytes": len(payload),
    }
    return header, payload


def encode_reply(
    req_id: int,
    v: torch.Tensor | None = None,
    error: str | None = None,
    timing: dict[str, float] | None = None,
    busy: bool = False,
    sign: Callable[[bytes, list[int]], str] | None = None,
) -> bytes:
    """A reply: the velocity ``v``, or an ``error`` (``busy``: refused for the server's load).
    ``sign(payload, shape)`` gives the server's signature on the velocity (see swarm.proof)."""
    if v is None:
        header = {"id": req_id, "ok": False, "error": (error or "failed")[:500], "nbytes": 0}
        return frame(header | ({"busy": True} if busy else {}), b"")
    payload = _f32(v)
    times = {k: round(float(t), 3) for k, t in (timing or {}).items()}
    signed = {"sig": sign(payload, list(v.shape))} if sign is not None else {}
    return frame({"id": req_id, "ok": True, "v": list(v.shape), "nbytes": len(payload), **times, **signed}, payload)


def reply_timing(header: dict) -> dict[str, float]:
    """The server's own timings in a reply (ms); missing or malformed ones are left out."""
    return {
        k: float(header[k])
        for k in ("forward_ms", "server_ms")
        if isinstance(header.get(k), int | float) and math.isfinite(header[k]) and header[k] >= 0
    }


def frame(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(raw)) + raw + payload


async def read_frame(reader: asyncio.StreamReader, max_payload: int) -> tuple[dict, bytes]:
    """One frame; a header or payload over the limits is refused before it is read."""
    header = await read_header(reader, max_payload)
    return header, await reader.readexactly(header["nbytes"])


async def read_header(reader: asyncio.StreamReader, max_payload: int) -> dict:
    """A frame's header, its ``nbytes`` checked against ``max_payload``; the payload is left to be
    read (:func:`read_frame` reads both). A server looks at a request's size here, before it reads
    the payload."""
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    if n > MAX_HEADER:
        raise ProtocolError(f"header of {n} bytes is over the {MAX_HEADER}-byte limit")
    try:
        header = json.loads(await reader.readexactly(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError("header is not JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    nbytes = header.get("nbytes")
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ProtocolError("header lacks a valid nbytes")
    if nbytes > max_payload:
        raise ProtocolError(f"payload of {nbytes} bytes is over this server's {max_payload}-byte limit")
    return header


def request_rows(header: dict) -> int:
    """The images a request header says it carries; 0 if it says nothing valid (then
    :func:`parse_request` refuses the request)."""
    x = header.get("x")
    if isinstance(x, list) and len(x) == 4 and isinstance(x[0], int) and not isinstance(x[0], bool) and x[0] > 0:
        return x[0]
    return 0


def _shape(header: dict, key: str, ndim: int) -> tuple[int, ...]:
    s = header.get(key)
    if not (isinstance(s, list) and len(s) == ndim and all(isinstance(d, int) and 0 < d < 1 << 20 for d in s)):
        raise ProtocolError(f"{key!r} must be a list of {ndim} positive integers")
    return tuple(s)


def _number(header: dict, key: str) -> float:
    v = header.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ProtocolError(f"{key!r} must be a finite number")
    return float(v)


def parse_request(header: dict, payload: bytes, expected: ExpectedInput) -> DenoiseRequest:
    """Check every field of a request against what this server serves; raise :class:`ProtocolError`."""
    if header.get("op") != "denoise":
        raise ProtocolError(f"unknown op {header.get('op')!r}")
    req_id = header.get("id")
    if not isinstance(req_id, int):
        raise ProtocolError("'id' must be an integer")
    expert = header.get("expert")
    if not isinstance(expert, int) or isinstance(expert, bool):
        raise ProtocolError(f"'expert' must be an integer, got {expert!r}")
    if expert not in expected.experts:
        served = ", ".join(slot_shown(k) for k in sorted(expected.experts))
        raise RequestRefused(f"this server does not serve {slot_shown(expert)} (it serves {served})")
    ckpt = header.get("ckpt")
    if ckpt not in expected.experts[expert]:
        raise RequestRefused(
            f"{slot_shown(expert)} is served from checkpoint {expected.current(expert)[:12]}, not {str(ckpt)[:12]}"
        )
    b, c, h, w = _shape(header, "x", 4)
    if b > expected.max_batch:
        raise RequestRefused(f"batch of {b} images is over this server's limit of {expected.max_batch}")
    if (c, h, w) != expected.shape:
        raise ProtocolError(f"x must be (B, {', '.join(map(str, expected.shape))}), got {(b, c, h, w)}")
    b2, length, dim = _shape(header, "states", 3)
    if b2 != 2 * b or dim != expected.text_dim:
        raise ProtocolError(f"states must be (2B={2 * b}, L, {expected.text_dim}), got {(b2, length, dim)}")
    if length > expected.max_tokens:
        raise ProtocolError(f"states hold {length} tokens; its text encoder makes at most {expected.max_tokens}")
    t = header.get("t")
    if not (isinstance(t, list) and len(t) == b and all(isinstance(v, int | float) and 0 < v <= 1 for v in t)):
        raise ProtocolError(f"'t' must hold {b} times in (0, 1]")
    t_next = _number(header, "t_next")
    if not (0 <= t_next < min(t)):
        raise ProtocolError("'t_next' must be in [0, t)")
    guidance = _number(header, "guidance")
    if not 0 <= guidance <= 100:
        raise ProtocolError("'guidance' must be in [0, 100]")
    nx, ns, nm = b * c * h * w * 4, b2 * length * dim * 4, b2 * length
    if len(payload) != nx + ns + nm:
        raise ProtocolError(f"payload is {len(payload)} bytes; x, states and mask need {nx + ns + nm}")
    # Checked as numpy views of the payload (no copy, and a fraction of the per-call cost of
    # torch ops: this runs once per request on the server's critical path).
    x = np.frombuffer(payload, "<f4", b * c * h * w)
    states = np.frombuffer(payload, "<f4", b2 * length * dim, nx)
    mask = np.frombuffer(payload, np.uint8, nm, nx + ns)
    if not (np.isfinite(x).all() and np.isfinite(states).all()):
        raise ProtocolError("x and states must be finite (no NaN or inf)")
    if mask.max() > 1:
        raise ProtocolError("mask must hold 0 or 1")
    return DenoiseRequest(
        req_id,
        expert,
        ckpt,
        torch.from_numpy(x.reshape(b, c, h, w).copy()),
        torch.from_numpy(np.array(t, np.float32)),
        t_next,
        torch.from_numpy(states.reshape(b2, length, dim).copy()),
        torch.from_numpy(mask.reshape(b2, length).astype(np.float32)),
        guidance,
    )


def parse_reply(header: dict, payload: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """The velocity from a reply, checked like any peer data; a server's error becomes ProtocolError."""
    if header.get("ok") is not True:
        error = str(header.get("error", "the server refused the request"))[:500]
        raise ServerBusy(error) if header.get("busy") is True else ProtocolError(error)
    if tuple(header.get("v") or ()) != tuple(shape) or len(payload) != 4 * math.prod(shape):
        raise ProtocolError(f"reply shape {header.get('v')} does not match the request's {list(shape)}")
    v = np.frombuffer(payload, "<f4")
    if not np.isfinite(v).all():
        raise ProtocolError("the server replied with non-finite values")
    return torch.from_numpy(v.reshape(shape).copy())


@dataclass
class ExpectedInput:
    """What a server accepts: per expert the checkpoint hashes it can serve (newest first), the
    sample shape, the text states' width and most tokens (:func:`encoder_tokens`), images per request."""

    experts: dict[int, list[str]]
    shape: tuple[int, int, int]
    text_dim: int
    max_batch: int
    max_tokens: int = MAX_TEXT_LEN

    def current(self, expert: int) -> str:
        return self.experts[expert][0]

    def max_payload(self) -> int:
        """Bytes of the largest valid request: ``max_batch`` images with ``max_tokens`` tokens each."""
        c, h, w = self.shape
        b = self.max_batch
        return b * c * h * w * 4 + 2 * b * self.max_tokens * (self.text_dim * 4 + 1)
