"""Settings in, result out: :class:`SolverOptions` and :class:`SolveResult`, plus the errors."""
from __future__ import annotations

from dataclasses import dataclass, field

AXES_AND_FEATURES = ("dp", "tp", "pp", "zero", "offload", "recompute")
OBJECTIVES = ("time",)


@dataclass(frozen=True)
class SolverOptions:
    """How to search.

    time_limit_s: wall-clock budget of the whole search (the outer loop stops starting new
      ILPs when it is spent and reports the best plan found with its gap).
    workers / seed: OR-Tools threads and random seed; fixed so the same inputs give the same plan.
    memory_reserve_fraction: share of each device's memory kept free (CUDA context, NCCL
      buffers, allocator fragmentation). 0.1 by default: PyTorch's caching allocator commonly
      loses 5-10% to fragmentation and the CUDA context takes ~0.5 GiB of an 80 GiB H100.
    allowed: the features the solver may use; drop one to forbid it (e.g. no "pp").
    allow_pp_with_tp: False keeps pipeline and tensor parallelism apart (meshes with pp > 1
      and tp > 1 are skipped), for runtimes that run pp x dp and dp x tp only.
    backend: the OR-Tools MIP backend ("CBC" default: fastest on these models in our measurements; "SCIP", "HIGHS").
    prefer_simpler_within: a plan with fewer pipeline stages, then less tensor parallelism,
      then fewer microbatches is kept over a faster one predicted at most this fraction faster.
      0 by default (the fastest prediction). Opt-in robustness: on the 2-core development VM
      it helped the MLP (pp2 x tp2, predicted 2.4 % faster than tp4, measured 65-110 ms
      against tp4's 57-69) and would have hurt GPT, whose pipelines measured fastest in 7 of
      9 plan_choice runs while often predicted within 1-6 % of dp.
    """

    time_limit_s: float = 30.0
    workers: int = 1
    seed: int = 0
    memory_reserve_fraction: float = 0.1
    objective: str = "time"
    allowed: frozenset = field(default_factory=lambda: frozenset(AXES_AND_FEATURES))
    backend: str = "CBC"
    allow_pp_with_tp: bool = True
    max_partitions: int = 12  # stage-size candidates per (mesh, microbatches) beyond all compositions
    relative_gap: float = 1e-6
    prefer_simpler_within: float = 0.0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"SolverOptions.objective {self.objective!r} is not one of {OBJECTIVES}")
        if not 0.0 <= self.memory_reserve_fraction < 1.0:
            raise ValueError(f"SolverOptions.memory_reserve_fraction must be in [0, 1), "
                             f"got {self.memory_reserve_fraction}")
        if not 0.0 <= self.prefer_simpler_within < 1.0:
            raise ValueError(f"SolverOptions.prefer_simpler_within must be in [0, 1), got {self.prefer_simpler_within}")
        if self.time_limit_s <= 0:
            raise ValueError(f"SolverOptions.time_limit_s must be > 0, got {self.time_limit_s}")
        allowed = frozenset(self.allowed)
        bad = allowed - set(AXES_AND_FEATURES)
        if bad:
            raise ValueError(f"SolverOptions.allowed has unknown feature(s) {sorted(bad)}; "
                             f"known: {list(AXES_AND_FEATURES)}")
        object.__setattr__(self, "allowed", allowed)


@dataclass(frozen=True)
class SolveResult:
    status: str  # "optimal" | "feasible" | "infeasible" | "pinned"
    objective: float  # seconds per step
    gap: float  # relative optimality gap
    wall_s: float
    num_variables: int = 0
    num_constraints: int = 0


class InfeasibleError(ValueError):
    """No plan fits in memory; the message gives the numbers."""
