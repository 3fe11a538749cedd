"""SPDInv (Li et al., ECCV 2024, "Source Prompt Disentangled Inversion"): each inversion step is
the fixed point z_t = f(z_t) = C1 z_{t-1} + C2 eps(z_t, t, c), found from the DDIM guess by
Anderson-accelerated fixed-point iteration (the default), by gradient descent on ||f(z_t) - z_t||^2
(the paper's solver, `solver="gradient"`), or by another solver in `solvers`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..arguments import option, positive_float, positive_int
from ..errors import SpdinvError
from ..model import DiffusionModel
from ..schedule import Schedule
from .base import Inversion, StepResult, fixed_point_inversion
from .solvers import DESCENT_SOLVERS, OPTIMIZERS, SOLVERS, STOP_RULES, solver_help


@dataclass(frozen=True)
class SPDInvOptions:
    """K: most updates per timestep (gradient steps for the paper's solver); lr: step size;
    delta: stop once the mean squared residual is below it; relative_delta (scale-aware, off by
    default): stop only once the residual is also below this fraction of the step's first
    (DDIM-guess) residual; optimizer: adamw (the paper's code, weight decay 0.01), adam or sgd, for
    the gradient solver; solver: a name of `solvers.SOLVERS` (its `SOLVER_SUMMARIES` line is the
    flag's help); anderson, the default, finds the same fixed point as the paper's gradient at a
    lower cost (docs/results.md);
    stop_rule: measured (check before each update, return the best measured iterate) or official
    (the paper's code: update, then check; the unmeasured post-update iterate)."""

    K: int = option(25, "most gradient steps per timestep", parse=positive_int)
    lr: float = option(1e-3, "step size", parse=positive_float)
    delta: float = option(5e-6, "early-stop threshold on the mean squared residual", parse=positive_float)
    relative_delta: float | None = option(
        None, "also stop only below this fraction of each step's first residual (scale-aware; default off)",
        parse=positive_float)
    optimizer: str = option("adamw", "the gradient solver's optimiser: adamw, adam or sgd")
    solver: str = option("anderson", solver_help("anderson"), choices=tuple(SOLVERS))
    stop_rule: str = option("measured", "when a step stops: measured (check the residual before each update, return "
                            "the best measured iterate) or official (the paper's code: update, then check the loss "
                            "measured before it; keep the unmeasured post-update iterate; >= 1 update per step; "
                            "gradient and polyak solvers)", choices=STOP_RULES)

    def __post_init__(self) -> None:
        if not isinstance(self.K, int) or self.K <= 0:
            raise SpdinvError(f"K must be a positive integer, got {self.K}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise SpdinvError(f"lr must be > 0, got {self.lr}")
        if not self.delta > 0 or not math.isfinite(self.delta):
            raise SpdinvError(f"delta must be > 0, got {self.delta}")
        if self.relative_delta is not None and not 0 < self.relative_delta < 1:
            raise SpdinvError(f"relative_delta must be in (0, 1), got {self.relative_delta}")
        if self.optimizer not in OPTIMIZERS:
            raise SpdinvError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.solver not in SOLVERS:
            raise SpdinvError(f"unknown solver {self.solver!r}; valid: {', '.join(SOLVERS)}")
        if self.stop_rule not in STOP_RULES:
            raise SpdinvError(f"unknown stop_rule {self.stop_rule!r}; valid: {', '.join(STOP_RULES)}")
        if self.stop_rule == "official" and self.solver not in DESCENT_SOLVERS:
            raise SpdinvError(f"stop_rule official is the gradient loop's (solver {' or '.join(DESCENT_SOLVERS)}); "
                              f"the solver is {self.solver}")


def solve_fixed_point(f, z_init: Tensor, options: SPDInvOptions, f_init: Tensor | None = None) -> StepResult:
    """One step's fixed point by the options' solver, from z_init; the best *measured* iterate (the
    paper's code returns one unmeasured step later: stop_rule 'official'), the best one so far if a residual is not
    finite. `f_init`, f(z_init) when the caller has it (without a graph), is not evaluated again
    unless a gradient step needs its graph."""
    return SOLVERS[options.solver](f, z_init, options, f_init)


def spdinv(model: DiffusionModel, z0: Tensor, embedding: Tensor, schedule: Schedule,
           options: SPDInvOptions = SPDInvOptions(), *, diagnose: bool = True, progress: bool = True) -> Inversion:
    """SPDInv: DDIM guess, then the solver's search for the step's fixed point (frozen UNet)."""
    # The official code edits with the source prompt's embedding as the unconditional one; that is
    # negative-prompt inversion's ingredient, not SPDInv's, so it is the editor's explicit switch
    # (`uncond="source"`), not a property of this inversion.
    return fixed_point_inversion(model, z0, embedding, schedule, SOLVERS[options.solver], options, method="spdinv",
                                 diagnose=diagnose, progress=progress)
