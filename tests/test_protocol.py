"""The denoising wire format on its own: what a client encodes, a server parses bit for bit, and
anything a peer could send wrongly is refused with a ProtocolError."""

import json
import struct

import pytest
import torch

from data.job_id import DISTILL_SLOT
from swarm.protocol import (
    DenoiseRequest,
    ExpectedInput,
    ProtocolError,
    encode_reply,
    encode_request,
    parse_reply,
    parse_request,
)

CKPT = "ab" * 32
EXPECTED = ExpectedInput({0: [CKPT]}, (3, 8, 8), 16, 4)


def _split(frame: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack(">I", frame[:4])
    return json.loads(frame[4 : 4 + n]), frame[4 + n :]


def _request(b: int = 2, length: int = 5) -> DenoiseRequest:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2 * b, length)
    mask[:, -2:] = 0
    return DenoiseRequest(
        7, 0, CKPT, torch.randn(b, 3, 8, 8, generator=g), torch.full((b,), 0.6), 0.5,
        torch.randn(2 * b, length, 16, generator=g), mask, 3.0,
    )  # fmt: skip


def test_request_round_trip_is_exact():
    req = _request()
    got = parse_request(*_split(encode_request(req)), EXPECTED)
    assert (got.id, got.expert, got.ckpt, got.t_next, got.guidance) == (7, 0, CKPT, 0.5, 3.0)
    for name in ("x", "t", "states", "mask"):
        assert torch.equal(getattr(got, name), getattr(req, name)), name
        assert getattr(got, name).dtype == torch.float32
    got.x += 1  # the parsed tensors own their memory (the payload bytes are immutable)


def _tampered(edit) -> tuple[dict, bytes]:
    header, payload = _split(encode_request(_request()))
    return edit(header, bytearray(payload))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h, p: (h, bytes(p[:4]) + struct.pack("<f", float("nan")) + bytes(p[8:])), "finite"),
        (lambda h, p: (h, bytes(p[:-1]) + b"\x02"), "mask must hold 0 or 1"),
        (lambda h, p: (h, bytes(p[:-1])), "payload is"),
        (lambda h, p: ({**h, "ckpt": "cd" * 32}, bytes(p)), "served from checkpoint"),
        (lambda h, p: ({**h, "x": [5, 3, 8, 8], "states": [10, 5, 16]}, bytes(p)), "over this server's limit"),
        (lambda h, p: ({**h, "t": [0.6, 1.5]}, bytes(p)), "'t' must hold"),
        (lambda h, p: ({**h, "guidance": float("inf")}, bytes(p)), "finite number"),
        (lambda h, p: ({**h, "expert": 3}, bytes(p)), r"does not serve expert 3 \(it serves expert 0\)"),
        (lambda h, p: ({**h, "expert": DISTILL_SLOT}, bytes(p)), "does not serve the distilled student"),
    ],
)
def test_bad_requests_are_refused(edit, message):
    with pytest.raises(ProtocolError, match=message):
        parse_request(*_tampered(edit), EXPECTED)


def test_reply_round_trip_and_bad_replies():
    v = torch.randn(2, 3, 8, 8)
    header, payload = _split(encode_reply(3, v, timing={"forward_ms": 1.5}))
    assert torch.equal(parse_reply(header, payload, (2, 3, 8, 8)), v)
    with pytest.raises(ProtocolError, match="does not match"):
        parse_reply(header, payload, (1, 3, 8, 8))
    bad = bytearray(payload)
    bad[:4] = struct.pack("<f", float("inf"))
    with pytest.raises(ProtocolError, match="non-finite"):
        parse_reply(header, bytes(bad), (2, 3, 8, 8))
    with pytest.raises(ProtocolError, match="out of memory"):
        parse_reply(*_split(encode_reply(3, error="out of memory")), (2, 3, 8, 8))


def test_a_server_of_the_student_names_it_in_its_refusals():
    served = ExpectedInput({DISTILL_SLOT: [CKPT]}, (3, 8, 8), 16, 4)
    header, payload = _split(encode_request(_request()))
    with pytest.raises(ProtocolError, match=r"does not serve expert 0 \(it serves the distilled student\)"):
        parse_request(header, payload, served)
    with pytest.raises(ProtocolError, match="the distilled student is served from checkpoint abababababab"):
        parse_request({**header, "expert": DISTILL_SLOT, "ckpt": "cd" * 32}, payload, served)
