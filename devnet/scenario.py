"""Scenario files (TOML): a workload trace, the fleet it runs on, and faults.

    [scenario]
    name = "default"
    fleet = "../fleets/default.toml"     # relative to this file; or --fleet on the command line
    providers = 10                        # members of the fleet, in order, repeated as needed
    seed = 7
    solvers = ["optimal", "greedy-price", "greedy-energy", "round-robin"]
    weights = { energy = 1.0, latency = 0.0005 }   # J per J, J per ms of waiting; leave out for
                                          # the buyers' default (node/placement.py buyer_weights)

    [[workload]]                          # Poisson arrivals
    model = "squeezenet"                  # a reference model from the onnx package, or a .onnx path
    rate_per_s = 1.5
    duration_s = 10.0
    jobs = [2, 6]                         # jobs per arrival, min and max
    items = [8, 48]                       # rows per job, min and max
    deadline_ms = [400, 2000]             # per arrival; leave out for none

    [[jobs]]                              # explicit trace rows
    at_s = 0.5
    model = "shufflenet"
    count = 4
    items = 16
    deadline_ms = 800

    [[faults]]
    at_s = 3.0
    provider = 1                          # index among the devnet's providers
    action = "kill"                       # kill (-9) | pause (SIGSTOP, then SIGCONT) | restart
    duration_s = 3.0                      # pause only
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from matcher import Weights
from matcher.solve import SOLVERS
from node.calibrate import reference_model_path

FAULT_ACTIONS = ("kill", "pause", "restart")
# Not a matcher: one hypothetical matcher that places every buyer's jobs with every
# provider's true queue, the best coordination possible (devnet/simulate.py; simulate only).
CENTRAL = "central"
SCENARIO_SOLVERS = (*SOLVERS, CENTRAL)


class ScenarioError(ValueError):
    pass


@dataclass(frozen=True)
class Arrival:
    at_s: float
    model: Path
    count: int
    items: int
    deadline_ms: float | None


@dataclass(frozen=True)
class Fault:
    at_s: float
    provider: int
    action: str
    duration_s: float = 0.0


@dataclass
class Scenario:
    name: str
    path: Path
    fleet: Path | None
    providers: int
    seed: int
    solvers: list[str]
    weights: Weights | None  # None: each buyer's default (node.placement.buyer_weights)
    arrivals: list[Arrival] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    @property
    def models(self) -> list[Path]:
        return sorted({a.model for a in self.arrivals})

    @property
    def job_count(self) -> int:
        return sum(a.count for a in self.arrivals)

    def check_sizes(self) -> None:
        """Every job's inputs fit one request (what the buyer checks before sending):
        a job too big for a frame is refused here, naming the rows that would fit."""
        from node.client import REQUEST_SLACK_BYTES
        from protocol.messages import MAX_REQUEST_BYTES
        from protocol.tensors import MAX_TENSOR_BYTES

        for model in self.models:
            row_bytes = input_bytes_per_item(model)
            fits = min(MAX_TENSOR_BYTES // max(1, max(row_bytes, default=1)),
                       (MAX_REQUEST_BYTES - REQUEST_SLACK_BYTES) // max(1, sum(row_bytes)))
            big = [a for a in self.arrivals if a.model == model and a.items > fits]
            if big:
                raise ScenarioError(f"{self.path}: {len(big)} arrivals of {model.stem} have up to "
                                    f"{max(a.items for a in big)} items; one job carries at most {fits} "
                                    "(its inputs must fit one request): lower items, or split the job")


def input_bytes_per_item(model: Path) -> list[int]:
    """Bytes of one row of each of the model's inputs (symbolic axes count as 1)."""
    from node.modelio import InputMismatch, signature_of_model

    try:
        ports = signature_of_model(model).inputs
    except InputMismatch as exc:
        raise ScenarioError(f"{model}: {exc}") from None
    return [int(np.prod([d if isinstance(d, int) else 1 for d in p.shape[1:]])) * np.dtype(p.dtype or "float32").itemsize
            for p in ports]


def _model(value, where: str, base: Path) -> Path:
    if not isinstance(value, str):
        raise ScenarioError(f"{where}.model: expected a model name or path, got {value!r}")
    path = reference_model_path(value)
    if not path.exists():
        path = (base / value).resolve()
    if not path.exists():
        raise ScenarioError(f"{where}.model: {value!r} is neither a reference model nor a file")
    return path


def _pair(value, where: str, kind=float) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value, value]
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
        raise ScenarioError(f"{where}: expected a number or [min, max], got {value!r}")
    lo, hi = kind(value[0]), kind(value[1])
    if lo > hi or lo < 0:
        raise ScenarioError(f"{where}: expected 0 <= min <= max, got {value!r}")
    return lo, hi


SCENARIO_KEYS = {"name", "fleet", "providers", "seed", "solvers", "weights"}
WORKLOAD_KEYS = {"model", "rate_per_s", "duration_s", "jobs", "items", "deadline_ms"}
JOB_KEYS = {"at_s", "model", "count", "items", "deadline_ms"}
FAULT_KEYS = {"at_s", "provider", "action", "duration_s"}
TOP_KEYS = {"scenario", "workload", "jobs", "faults"}


def _known(table, keys: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise ScenarioError(f"{where}: expected a table, got {table!r:.60}")
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ScenarioError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                            f"expected some of {', '.join(sorted(keys))}")


def _number(value, where: str, *, minimum: float = 0.0, above: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScenarioError(f"{where}: expected a number, got {value!r}")
    if value < minimum or above and value == minimum:
        raise ScenarioError(f"{where}: must be {'>' if above else '>='} {minimum:g}, got {value}")
    return float(value)


def load_scenario(path: Path) -> Scenario:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    base = path.parent
    _known(data, TOP_KEYS, str(path))
    head = data.get("scenario", {})
    _known(head, SCENARIO_KEYS, f"{path}: scenario")
    solvers = head.get("solvers", list(SOLVERS))
    unknown = [s for s in solvers if s not in SCENARIO_SOLVERS]
    if unknown or not solvers:
        raise ScenarioError(f"{path}: scenario.solvers: unknown {unknown}; choose from {list(SCENARIO_SOLVERS)}")
    weights = None
    if "weights" in head:
        w = head["weights"]
        _known(w, {"energy", "latency", "carbon", "price"}, f"{path}: scenario.weights")
        weights = Weights(**{k: _number(v, f"{path}: scenario.weights.{k}") for k, v in w.items()})
    providers = head.get("providers", 10)
    if not isinstance(providers, int) or providers < 1:
        raise ScenarioError(f"{path}: scenario.providers: expected an int >= 1, got {providers!r}")
    fleet = head.get("fleet")
    scenario = Scenario(str(head.get("name", path.stem)), path, (base / fleet).resolve() if fleet else None,
                        providers, int(head.get("seed", 0)), solvers, weights)
    rng = np.random.default_rng(scenario.seed)
    for i, wl in enumerate(data.get("workload", [])):
        where = f"{path}: workload[{i}]"
        _known(wl, WORKLOAD_KEYS, where)
        model = _model(wl.get("model"), where, base)
        rate = _number(wl.get("rate_per_s", 1.0), f"{where}.rate_per_s", above=True)
        duration = _number(wl.get("duration_s", 10.0), f"{where}.duration_s", above=True)
        jobs = _pair(wl.get("jobs", 1), f"{where}.jobs", int)
        items = _pair(wl.get("items", 1), f"{where}.items", int)
        deadline = _pair(wl["deadline_ms"], f"{where}.deadline_ms") if "deadline_ms" in wl else None
        if items[0] < 1 or jobs[0] < 1:
            raise ScenarioError(f"{where}: jobs and items must be >= 1")
        t = float(rng.exponential(1 / rate))
        while t < duration:
            scenario.arrivals.append(Arrival(
                round(t, 3), model, int(rng.integers(jobs[0], jobs[1] + 1)), int(rng.integers(items[0], items[1] + 1)),
                None if deadline is None else round(float(rng.uniform(*deadline)), 1)))
            t += float(rng.exponential(1 / rate))
    for i, row in enumerate(data.get("jobs", [])):
        where = f"{path}: jobs[{i}]"
        _known(row, JOB_KEYS, where)
        if "at_s" not in row:
            raise ScenarioError(f"{where}: missing 'at_s'")
        count, items = row.get("count", 1), row.get("items", 1)
        for key, value in (("count", count), ("items", items)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ScenarioError(f"{where}.{key}: expected an int >= 1, got {value!r}")
        scenario.arrivals.append(Arrival(
            _number(row["at_s"], f"{where}.at_s"), _model(row.get("model"), where, base), count, items,
            _number(row["deadline_ms"], f"{where}.deadline_ms", above=True) if "deadline_ms" in row else None))
    for i, row in enumerate(data.get("faults", [])):
        where = f"{path}: faults[{i}]"
        _known(row, FAULT_KEYS, where)
        action = row.get("action")
        if action not in FAULT_ACTIONS:
            raise ScenarioError(f"{where}.action: expected one of {FAULT_ACTIONS}, got {action!r}")
        provider = row.get("provider")
        if not isinstance(provider, int) or not 0 <= provider < scenario.providers:
            raise ScenarioError(f"{where}.provider: expected an index 0..{scenario.providers - 1}, got {provider!r}")
        scenario.faults.append(Fault(_number(row.get("at_s", 0.0), f"{where}.at_s"), provider, action,
                                     _number(row.get("duration_s", 0.0), f"{where}.duration_s")))
    if not scenario.arrivals:
        raise ScenarioError(f"{path}: no jobs: add [[workload]] or [[jobs]]")
    scenario.arrivals.sort(key=lambda a: a.at_s)
    scenario.faults.sort(key=lambda f: f.at_s)
    return scenario
