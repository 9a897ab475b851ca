"""Every DHT key of the swarm, its pydantic.v1 schema, its expiry, and typed encode/decode.

Keys are ``diffswarm_<field>``. Records that a single node owns live under a subkey holding the
owner's RSA public key (``[owner:...]``), so hivemind's ``RSASignatureValidator`` lets only that
node write them; ``SchemaValidator`` rejects any value that does not match its schema. Values
stay small (far below hivemind's 64 KiB limit): checkpoint bytes never go into the DHT.

    run              owner → RunRecord          which run this swarm trains (manifest sha256, K, ...)
    claim_<job>      owner → ClaimRecord        who trains a job; renewed every heartbeat
    ckpt_<job>       owner → CheckpointRecord   latest checkpoint an owner published for a job
    peers            owner → PeerRecord         who is up, doing what (step, loss, samples/s)
    blob_<sha256>    owner → ProviderRecord     who can send a blob (manifest, shard, checkpoint)
    serve_<job>      owner → ServeRecord        a server of an expert: state, load, checkpoint
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator

PREFIX = "diffswarm"
MAX_EXPERTS = 64  # jobs expert_0..expert_63 and router have schema fields
HEARTBEAT_S = 5.0  # claim renewal period
CLAIM_TTL_S = 3 * HEARTBEAT_S  # a claim not renewed for ~3 heartbeats has expired
RUN_TTL_S = 600.0  # the preparer re-publishes the run record well within this
CKPT_TTL_S = 24 * 3600.0  # checkpoint records outlive their trainer: others resume from them
PROVIDER_TTL_S = 120.0  # a provider re-announces its blobs while it is up
SERVE_PERIOD_S = 15.0  # a server's record lives this long, so a killed server leaves clients' view by then
SERVE_ANNOUNCE_S = SERVE_PERIOD_S / 3  # and is renewed this often: two missed renewals are tolerated
SERVE_TTL_S = SERVE_PERIOD_S

OwnerKey = BytesWithPublicKey  # a subkey that names its owner: only that key may sign it
Sha256 = pydantic.constr(regex=r"^[0-9a-f]{64}$")
PeerId = pydantic.constr(min_length=1, max_length=128)


class RunSchema(pydantic.BaseModel):
    manifest_sha256: Sha256
    num_clusters: pydantic.conint(strict=True, ge=2, le=MAX_EXPERTS)
    presets: pydantic.conlist(pydantic.constr(max_length=16), min_items=2, max_items=MAX_EXPERTS)
    objectives: pydantic.conlist(pydantic.constr(regex=r"^(fm|ddpm)$"), min_items=2, max_items=MAX_EXPERTS)
    manifest_size: pydantic.conint(strict=True, ge=1)
    expert_steps: pydantic.conint(strict=True, ge=0)  # an expert job is done at this step (0: never)
    router_steps: pydantic.conint(strict=True, ge=0)


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


class ProviderSchema(pydantic.BaseModel):
    peer: PeerId
    size: pydantic.conint(strict=True, ge=0)


def job_names() -> list[str]:
    return [f"expert_{k}" for k in range(MAX_EXPERTS)] + ["router"]


def _schema() -> type[pydantic.BaseModel]:
    fields: dict[str, Any] = {
        "run": (dict[OwnerKey, RunSchema] | None, None),
        "peers": (dict[OwnerKey, PeerSchema] | None, None),
    }
    for job in job_names():
        fields[f"claim_{job}"] = (dict[OwnerKey, ClaimSchema] | None, None)
        fields[f"ckpt_{job}"] = (dict[OwnerKey, CheckpointSchema] | None, None)
        if job != "router":
            fields[f"serve_{job}"] = (dict[OwnerKey, ServeSchema] | None, None)
    return pydantic.create_model("DiffswarmSchema", **fields)


def validators(rsa: RSASignatureValidator) -> list:
    """The validators every node runs. Blob-provider keys are per hash, so not in the schema:
    they are still owner-signed, and their values are parsed with :class:`ProviderSchema` on read."""
    return [SchemaValidator(_schema(), allow_extra_keys=True, prefix=PREFIX), rsa]


# ---------------------------------------------------------------- keys
def run_key() -> str:
    return f"{PREFIX}_run"


def peers_key() -> str:
    return f"{PREFIX}_peers"


def claim_key(job: str) -> str:
    return f"{PREFIX}_claim_{_check_job(job)}"


def ckpt_key(job: str) -> str:
    return f"{PREFIX}_ckpt_{_check_job(job)}"


def serve_key(expert: int) -> str:
    return f"{PREFIX}_serve_{_check_job(expert_job(expert))}"


def blob_key(sha256: str) -> str:
    if len(sha256) != 64:
        raise ValueError(f"not a sha256: {sha256!r}")
    return f"{PREFIX}_blob_{sha256}"


def _check_job(job: str) -> str:
    if job not in job_names():
        raise ValueError(f"unknown job {job!r}")
    return job


def expert_job(k: int) -> str:
    return f"expert_{k}"


# ---------------------------------------------------------------- typed records
@dataclass(frozen=True)
class RunRecord:
    manifest_sha256: str
    num_clusters: int
    presets: list[str]
    objectives: list[str]
    manifest_size: int
    expert_steps: int = 0  # the run's training target per expert (0: train as long as peers do)
    router_steps: int = 0

    def jobs(self) -> list[str]:
        return [expert_job(k) for k in range(self.num_clusters)] + ["router"]

    def target(self, job: str) -> int:
        """The step at which ``job`` is done (0: never)."""
        return self.router_steps if job == "router" else self.expert_steps


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


@dataclass(frozen=True)
class ProviderRecord:
    peer: str
    size: int


_SCHEMAS = {
    RunRecord: RunSchema,
    ClaimRecord: ClaimSchema,
    CheckpointRecord: CheckpointSchema,
    ProviderRecord: ProviderSchema,
    PeerRecord: PeerSchema,
    ServeRecord: ServeSchema,
}


def encode(record) -> dict:
    """A record as the plain dict stored in the DHT (validated before it is written)."""
    d = asdict(record)
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
    return cls(**parsed.dict())
