"""The contribution ledger: who trained which verified steps and samples of which job.

Every accepted checkpoint was signed by the key that held the job's claim while training it (the
verifier refuses a record whose signer held none) and accepted by a verifier the run trusts, and
its verdict says so: hash, step, signer, samples seen. From those the credit follows as pure
functions: a job's accepted checkpoints in step order form its chain of verified progress, and each
one earns its signer the steps it added to the one before (:func:`credit`). A checkpoint that a
takeover later built on still counts for the steps it added; a refused one, or a record judged
for its signer alone, earns nothing.

Verdict records expire and each verifier keeps only its latest few per job, so the ledger must
outlive them: a verifier (the preparer) appends every acceptance it sees to a file of JSON lines
that only grows (:class:`LedgerFile`), serves that file by its sha256 like any blob, and publishes
the digest in a signed record. Anyone can fetch it (:func:`parse`, which trusts nothing in it)
and hold it against the verdicts they read themselves (:func:`check`).

Only the steps are checked by the verifiers (a step rate no machine could reach is refused); the
samples are the trainer's own word (its checkpoint's ``samples_seen``), shown as said, within a
sanity bound. So a key's share of the run's training compute is counted from what was verified:
its steps, at the preset's batch, times the preset's training FLOPs per sample (the experts' from
``experts.flops``, the router's counted on the network itself). Claiming a larger batch buys no
larger share; a trainer that really runs a larger batch than its preset's is credited the preset's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pydantic.v1 as pydantic

from data.job_id import JobId
from swarm import claims
from swarm.records import RunRecord, fingerprint

MAX_LEDGER_BYTES = 32 << 20  # ~150,000 acceptances: far beyond any run here
MAX_SAMPLES_PER_STEP = 4096  # a sanity bound on a trainer's word (the serving schema's largest batch)
TEXT_TOKENS, TEXT_DIM = 16, 384  # the embedded text encoder's (MiniLM): what FLOPs are counted with


class LedgerError(ValueError):
    """A ledger file that cannot be read as one."""


@dataclass(frozen=True, order=True)
class Entry:
    """One accepted checkpoint."""

    t: float  # DHT time of the acceptance
    job: str
    step: int
    sha256: str
    key: str  # fingerprint of the key that signed the accepted record: who trained it
    samples: int = 0  # samples_seen the checkpoint says (all its training, not only its own steps)
    loss: float = 0.0  # the verifier's held-out loss
    verifier: str = ""  # fingerprint of the verifier that accepted it

    @property
    def ident(self) -> tuple[str, str, int]:
        return self.job, self.sha256, self.step


class _EntrySchema(pydantic.BaseModel):
    class Config:
        extra = pydantic.Extra.forbid

    t: pydantic.confloat(strict=True, ge=0)
    job: pydantic.constr(regex=r"^(expert_[0-9]{1,3}|router|distill)$")
    step: pydantic.conint(strict=True, ge=1)
    sha256: pydantic.constr(regex=r"^[0-9a-f]{64}$")
    key: pydantic.constr(regex=r"^[0-9a-f]{32}$")
    samples: pydantic.conint(strict=True, ge=0, lt=1 << 62)
    loss: pydantic.confloat(strict=True, ge=0, le=1e6)
    verifier: pydantic.constr(regex=r"^[0-9a-f]{32}$")


def line(entry: Entry) -> bytes:
    """One entry as the file stores it: canonical JSON, one line."""
    return json.dumps(asdict(entry), sort_keys=True, separators=(",", ":")).encode() + b"\n"


def parse(data: bytes, run: RunRecord | None = None) -> list[Entry]:
    """The entries of a ledger file's bytes (from a peer: nothing in it is trusted). Every line
    must be one well-formed entry, of a job of ``run`` when given, and no checkpoint twice."""
    if len(data) > MAX_LEDGER_BYTES:
        raise LedgerError(f"a ledger of {len(data)} bytes; at most {MAX_LEDGER_BYTES}")
    if data and not data.endswith(b"\n"):
        raise LedgerError("the ledger's last line is cut off")
    jobs = set(run.jobs()) if run is not None else None
    out, seen = [], set()
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            fields = _EntrySchema.parse_obj(json.loads(raw)).dict()
        except (ValueError, pydantic.ValidationError) as e:
            raise LedgerError(f"line {n} is not a ledger entry: {str(e).splitlines()[0][:120]}") from None
        entry = Entry(**fields)
        if jobs is not None and entry.job not in jobs:
            raise LedgerError(f"line {n} names {entry.job}, which this run does not have")
        if entry.ident in seen:
            raise LedgerError(f"line {n} lists {entry.job} step {entry.step} a second time")
        seen.add(entry.ident)
        out.append(entry)
    return out


def from_snapshot(snap: claims.Snapshot) -> list[Entry]:
    """The acceptances the trusted verifiers' verdict records show now, one per checkpoint (the
    earliest), minus any checkpoint a trusted verifier refused the bytes of."""
    if not snap.verdicts:
        return []
    trusted = claims.trusted(snap)
    out: dict[tuple[str, str, int], Entry] = {}
    refused: set[tuple[str, str, int]] = set()
    for job, by_key in snap.verdicts.items():
        for key, rec in by_key.items():
            verifier = fingerprint(key)
            if rec.run != snap.run.manifest_sha256 or verifier not in trusted:
                continue
            for v in rec.entries:
                ident = (job, v.sha256, v.step)
                if not v.ok:
                    if v.about == "bytes":
                        refused.add(ident)
                    continue
                if v.step < 1:
                    continue
                entry = Entry(v.t, job, v.step, v.sha256, v.owner, v.samples, max(0.0, v.loss), verifier)
                if ident not in out or entry.t < out[ident].t:
                    out[ident] = entry
    return sorted(e for ident, e in out.items() if ident not in refused)


def merge(*lists: list[Entry]) -> list[Entry]:
    """One entry per checkpoint (the earliest acceptance), in time order."""
    out: dict[tuple[str, str, int], Entry] = {}
    for entries in lists:
        for e in entries:
            if e.ident not in out or e.t < out[e.ident].t:
                out[e.ident] = e
    return sorted(out.values())


def check(entries: list[Entry], snap: claims.Snapshot, until: float) -> list[str]:
    """What in a fetched ledger disagrees with the verdicts this node read itself: an acceptance
    it saw (no later than ``until``, the ledger's newest) missing from it or credited to another
    key, or a checkpoint in it whose bytes a trusted verifier refused. Empty: it checks out."""
    listed = {e.ident: e for e in entries}
    problems = []
    for seen in from_snapshot(snap):
        e = listed.get(seen.ident)
        if e is None and seen.t <= until:
            problems.append(f"{seen.job} step {seen.step} ({seen.sha256[:12]}) was accepted and is not in it")
        elif e is not None and e.key != seen.key:
            problems.append(f"{seen.job} step {seen.step} is credited to {e.key[:12]}, its signer is {seen.key[:12]}")
    refused = {
        (job, v.sha256, v.step)
        for job, v in ((job, v) for job in snap.run.jobs() for v in claims.refused(snap, job))
        if v.about == "bytes"
    }
    problems += [
        f"{e.job} step {e.step} ({e.sha256[:12]}) is in it, and was refused" for e in entries if e.ident in refused
    ]
    return problems


@dataclass
class Contribution:
    """What one key gave a run."""

    key: str
    steps: int = 0
    samples: int = 0
    flops: float = 0.0
    first: float = 0.0
    last: float = 0.0
    jobs: dict[str, dict[str, int]] = field(default_factory=dict)  # job → {"steps", "samples"}

    def add(self, job: str, steps: int, samples: int, flops: float, t: float) -> None:
        self.steps += steps
        self.samples += samples
        self.flops += flops
        self.first = min(self.first, t) if self.first else t
        self.last = max(self.last, t)
        mine = self.jobs.setdefault(job, {"steps": 0, "samples": 0})
        mine["steps"] += steps
        mine["samples"] += samples


def credit(entries: list[Entry], run: RunRecord) -> list[Contribution]:
    """Per key, the verified steps it added to each job, the samples its checkpoints say they
    added, and the FLOPs of those steps at the preset's batch: each job's accepted checkpoints in
    step order, each credited with the steps past the one before it (a fork that resumed from an
    older checkpoint earns only the progress past the newest). Largest FLOPs first."""
    by_key: dict[str, Contribution] = {}
    by_job: dict[str, dict[int, Entry]] = {}
    for e in sorted(entries):  # the earliest acceptance at a step wins it
        if e.job in run.jobs():
            by_job.setdefault(e.job, {}).setdefault(e.step, e)
    for job, at in by_job.items():
        step0, samples0 = 0, 0
        per_step = batch_size(run, job) * flops_per_sample(run, job)
        for step in sorted(at):
            e = at[step]
            steps = step - step0
            samples = min(max(0, e.samples - samples0), steps * MAX_SAMPLES_PER_STEP)
            by_key.setdefault(e.key, Contribution(e.key)).add(job, steps, samples, steps * per_step, e.t)
            step0, samples0 = step, max(samples0, e.samples)
    return sorted(by_key.values(), key=lambda c: (-c.flops, -c.steps, c.key))


def summary(entries: list[Entry], run: RunRecord) -> dict:
    """The ledger as plain data (what the status page and ``--ledger --json`` show)."""
    contributions = credit(entries, run)
    total = sum(c.flops for c in contributions)
    return {
        "entries": len(entries),
        "total_steps": sum(c.steps for c in contributions),
        "total_samples": sum(c.samples for c in contributions),
        "total_flops": total,
        "contributors": [asdict(c) | {"share": c.flops / total if total else 0.0} for c in contributions],
    }


def batch_size(run: RunRecord, job: str) -> int:
    """The preset's batch: the samples a verified step's FLOPs are counted for."""
    from experts.presets import get_preset
    from router.network import get_router_preset
    from router.presets import DEFAULT_ROUTER_PRESET

    jid = JobId.parse(job)
    if jid.is_router:
        return get_router_preset(DEFAULT_ROUTER_PRESET).batch_size
    if jid.is_distill:
        return get_preset(run.student_preset()).batch_size
    return get_preset(run.presets[jid.expert_index]).batch_size


def flops_per_sample(run: RunRecord, job: str) -> float:
    """Training FLOPs (forward + backward) of one sample of ``job``, from its preset."""
    jid = JobId.parse(job)
    if jid.is_router:
        return _router_flops(run.presets[0], run.num_clusters)
    if jid.is_distill:  # the student's training, and its teacher's forwards: top-2 experts and the router
        teacher = 2 * _expert_flops(run.presets[0]) / 3 + _router_flops(run.presets[0], run.num_clusters) / 3
        return _expert_flops(run.student_preset()) + teacher
    return _expert_flops(run.presets[jid.expert_index])


@functools.lru_cache(maxsize=16)
def _expert_flops(preset: str) -> float:
    from experts.flops import train_flops_per_sample
    from experts.presets import get_preset

    return float(train_flops_per_sample(get_preset(preset), TEXT_TOKENS, TEXT_DIM))


@functools.lru_cache(maxsize=16)
def _router_flops(expert_preset: str, num_experts: int) -> float:
    """The run's default router, counted by torch on the network itself (3x its forward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from experts.presets import get_preset
    from router.network import build_router, get_router_preset
    from router.presets import DEFAULT_ROUTER_PRESET

    shape = get_preset(expert_preset)
    net = build_router(
        get_router_preset(DEFAULT_ROUTER_PRESET), num_experts, shape.channels, shape.sample_size, TEXT_DIM
    ).eval()
    x = torch.zeros(1, shape.channels, shape.sample_size, shape.sample_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, torch.full((1,), 500.0), torch.zeros(1, TEXT_DIM))
    return 3.0 * counter.get_total_flops()


class LedgerFile:
    """A verifier's ledger on disk: JSON lines that are only ever appended. A line cut short by a
    crash is dropped when the file is opened again (what it said is re-added from the verdicts)."""

    def __init__(self, path: Path, run: RunRecord) -> None:
        self.path, self.run = Path(path), run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(data)
        try:
            self.entries = parse(data, run)
        except LedgerError as e:
            raise LedgerError(f"{self.path}: {e}") from None
        self._known = {e.ident for e in self.entries}
        self.digest = hashlib.sha256(data).hexdigest()
        self.size = len(data)

    def add(self, entries: list[Entry]) -> list[Entry]:
        """Append the entries not in it yet (synced to disk); returns them."""
        new = [e for e in sorted(entries) if e.ident not in self._known and e.job in self.run.jobs()]
        if not new:
            return []
        data = b"".join(line(e) for e in new)
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.entries += new
        self._known |= {e.ident for e in new}
        self.digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.size += len(data)
        return new

    @property
    def newest(self) -> float:
        return max((e.t for e in self.entries), default=0.0)

    def frozen_copy(self, folder: Path) -> Path:
        """The file as it is now, at ``folder/<digest>.jsonl``: what is served under that hash (the
        live file grows, so its hash moves). Older copies are removed."""
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"{self.digest}.jsonl"
        if not dest.exists():
            tmp = dest.with_suffix(".tmp")
            tmp.write_bytes(self.path.read_bytes())
            tmp.replace(dest)
        for old in folder.glob("*.jsonl"):
            if old != dest:
                old.unlink(missing_ok=True)
        return dest
