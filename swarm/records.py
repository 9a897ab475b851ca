"""Every DHT key of the swarm, its pydantic.v1 schema, its expiry, and typed encode/decode.

Several runs can share one DHT. A run is named and owned: ``NAME@FINGERPRINT``, where the
fingerprint is a hash of the RSA key that published it (:func:`fingerprint`), and every key of the
run lives in its own namespace, ``diffswarm_<NAME>_<FINGERPRINT>_<field>``. A follower accepts
the run record only from the key the fingerprint names, so nobody else can redirect a run.
Records that a single node owns live under a subkey holding the owner's RSA public key
(``[owner:...]``), so hivemind's ``RSASignatureValidator`` lets only that node write them. A
signer's identity is its public key: a subkey must be exactly ``[owner:KEY]`` with KEY in its
canonical form (:func:`canonical_owner`), or one key could sign under any number of subkeys and
count as that many peers (refused when stored, :class:`OwnerSubkeyValidator`, and when read);
``SchemaValidator`` rejects any value that does not match its schema. Values stay small (far
below hivemind's 64 KiB limit): checkpoint bytes never go into the DHT.

    runs                owner → RunDirRecord      (global) the runs on this DHT, one per owner key
    blob_<sha256>       owner → ProviderRecord    (global) who can send a blob (manifest, shard, checkpoint)
    relays              owner → RelayRecord       (global) public peers that relay for peers behind NAT
  per run:
    run                 owner → RunRecord         the run: manifest sha256, K, targets, admission
    claim_<job>         owner → ClaimRecord       who trains a job; renewed every heartbeat
    ckpt_<job>          owner → CheckpointRecord  latest checkpoint an owner published for a job
    verdicts_<job>      owner → VerdictRecord     a verifier's recent verdicts on a job's checkpoints
    peers               owner → PeerRecord        who is up, doing what (step, loss, samples/s, bans)
    serve_<job>         owner → ServeRecord       a server of an expert: state, load, checkpoint
    proofs              owner → ProofsRecord      answers a client caught wrong, signed by their server
    ledger              owner → LedgerRecord      a verifier's ledger of accepted checkpoints (a blob's hash)
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.crypto import RSAPublicKey

from data.job_id import DISTILL_SLOT, MAX_EXPERTS, JobId, swarm_jobs
from swarm.proof import MAX_PROOFS, Proof

PREFIX = "diffswarm"
HEARTBEAT_S = 5.0  # claim renewal period
CLAIM_TTL_S = 3 * HEARTBEAT_S  # a claim not renewed for ~3 heartbeats has expired
RUN_TTL_S = 600.0  # the preparer re-publishes the run record well within this
CKPT_TTL_S = 24 * 3600.0  # checkpoint records outlive their trainer: others resume from them
PROVIDER_TTL_S = 120.0  # a provider re-announces its blobs while it is up
RELAY_TTL_S = 300.0  # a relay re-announces itself well within this while it is up
SERVE_PERIOD_S = 15.0  # a server's record lives this long, so a killed server leaves clients' view by then
SERVE_ANNOUNCE_S = SERVE_PERIOD_S / 3  # and is renewed this often: two missed renewals are tolerated
SERVE_TTL_S = SERVE_PERIOD_S
VERDICT_TTL_S = CKPT_TTL_S  # verdicts live as long as the records they judge
CLOCK_SLACK_S = 60.0  # how far a peer's clock may run ahead: a claim from the future is refused
CLAIM_GRACE_S = 1200.0  # default: a claim with no verified checkpoint for this long has expired
MAX_ALLOWED = 256  # trainer keys on an allowlist
MAX_VERDICTS = 6  # accepted and refused verdicts a verifier keeps per job

OwnerKey = BytesWithPublicKey  # a subkey that names its owner: only that key may sign it
Sha256 = pydantic.constr(regex=r"^[0-9a-f]{64}$")
PeerId = pydantic.constr(min_length=1, max_length=128)


Fingerprint = pydantic.constr(regex=r"^[0-9a-f]{32}$")
RunName = pydantic.constr(regex=r"^[A-Za-z0-9-]{1,32}$")
Reach = pydantic.constr(regex=r"^(|direct|relayed|unreachable|unknown)$")  # "": not said
RelayAddr = pydantic.constr(regex=r"^/ip4/[0-9.]{7,15}/tcp/[0-9]{1,5}/p2p/[1-9A-HJ-NP-Za-km-z]{32,60}$")


class RunDirSchema(pydantic.BaseModel):
    name: RunName
    manifest_sha256: Sha256


class RunSchema(pydantic.BaseModel):
    name: RunName
    started: pydantic.confloat(strict=True, ge=0)  # DHT time the run was first published
    admission: pydantic.constr(regex=r"^(open|allowlist)$")
    allowed: pydantic.conlist(Fingerprint, max_items=MAX_ALLOWED)  # trainer keys (allowlist)
    grace_s: pydantic.confloat(strict=True, gt=0)  # a claim with no verified progress for this long expires
    manifest_sha256: Sha256
    num_clusters: pydantic.conint(strict=True, ge=2, le=MAX_EXPERTS)
    presets: pydantic.conlist(pydantic.constr(max_length=16), min_items=2, max_items=MAX_EXPERTS)
    objectives: pydantic.conlist(pydantic.constr(regex=r"^(fm|ddpm)$"), min_items=2, max_items=MAX_EXPERTS)
    manifest_size: pydantic.conint(strict=True, ge=1)
    expert_steps: pydantic.conint(strict=True, ge=0)  # an expert job is done at this step (0: never)
    router_steps: pydantic.conint(strict=True, ge=0)
    # The distill job is done at this step (0: the run has no distill job); its student's preset
    # ("": the experts').
    distill_steps: pydantic.conint(strict=True, ge=0) = 0
    distill_preset: pydantic.constr(max_length=16) = ""


class ClaimSchema(pydantic.BaseModel):
    run: Sha256
    peer: PeerId
    t0: pydantic.confloat(strict=True, ge=0)  # when this owner first claimed the job
    active: pydantic.StrictBool  # False: withdrawn (the DHT keeps the later expiry, so no delete)


class CheckpointSchema(pydantic.BaseModel):
    run: Sha256
    step: pydantic.conint(strict=True, ge=0)
    sha256: Sha256
    size: pydantic.conint(strict=True, ge=0)
    objective: pydantic.constr(max_length=8)
    preset: pydantic.constr(max_length=16)
    loss: pydantic.confloat(strict=True)
    providers: pydantic.conlist(PeerId, max_items=16)


class PeerSchema(pydantic.BaseModel):
    peer: PeerId
    role: pydantic.constr(max_length=16)
    state: pydantic.constr(max_length=16)  # "idle", "training", "serving", ...
    job: pydantic.constr(max_length=16)  # "" when idle
    step: pydantic.conint(strict=True, ge=0)
    loss: pydantic.confloat(strict=True)
    samples_per_s: pydantic.confloat(strict=True, ge=0)
    bans: pydantic.conlist(pydantic.constr(max_length=160), max_items=16)  # this node's local bans
    reach: Reach = ""  # how others reach it: direct, relayed (through a relay) or unreachable


class RelaySchema(pydantic.BaseModel):
    addrs: pydantic.conlist(RelayAddr, min_items=1, max_items=4)


class VerdictSchema(pydantic.BaseModel):
    sha256: Sha256
    step: pydantic.conint(strict=True, ge=0)
    owner: Fingerprint  # who signed the record that was judged
    ok: pydantic.StrictBool
    t: pydantic.confloat(strict=True, ge=0)  # DHT time of the verdict
    loss: pydantic.confloat(strict=True)  # held-out loss the verifier measured (0 when not measured)
    reason: pydantic.constr(max_length=160)
    # "bytes": the checkpoint itself was judged (every record of this hash and step shares it);
    # "record": only the signer's record was (its step, its claim), so a stranger republishing an
    # honest hash under a bogus step harms nobody but itself.
    about: pydantic.constr(regex=r"^(bytes|record)$") = "bytes"
    # Samples the accepted checkpoint says its training has seen in all (its meta's samples_seen;
    # 0: not said): what the contribution ledger counts samples and FLOPs from.
    samples: pydantic.conint(strict=True, ge=0) = 0


class VerdictsSchema(pydantic.BaseModel):
    run: Sha256
    entries: pydantic.conlist(VerdictSchema, max_items=2 * MAX_VERDICTS)


class LedgerSchema(pydantic.BaseModel):
    run: Sha256
    sha256: Sha256  # the ledger file's bytes, served like any blob
    size: pydantic.conint(strict=True, ge=0)
    entries: pydantic.conint(strict=True, ge=0)
    t: pydantic.confloat(strict=True, ge=0)  # DHT time of the newest acceptance it holds


class ProofSchema(pydantic.BaseModel):
    server: Fingerprint  # the key that signs the server's serve records (and signed the answer)
    peer: PeerId
    expert: pydantic.conint(strict=True, ge=0, le=DISTILL_SLOT)  # the served slot (data.job_id)
    ckpt: Sha256
    request: Sha256  # blob: the request (canonical header JSON + payload)
    reply: Sha256  # blob: the velocity's bytes
    shape: pydantic.conlist(pydantic.conint(strict=True, ge=1, le=4096), min_items=4, max_items=4)
    sig: pydantic.constr(max_length=2048)


class ProofsSchema(pydantic.BaseModel):
    run: Sha256
    proofs: pydantic.conlist(ProofSchema, max_items=MAX_PROOFS)


class ServeSchema(pydantic.BaseModel):
    run: Sha256
    peer: PeerId
    state: pydantic.constr(regex=r"^(online|offline)$")
    rps: pydantic.confloat(strict=True, ge=0)  # requests answered per second lately
    queue: pydantic.conint(strict=True, ge=0)  # requests waiting now
    ckpt: Sha256  # the checkpoint it serves: requests must name it
    step: pydantic.conint(strict=True, ge=0)
    objective: pydantic.constr(regex=r"^(fm|ddpm)$")
    text_encoder: pydantic.constr(max_length=200)
    text_dim: pydantic.conint(strict=True, ge=1, le=1 << 16)
    shape: pydantic.conlist(pydantic.conint(strict=True, ge=1, le=4096), min_items=3, max_items=3)
    max_batch: pydantic.conint(strict=True, ge=1, le=4096)
    reach: Reach = ""  # direct or relayed: a client prefers a direct server


class ProviderSchema(pydantic.BaseModel):
    peer: PeerId
    size: pydantic.conint(strict=True, ge=0)


def _run_schema() -> type[pydantic.BaseModel]:
    fields: dict[str, Any] = {
        "run": (dict[OwnerKey, RunSchema] | None, None),
        "peers": (dict[OwnerKey, PeerSchema] | None, None),
        "proofs": (dict[OwnerKey, ProofsSchema] | None, None),
        "ledger": (dict[OwnerKey, LedgerSchema] | None, None),
    }
    for job in swarm_jobs(MAX_EXPERTS, distill=True):
        fields[f"claim_{job}"] = (dict[OwnerKey, ClaimSchema] | None, None)
        fields[f"ckpt_{job}"] = (dict[OwnerKey, CheckpointSchema] | None, None)
        fields[f"verdicts_{job}"] = (dict[OwnerKey, VerdictsSchema] | None, None)
        if job.is_expert or job.is_distill:
            fields[f"serve_{job}"] = (dict[OwnerKey, ServeSchema] | None, None)
    return pydantic.create_model("DiffswarmRunSchema", **fields)


def _global_schema() -> type[pydantic.BaseModel]:
    return pydantic.create_model(
        "DiffswarmSchema",
        runs=(dict[OwnerKey, RunDirSchema] | None, None),
        relays=(dict[OwnerKey, RelaySchema] | None, None),
    )


@functools.lru_cache(maxsize=4096)
def canonical_owner(subkey: bytes) -> bytes | None:
    """``subkey`` if it is exactly ``[owner:KEY]`` with KEY an RSA public key in the form hivemind
    writes it, else ``None``. hivemind's signature check accepts any subkey that *contains* the
    marker, so ``[owner:KEY]x``, ``[owner:KEY]y``, ... would all be one key's and look like many."""
    m = re.fullmatch(rb"\[owner:(.+?)\]", subkey, re.DOTALL)
    if m is None:
        return None
    try:
        key = RSAPublicKey.from_bytes(m.group(1))
    except Exception:  # not a key at all: the signature check refuses it anyway
        return None
    return subkey if key.to_bytes() == m.group(1) else None


def claimed_owner(subkey: bytes) -> bytes | None:
    """The canonical ``[owner:KEY]`` of the key a non-canonical subkey names (its signer), if any."""
    m = re.search(rb"\[owner:(.+?)\]", subkey, re.DOTALL)
    if m is None:
        return None
    try:
        return b"[owner:" + RSAPublicKey.from_bytes(m.group(1)).to_bytes() + b"]"
    except Exception:
        return None


class OwnerSubkeyValidator(RecordValidatorBase):
    """Refuses to store (or accept from a peer) a record of this swarm whose subkey names an owner
    in any form but exactly ``[owner:KEY]``: one key, one identity."""

    def validate(self, record: DHTRecord) -> bool:
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS or b"[owner:" not in record.subkey:
            return True
        try:
            subkey = DHTProtocol.serializer.loads(record.subkey)
        except Exception:
            return False
        return isinstance(subkey, bytes) and canonical_owner(subkey) is not None

    @property
    def priority(self) -> int:
        return 11  # checked before the signature (10): a refused subkey costs no RSA verification


def validators(rsa: RSASignatureValidator, ref: RunRef | None = None) -> list:
    """The validators every node runs: the global keys' schema, the schema of the run this node
    follows when it knows it at start (records of other runs are parsed when read), one key one
    identity, and the signatures. Blob-provider keys are per hash, so not in a schema: they are
    still owner-signed, and their values are parsed with :class:`ProviderSchema` on read."""
    out = [SchemaValidator(_global_schema(), allow_extra_keys=True, prefix=PREFIX)]
    if ref is not None:
        out.append(SchemaValidator(_run_schema(), allow_extra_keys=True, prefix=ref.namespace))
    return [*out, OwnerSubkeyValidator(), rsa]


# ---------------------------------------------------------------- runs
def fingerprint(owner: bytes) -> str:
    """A short, collision-safe name for an owner key (128 bits of its sha256)."""
    return hashlib.sha256(owner).hexdigest()[:32]


@dataclass(frozen=True)
class RunRef:
    """Which run a node follows: its name and its owner's fingerprint (``NAME@FINGERPRINT``)."""

    name: str
    owner: str  # fingerprint of the key that publishes the run record

    @classmethod
    def parse(cls, text: str) -> RunRef:
        m = re.fullmatch(r"([A-Za-z0-9-]{1,32})@([0-9a-f]{32})", text.strip())
        if m is None:
            raise ValueError(f"--run takes NAME@FINGERPRINT as the preparer prints it; got {text!r}")
        return cls(m.group(1), m.group(2))

    @property
    def namespace(self) -> str:
        return f"{PREFIX}_{self.name}_{self.owner}"

    def __str__(self) -> str:
        return f"{self.name}@{self.owner}"


def check_run_name(name: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9-]{1,32}", name) is None:
        raise ValueError(f"a run name has 1-32 letters, digits or '-'; got {name!r}")
    return name


def in_run(key: str, ref: RunRef) -> str:
    """The DHT key of ``key`` inside run ``ref``'s namespace (global keys stay as they are)."""
    if is_global(key):
        return key
    return f"{ref.namespace}_{key[len(PREFIX) + 1 :]}"


# ---------------------------------------------------------------- keys
def runs_key() -> str:
    return f"{PREFIX}_runs"


def relays_key() -> str:
    return f"{PREFIX}_relays"


def is_global(key: str) -> bool:
    """Whether ``key`` is shared by every run of the DHT rather than inside one run's namespace."""
    return key in (runs_key(), relays_key()) or key.startswith(f"{PREFIX}_blob_")


def run_key() -> str:
    return f"{PREFIX}_run"


def peers_key() -> str:
    return f"{PREFIX}_peers"


def ledger_key() -> str:
    return f"{PREFIX}_ledger"


def proofs_key() -> str:
    return f"{PREFIX}_proofs"


def claim_key(job: str) -> str:
    return f"{PREFIX}_claim_{_check_job(job)}"


def ckpt_key(job: str) -> str:
    return f"{PREFIX}_ckpt_{_check_job(job)}"


def verdicts_key(job: str) -> str:
    return f"{PREFIX}_verdicts_{_check_job(job)}"


def serve_key(slot: int) -> str:
    """The key a server of ``slot`` (expert K, or ``DISTILL_SLOT``: the distilled student) announces under."""
    return f"{PREFIX}_serve_{JobId.from_slot(slot)}"


def blob_key(sha256: str) -> str:
    if len(sha256) != 64:
        raise ValueError(f"not a sha256: {sha256!r}")
    return f"{PREFIX}_blob_{sha256}"


def _check_job(job: str) -> str:
    """``job`` if it names a swarm job (an expert or the router), else ``ValueError``."""
    if not JobId.parse(job).is_swarm:
        raise ValueError(f"{job} is trained on one machine, never a swarm job: it has no DHT keys")
    return job


# ---------------------------------------------------------------- typed records
@dataclass(frozen=True)
class RunDirRecord:
    name: str
    manifest_sha256: str


@dataclass(frozen=True)
class RunRecord:
    manifest_sha256: str
    num_clusters: int
    presets: list[str]
    objectives: list[str]
    manifest_size: int
    expert_steps: int = 0  # the run's training target per expert (0: train as long as peers do)
    router_steps: int = 0
    name: str = "default"
    started: float = 0.0
    admission: str = "open"  # "open": anyone may train; "allowlist": only the keys in ``allowed``
    allowed: list[str] = field(default_factory=list)
    grace_s: float = CLAIM_GRACE_S
    distill_steps: int = 0  # the distill job is done at this step (0: the run has none)
    distill_preset: str = ""  # the student's preset ("": the experts')

    def jobs(self) -> list[str]:
        """The run's job names: ``expert_0`` .. ``expert_{K-1}``, ``router``, then ``distill`` when
        the run has a distill target."""
        return [str(job) for job in swarm_jobs(self.num_clusters, distill=self.distill_steps > 0)]

    def target(self, job: str) -> int:
        """The step at which ``job`` is done (0: never)."""
        jid = JobId.parse(job)
        return self.router_steps if jid.is_router else self.distill_steps if jid.is_distill else self.expert_steps

    def served_slots(self) -> list[int]:
        """The slots a server of this run may serve: its experts, then its distilled student's."""
        return [*range(self.num_clusters), *([DISTILL_SLOT] if self.distill_steps > 0 else [])]

    def student_preset(self) -> str:
        """The distilled student's preset."""
        return self.distill_preset or self.presets[0]


@dataclass(frozen=True)
class ClaimRecord:
    run: str
    peer: str
    t0: float
    active: bool = True


@dataclass(frozen=True)
class CheckpointRecord:
    run: str
    step: int
    sha256: str
    size: int
    objective: str
    preset: str
    loss: float
    providers: list[str]


@dataclass(frozen=True)
class PeerRecord:
    peer: str
    role: str
    state: str
    job: str = ""
    step: int = 0
    loss: float = 0.0
    samples_per_s: float = 0.0
    bans: list[str] = field(default_factory=list)
    reach: str = ""


@dataclass(frozen=True)
class Verdict:
    sha256: str
    step: int
    owner: str
    ok: bool
    t: float
    loss: float = 0.0
    reason: str = ""
    about: str = "bytes"  # "bytes": the checkpoint was judged; "record": only its signer's record
    samples: int = 0  # samples_seen of an accepted checkpoint (0: not said)


@dataclass(frozen=True)
class VerdictsRecord:
    run: str
    entries: list[Verdict]


@dataclass(frozen=True)
class LedgerRecord:
    run: str
    sha256: str
    size: int
    entries: int
    t: float


@dataclass(frozen=True)
class ProofsRecord:
    run: str
    proofs: list[Proof]


@dataclass(frozen=True)
class ServeRecord:
    run: str
    peer: str
    state: str
    rps: float
    queue: int
    ckpt: str
    step: int
    objective: str
    text_encoder: str
    text_dim: int
    shape: list[int]
    max_batch: int
    reach: str = ""
    # The key that signs it (its [owner:KEY] subkey), set when read; not part of the record itself:
    # a client checks the server's signed answers with it.
    owner: bytes = field(default=b"", compare=False)


@dataclass(frozen=True)
class RelayRecord:
    addrs: list[str]  # where a relayed node dials this relay: /ip4/X/tcp/P/p2p/ID


@dataclass(frozen=True)
class ProviderRecord:
    peer: str
    size: int


_SCHEMAS = {
    RunDirRecord: RunDirSchema,
    RunRecord: RunSchema,
    VerdictsRecord: VerdictsSchema,
    ClaimRecord: ClaimSchema,
    CheckpointRecord: CheckpointSchema,
    ProviderRecord: ProviderSchema,
    PeerRecord: PeerSchema,
    ServeRecord: ServeSchema,
    ProofsRecord: ProofsSchema,
    LedgerRecord: LedgerSchema,
    RelayRecord: RelaySchema,
}


def encode(record) -> dict:
    """A record as the plain dict stored in the DHT (validated before it is written)."""
    d = asdict(record)
    d.pop("owner", None)  # who signs a record is its subkey, not a field of it
    _SCHEMAS[type(record)].parse_obj(d)
    return d


def decode(cls, value: Any):
    """Parse a value read from the DHT; ``None`` if it does not match (peers are untrusted)."""
    if not isinstance(value, dict):
        return None
    try:
        parsed = _SCHEMAS[cls].parse_obj(value)
    except pydantic.ValidationError:
        return None
    if cls is VerdictsRecord:
        return VerdictsRecord(parsed.run, [Verdict(**e.dict()) for e in parsed.entries])
    if cls is ProofsRecord:
        return ProofsRecord(parsed.run, [Proof(**e.dict()) for e in parsed.proofs])
    return cls(**parsed.dict())
