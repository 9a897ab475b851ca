"""The name of a training job: ``expert_K``, ``router``, ``distill`` or ``monolith``.

A swarm job is an expert (``expert_0`` .. ``expert_63``), the router, or ``distill`` (one network
trained on the routed ensemble's velocity, once the experts and the router are done, in a run that
asks for it); ``monolith``, the baseline trained on one machine, is never a swarm job. A job's
name is part of the wire format (DHT keys, JSON fields, checkpoint folders): only the canonical
form parses (``expert_7``, never ``expert_07``, ``expert_+7`` or ``Expert_7``), so
``str(JobId.parse(s)) == s`` for every name that parses, and a name built here is byte for byte
the one that was built by hand before.

Imported by the bootstrap through :mod:`swarm.records`: it imports nothing but the standard library.
"""

from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

MAX_EXPERTS = 64  # jobs expert_0..expert_63 and router have DHT schema fields
# A server serves networks by slot, the int a denoising request names: expert K's slot is K, the
# distilled student's is this one (past every expert's), so one wire field, one queue key and one
# audit path serve both.
DISTILL_SLOT = MAX_EXPERTS

EXPERT, ROUTER, DISTILL, MONOLITH = "expert", "router", "distill", "monolith"
_RANK = {EXPERT: 0, ROUTER: 1, DISTILL: 2, MONOLITH: 3}  # sort order: experts by index, router, distill, monolith
_EXPERT_NAME = re.compile(r"expert_(0|[1-9][0-9]{0,5})")  # canonical decimal, no sign, no leading zero


def _shown(text: str) -> str:
    """``text`` quoted on one line, cut short when long (error messages quote untrusted input)."""
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "…"


@functools.total_ordering
@dataclass(frozen=True, eq=True)
class JobId:
    """One job. Build it with :meth:`expert`, :meth:`parse` or the constants :attr:`ROUTER`,
    :attr:`DISTILL` and :attr:`MONOLITH`; ``str(job)`` is its canonical name. Sorted: experts by
    index, then the router, the distilled student, the monolith."""

    kind: str  # "expert", "router", "distill" or "monolith"
    _index: int = field(default=-1, repr=False)  # the expert's index; -1 for the others

    ROUTER: ClassVar[JobId]
    DISTILL: ClassVar[JobId]
    MONOLITH: ClassVar[JobId]

    def __post_init__(self) -> None:
        if self.kind not in _RANK:
            raise ValueError(
                f"not a kind of job: {self.kind!r}; a job is an expert, the router, distill or the monolith"
            )
        if self.kind == EXPERT:
            k = self._index
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < MAX_EXPERTS:
                raise ValueError(f"an expert's index is an int in 0..{MAX_EXPERTS - 1}; got {k!r}")
        elif self._index != -1:
            raise ValueError(f"the {self.kind} job has no index; got {self._index!r}")

    # ------------------------------------------------------------ construction
    @classmethod
    def expert(cls, k: int) -> JobId:
        """Expert ``k``'s job, ``expert_k`` (``ValueError`` unless ``0 <= k < MAX_EXPERTS``); ``k`` may
        be any integer type (a numpy or torch integer too), never a bool."""
        if not isinstance(k, bool) and hasattr(k, "__index__"):
            k = operator.index(k)
        return cls(EXPERT, k)

    @classmethod
    def router(cls) -> JobId:
        return cls.ROUTER

    @classmethod
    def monolith(cls) -> JobId:
        return cls.MONOLITH

    @classmethod
    def from_slot(cls, slot: int) -> JobId:
        """The job whose network a server serves in ``slot``: ``expert_K`` for K, ``distill`` for
        :data:`DISTILL_SLOT`; ``ValueError`` for any other int."""
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise ValueError(f"a served slot is an int; got {slot!r}")
        return cls.DISTILL if slot == DISTILL_SLOT else cls.expert(slot)

    @classmethod
    def parse(cls, text: str) -> JobId:
        """The job named ``text`` in its canonical form; ``ValueError`` for anything else."""
        if not isinstance(text, str):
            raise TypeError(f"a job name is a str; got {type(text).__name__}")
        if text == ROUTER:
            return cls.ROUTER
        if text == MONOLITH:
            return cls.MONOLITH
        if text == DISTILL:
            return cls.DISTILL
        m = _EXPERT_NAME.fullmatch(text)
        if m is None:
            raise ValueError(
                f"not a job: {_shown(text)}; a job is expert_K (K in 0..{MAX_EXPERTS - 1}, no leading zeros), "
                "router, distill or monolith"
            )
        k = int(m.group(1))
        if k >= MAX_EXPERTS:
            raise ValueError(f"not a job: {_shown(text)}; an expert's index is in 0..{MAX_EXPERTS - 1}")
        return cls(EXPERT, k)

    @classmethod
    def try_parse(cls, text: str) -> JobId | None:
        """:meth:`parse`, or ``None`` where ``text`` names no job (e.g. ``monolith_at_300``)."""
        try:
            return cls.parse(text)
        except (TypeError, ValueError):
            return None

    # ------------------------------------------------------------ what it is
    @property
    def is_expert(self) -> bool:
        return self.kind == EXPERT

    @property
    def is_router(self) -> bool:
        return self.kind == ROUTER

    @property
    def is_distill(self) -> bool:
        return self.kind == DISTILL

    @property
    def is_monolith(self) -> bool:
        return self.kind == MONOLITH

    @property
    def is_swarm(self) -> bool:
        """Whether the swarm trains it (an expert, the router or distill; the monolith is local only)."""
        return self.kind != MONOLITH

    @property
    def expert_index(self) -> int:
        """The expert's index ``K``; ``ValueError`` for every other job."""
        if self.kind != EXPERT:
            raise ValueError(f"{self} is not an expert's job: it has no expert index")
        return self._index

    @property
    def slot(self) -> int:
        """The slot a server serves this job's network in (see :data:`DISTILL_SLOT`); ``ValueError``
        for the router and the monolith, which no server serves."""
        if self.kind == DISTILL:
            return DISTILL_SLOT
        return self.expert_index

    @property
    def shown(self) -> str:
        """How people read the job's network: ``expert 3``, ``the distilled student``, ``the router``."""
        if self.kind == EXPERT:
            return f"expert {self._index}"
        return {DISTILL: "the distilled student", ROUTER: "the router", MONOLITH: "the monolith"}[self.kind]

    def folder(self, root: Path) -> Path:
        """The job's checkpoint folder under ``root``: ``root / "expert_3"``, ``root / "router"``, ..."""
        return Path(root) / str(self)

    # ------------------------------------------------------------ name and order
    def __str__(self) -> str:
        return f"{EXPERT}_{self._index}" if self.kind == EXPERT else self.kind

    def __repr__(self) -> str:
        return f"JobId({str(self)!r})"

    def _key(self) -> tuple[int, int]:
        return _RANK[self.kind], self._index

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, JobId):
            return NotImplemented
        return self._key() < other._key()


JobId.ROUTER = JobId(ROUTER)
JobId.DISTILL = JobId(DISTILL)
JobId.MONOLITH = JobId(MONOLITH)


def slot_shown(slot: object) -> str:
    """How people read a served slot: ``expert 3``, ``the distilled student``; a slot no job has
    (a stranger's request, say) is shown as ``slot <repr>``."""
    try:
        return JobId.from_slot(slot).shown  # type: ignore[arg-type]
    except ValueError:
        return f"slot {slot!r}"


def swarm_jobs(num_experts: int = MAX_EXPERTS, distill: bool = False) -> list[JobId]:
    """The swarm jobs of a run of ``num_experts`` experts, sorted: ``expert_0`` .. ``expert_{K-1}``,
    then ``router`` (and ``distill`` with ``distill``). With the default and ``distill``, every swarm
    job the DHT schema has fields for."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 0 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"a run has 0..{MAX_EXPERTS} experts; got {num_experts!r}")
    return [*(JobId.expert(k) for k in range(num_experts)), JobId.ROUTER, *([JobId.DISTILL] if distill else [])]


def swarm_job_names(num_experts: int = MAX_EXPERTS, distill: bool = False) -> list[str]:
    """The names of :func:`swarm_jobs` (what DHT keys and records carry)."""
    return [str(job) for job in swarm_jobs(num_experts, distill)]
