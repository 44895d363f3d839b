"""idlemesh matcher. Pure: no I/O, no clock, no randomness (seeds are arguments).

`solve(problem, solver=..., time_limit_s=..., seed=...) -> Result` implements the contract
in shared/DESIGN.md: place as many jobs as possible, then minimise
sum(w.energy*energy_j + w.latency*latency_ms + w.carbon*carbon_g + w.price*price).
"""

from .problem import Job, Problem, ProblemError, Provider, Weights, problem_from_json
from .result import Assignment, Result, Unassigned
from .solve import SOLVERS, solve

__all__ = ["Assignment", "Job", "Problem", "ProblemError", "Provider", "Result", "SOLVERS",
           "Unassigned", "Weights", "problem_from_json", "solve"]
