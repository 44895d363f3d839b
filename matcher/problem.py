"""The matching problem and its JSON form (pure; no I/O here). The format, with every
field's unit and default, is written down in docs/match.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.errors import DecodeError
from protocol.fields import Fields, str_item
from protocol.messages import ARCHES  # the one list of architectures, with the wire's


class ProblemError(ValueError):
    """A problem description is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class Weights:
    energy: float = 1.0
    latency: float = 0.01
    carbon: float = 0.0
    price: float = 0.0


@dataclass(frozen=True, slots=True)
class Provider:
    id: str
    arch: str
    slots: int
    slot_memory_mb: float
    marginal_w: float
    carbon_g_per_kwh: float
    rtt_ms: float
    backlog_ms: float
    price_per_s: float
    throughput: dict[str, float] = field(hash=False)  # items per second per slot, by model


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    model: str
    items: int
    memory_mb: float = 0.0
    arch: tuple[str, ...] | None = None
    deadline_ms: float | None = None
    max_price: float | None = None


@dataclass(frozen=True, slots=True)
class Problem:
    providers: tuple[Provider, ...]
    jobs: tuple[Job, ...]
    weights: Weights = Weights()

    def to_json(self) -> dict[str, Any]:
        w = self.weights
        return {
            "weights": {"energy": w.energy, "latency": w.latency, "carbon": w.carbon, "price": w.price},
            "providers": [{"id": p.id, "arch": p.arch, "slots": p.slots, "slot_memory_mb": None if p.slot_memory_mb == float("inf") else p.slot_memory_mb,
                           "marginal_w": p.marginal_w, "carbon_g_per_kwh": p.carbon_g_per_kwh,
                           "rtt_ms": p.rtt_ms, "backlog_ms": p.backlog_ms, "price_per_s": p.price_per_s,
                           "throughput": dict(p.throughput)} for p in self.providers],
            "jobs": [{"id": j.id, "model": j.model, "items": j.items, "memory_mb": j.memory_mb,
                      "arch": list(j.arch) if j.arch is not None else None, "deadline_ms": j.deadline_ms,
                      "max_price": j.max_price} for j in self.jobs],
        }


def _provider(value: Any, path: str) -> Provider:
    f = Fields(value, path)
    throughput_raw = f.raw("throughput")
    if not isinstance(throughput_raw, dict):
        raise DecodeError(f"{path}.throughput: expected map of model -> items/s, got {throughput_raw!r:.60}")
    tf = Fields(throughput_raw, f"{path}.throughput")
    throughput = {str(model): tf.float(model, min=1e-12) for model in throughput_raw}
    return Provider(
        id=f.str("id", max_len=256), arch=f.str("arch", choices=ARCHES), slots=f.int("slots", min=1, max=4096),
        # Absent: no memory limit (the decoder refuses an infinite number the user wrote).
        slot_memory_mb=_or_inf(f.float("slot_memory_mb", min=0.0, default=None)),
        marginal_w=f.float("marginal_w", min=0.0), carbon_g_per_kwh=f.float("carbon_g_per_kwh", min=0.0, default=0.0),
        rtt_ms=f.float("rtt_ms", min=0.0, default=0.0), backlog_ms=f.float("backlog_ms", min=0.0, default=0.0),
        price_per_s=f.float("price_per_s", min=0.0, default=0.0), throughput=throughput,
    )


def _or_inf(value: float | None) -> float:
    return float("inf") if value is None else value


def _job(value: Any, path: str) -> Job:
    f = Fields(value, path)
    arch_raw = f.raw("arch", default=None)
    if arch_raw is None:
        arch = None
    else:
        arch = tuple(f.list("arch", str_item(16)))
        for a in arch:
            if a not in ARCHES:
                raise DecodeError(f"{path}.arch: expected items of {'/'.join(ARCHES)}, got {a!r}")
    return Job(
        id=f.str("id", max_len=256), model=f.str("model", max_len=256), items=f.int("items", min=1),
        memory_mb=f.float("memory_mb", min=0.0, default=0.0), arch=arch,
        deadline_ms=f.float("deadline_ms", min=0.0, default=None),
        max_price=f.float("max_price", min=0.0, default=None),
    )


def problem_from_json(data: Any) -> Problem:
    """Build a Problem from parsed JSON, or raise ProblemError naming the bad field."""
    try:
        f = Fields(data, "problem")
        weights = Weights()
        if f.raw("weights", default=None) is not None:
            wf = f.map("weights")
            weights = Weights(*(wf.float(k, min=0.0, default=getattr(weights, k))
                                for k in ("energy", "latency", "carbon", "price")))
        providers = tuple(f.list("providers", _provider, max_len=1_000_000))
        jobs = tuple(f.list("jobs", _job, max_len=10_000_000))
    except DecodeError as exc:
        raise ProblemError(str(exc)) from None
    for kind, items in (("provider", providers), ("job", jobs)):
        seen: set[str] = set()
        for item in items:
            if item.id in seen:
                raise ProblemError(f"problem.{kind}s: id {item.id!r} appears twice")
            seen.add(item.id)
    return Problem(providers, jobs, weights)
