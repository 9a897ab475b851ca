"""Signed answers, and proofs that a server answered wrong.

An expert server signs every velocity it sends with the RSA key that signs its serve record: the
signature covers the request it answered (its header in canonical JSON and its payload) and the
reply's bytes. A client checks the signature of every answer it uses, so an answer is always one
the server stands behind. When a client's audit catches a server (``router.audit``), it publishes
a **proof**: the request and the reply as two blobs (content-addressed) and the server's
signature, in the run's ``proofs`` key. Any node that holds the expert's checkpoint can check a
proof on its own: the blobs match their hashes, the signature is the server's, and recomputing
the request with the checkpoint gives another answer. A client checks the proofs naming a server
it would use before its first step, and avoids a server that a valid proof convicts.

What a proof cannot be made to do: convict an honest server (its signature covers only what it
answered, and recomputing that gives its answer back; a proof that does not check out is held
against its publisher); cost much (a client checks at most :data:`PER_SERVER` proofs of a server
and :data:`CHECKED` in all, each one expert forward, and fetches no blob larger than a request
of the run can be).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from data.job_id import slot_shown

VERSION = b"diffswarm-denoise-proof-v1"
MAX_PROOFS = 4  # proofs one publisher keeps in its record
PER_SERVER = 2  # proofs a client checks per server it would use
CHECKED = 8  # proofs a client checks in all before its first step


def request_digest(header: dict, payload: bytes) -> bytes:
    """sha256 of a request as both ends see it: its header in canonical JSON (the server reads
    the client's JSON back, and floats survive that exactly), then its payload."""
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical + b"\n" + payload).digest()


def statement(req_digest: bytes, reply_payload: bytes, shape: list[int]) -> bytes:
    """What a server signs: this protocol version, the request's digest, the reply's velocity
    (its bytes and shape)."""
    return VERSION + req_digest + hashlib.sha256(reply_payload).digest() + json.dumps(list(shape)).encode()


def sign(key: RSAPrivateKey, req_digest: bytes, reply_payload: bytes, shape: list[int]) -> str:
    return base64.b64encode(key.sign(statement(req_digest, reply_payload, shape))).decode()


def owner_key(owner: bytes) -> RSAPublicKey | None:
    """The public key named by an ``[owner:KEY]`` subkey (a serve record's signer)."""
    if not (owner.startswith(b"[owner:") and owner.endswith(b"]")):
        return None
    try:
        return RSAPublicKey.from_bytes(owner[len(b"[owner:") : -1])
    except Exception:  # not a key: nothing it could have signed
        return None


def signed_by(owner: bytes, req_digest: bytes, reply_payload: bytes, shape: list[int], sig: object) -> bool:
    """Whether ``sig`` is the signature of the key in ``owner`` on this answer."""
    key = owner_key(owner)
    if key is None or not isinstance(sig, str) or len(sig) > 2048:
        return False
    try:
        raw = base64.b64decode(sig, validate=True)
        return bool(key.verify(statement(req_digest, reply_payload, shape), raw))
    except Exception:  # malformed base64 or signature: not signed by it
        return False


@dataclass(frozen=True)
class Proof:
    """One answer a client caught wrong: who signed it, for which expert and checkpoint, the two
    blobs (the request frame's header JSON + payload, and the reply's velocity bytes) and the
    signature."""

    server: str  # the fingerprint of the key that signs the server's serve records
    peer: str  # its peer id when caught
    expert: int
    ckpt: str
    request: str  # sha256 of the request blob
    reply: str  # sha256 of the reply blob
    shape: list[int]  # the velocity's shape
    sig: str


def request_blob(header: dict, payload: bytes) -> bytes:
    """A request as a blob: ``>I`` header length, the canonical header JSON, the payload."""
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return len(canonical).to_bytes(4, "big") + canonical + payload


def parse_request_blob(blob: bytes) -> tuple[dict, bytes]:
    """(header, payload) of a request blob; ValueError when it is not one."""
    if len(blob) < 4:
        raise ValueError("a request blob shorter than its length prefix")
    n = int.from_bytes(blob[:4], "big")
    if n > 1 << 16 or 4 + n > len(blob):
        raise ValueError("a request blob whose header does not fit")
    header = json.loads(blob[4 : 4 + n].decode())
    if not isinstance(header, dict):
        raise ValueError("a request blob whose header is not an object")
    return header, blob[4 + n :]


# ---------------------------------------------------------------- publishing and checking, over the swarm
def _expected(p: Proof, rec):
    """What the server ``rec`` would accept for the proof's expert and checkpoint: a proof's request
    is checked (and its blobs bounded) as that server checks a request."""
    from swarm.protocol import ExpectedInput, encoder_tokens

    return ExpectedInput(
        {p.expert: [p.ckpt]}, tuple(rec.shape), rec.text_dim, rec.max_batch, encoder_tokens(rec.text_encoder)
    )


PROOF_TTL_S = 24 * 3600.0  # a proof outlives the generation that caught the lie


def publish(node, blobs, run, folder: Path, expert: int, rec, header: dict, payload: bytes, reply: bytes, sig: str):
    """Publish a proof that server ``rec`` answered ``header``/``payload`` of ``expert`` with
    ``reply`` (signed ``sig``): the two blobs, provided by this node, and this node's proofs record
    (its newest :data:`MAX_PROOFS`). Returns the proof."""
    from swarm.blobs import announce
    from swarm.records import ProofsRecord, fingerprint, proofs_key

    folder.mkdir(parents=True, exist_ok=True)
    digests = []
    for data in (request_blob(header, payload), reply):
        digest = hashlib.sha256(data).hexdigest()
        (folder / digest).write_bytes(data)
        blobs.store.add_file(folder / digest, digest)
        digests.append(digest)
    announce(node, blobs.store, ttl=PROOF_TTL_S, only=set(digests))
    shape = list(header["x"])
    new = Proof(fingerprint(rec.owner), rec.peer, expert, rec.ckpt, digests[0], digests[1], shape, sig)
    mine = node.read(proofs_key(), ProofsRecord).get(node.owner)
    kept = [p for p in (mine.proofs if mine is not None and mine.run == run.manifest_sha256 else []) if p != new]
    node.store(proofs_key(), ProofsRecord(run.manifest_sha256, [*kept, new][-MAX_PROOFS:]), PROOF_TTL_S)
    return new


def convicted(
    node, blobs, run, folder: Path, servers: dict, held: set, recompute, disagree, tolerance: float
) -> dict[str, str]:
    """Check the published proofs against the servers in ``servers`` (expert → serve records, each
    with its ``owner``): at most :data:`PER_SERVER` per server and :data:`CHECKED` in all, each
    only where this node holds the (expert, checkpoint) it names (``held``) and
    ``recompute(expert, ckpt, request)`` redoes it.
    Returns peer id → why, for every server a proof convicts; a proof that does not check out
    (blobs missing or altered, not the server's signature, an answer that was right) bans its
    publisher's key here instead."""
    from swarm.blobs import BlobError, providers
    from swarm.protocol import ProtocolError, parse_reply, parse_request
    from swarm.records import ProofsRecord, fingerprint, proofs_key

    by_key = {}
    for recs in servers.values():
        for r in recs:
            if r.owner:
                by_key.setdefault((fingerprint(r.owner), r.ckpt), r)
    found = [
        (publisher, p)
        for publisher, pr in node.read(proofs_key(), ProofsRecord).items()
        if pr.run == run.manifest_sha256 and publisher != node.owner
        for p in pr.proofs
        if (p.server, p.ckpt) in by_key and (p.expert, p.ckpt) in held
    ]
    out: dict[str, str] = {}
    per: dict[str, int] = {}
    checked = 0
    for publisher, p in found:
        rec = by_key[(p.server, p.ckpt)]
        if checked >= CHECKED or per.get(p.server, 0) >= PER_SERVER or rec.peer in out:
            continue
        expected = _expected(p, rec)
        try:
            paths = [
                blobs.fetch(d, providers(node, d), folder / d, max_bytes=expected.max_payload() + (1 << 16))
                for d in (p.request, p.reply)
            ]
            header, payload = parse_request_blob(paths[0].read_bytes())
            req = parse_request(header, payload, expected)
        except (BlobError, OSError, ValueError):  # not to be had now, or not a request of this run
            continue
        want = recompute(p.expert, p.ckpt, req)
        checked += 1
        per[p.server] = per.get(p.server, 0) + 1
        reply = paths[1].read_bytes()
        try:
            got = parse_reply({"ok": True, "v": p.shape}, reply, tuple(req.x.shape))
        except ProtocolError:
            got = None
        signed = signed_by(rec.owner, request_digest(header, payload), reply, p.shape, p.sig)
        if got is not None and signed and (error := disagree(got, want)) > tolerance:
            out[rec.peer] = (
                f"a published proof convicts it (signed answer to {slot_shown(p.expert)}, relative error {error:.2g})"
            )
        else:
            node.bans.ban(fingerprint(publisher), "published a proof that does not check out")
    return out


MIRRORED = 16  # proofs a run's preparer keeps available, two per server at most


def mirror(node, blobs, run, folder: Path, held: set[str], failed: dict[str, str] | None = None) -> list[Proof]:
    """The run's preparer keeps the blobs of published proofs available after their publisher (a
    client, often short-lived) has gone: at most :data:`MIRRORED` proofs, two per server, only
    proofs naming a server of the run that is online now, each blob no larger than a request to
    that server can be. ``held``: request-blob hashes already mirrored (updated); ``failed``:
    request-blob hash → why its blobs could not be had (updated). Returns the proofs mirrored by
    this call."""
    from swarm.blobs import BlobError, providers
    from swarm.records import ProofsRecord, fingerprint, proofs_key

    online = {
        (fingerprint(r.owner), r.ckpt): r
        for recs in node.servers(run, run.served_slots()).values()
        for r in recs
        if r.owner
    }
    new, per = [], {}
    for pr in node.read(proofs_key(), ProofsRecord).values():
        if pr.run != run.manifest_sha256:
            continue
        for p in pr.proofs:
            rec = online.get((p.server, p.ckpt))
            per[p.server] = per.get(p.server, 0) + (p.request in held)
            if rec is None or p.request in held or len(held) >= MIRRORED or per[p.server] >= 2:
                continue
            limit = _expected(p, rec).max_payload() + (1 << 16)
            try:
                for d in (p.request, p.reply):
                    blobs.fetch(d, providers(node, d), folder / d, max_bytes=limit)
            except (BlobError, OSError) as e:  # its publisher is gone already, or never had them
                if failed is not None:
                    failed[p.request] = str(e)
                continue
            held.add(p.request)
            per[p.server] += 1
            new.append(p)
    return new
