"""The Inversion result, per-step reports, and the loop every inversion method shares."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..model import DiffusionModel
from ..schedule import Schedule


@dataclass
class StepReport:
    """What one inversion step did. Residuals are the mean squared fixed-point residual
    ||f(z_t) - z_t||^2 / n of the step's initial guess (`before`) and of its result (`after`)."""

    index: int
    timestep: float  # the network's timestep of latent `index` (an int for DDIM)
    residual_before: float = math.nan
    residual_after: float = math.nan
    iterations: int = 0
    network_calls: int = 0
    gradient_calls: int = 0
    seconds: float = 0.0
    warning: str = ""
    diagnostic_calls: int = 0  # UNet rows spent measuring the residuals the solver did not


@dataclass
class StepResult:
    """What a method's step solver returns to the shared loop."""

    latent: Tensor
    iterations: int = 0
    network_calls: int = 1
    gradient_calls: int = 0
    residual_before: float | None = None
    residual_after: float | None = None
    warning: str = ""


@dataclass
class ResidualTracker:
    """Bookkeeping the fixed-point solvers share: evaluations, the first residual, and the best
    *measured* iterate, which is what a solver returns (so the reported residual is the returned
    latent's); a non-finite residual ends the search with a warning."""

    best_latent: Tensor
    best_residual: float = math.inf
    first_residual: float | None = None
    calls: int = 0
    warning: str = ""

    def observe(self, value: float, latent: Tensor, updates: int) -> bool:
        """Record one evaluation of the residual at `latent`; False when it is not finite."""
        self.calls += 1
        if not math.isfinite(value):
            self.warning = f"non-finite residual after {updates} updates; kept the best iterate ({self.best_residual:.3g})"
            return False
        if self.first_residual is None:
            self.first_residual = value
        if value < self.best_residual:
            self.best_residual, self.best_latent = value, latent.detach().clone()
        return True

    def result(self, updates: int, gradient_calls: int = 0) -> StepResult:
        return StepResult(latent=self.best_latent, iterations=updates, network_calls=self.calls,
                          gradient_calls=gradient_calls, residual_before=self.first_residual,
                          residual_after=self.best_residual, warning=self.warning)


@dataclass
class Inversion:
    """An inverted image: the trajectory z_0 ... z_T and whatever an editor needs besides it.

    Per-sampling-step side information is indexed in *sampling* order (index 0 = the step
    from z_T), the order an editor consumes it. With `pin_source` the source branch is reset onto
    the trajectory after every sampling step (DirectInversion), so it reconstructs exactly.
    """

    method: str
    trajectory: Tensor
    schedule: Schedule
    prompt_embedding: Tensor
    steps: list[StepReport]
    settings: dict = field(default_factory=dict)
    guidance_scale: float = 1.0
    uncond_embeddings: Tensor | None = None
    source_as_uncond: bool = False
    pin_source: bool = False
    sampler: Callable[[], Callable] | None = None  # its own sampling rule (`sampling.Sampler`); None: the schedule's step
    noise_error: float | None = None
    reconstruction_error: float | None = None
    reconstruction_calls: int = 0  # UNet rows of the reconstruction that measured reconstruction_error
    reconstruction_latent: Tensor | None = field(default=None, repr=False)  # that reconstruction, kept for reuse
    source: Tensor | None = field(default=None, repr=False)  # the image inverted, (1, 3, H, W) in [-1, 1]

    @property
    def z_T(self) -> Tensor:
        return self.trajectory[-1:]

    @property
    def z_0(self) -> Tensor:
        return self.trajectory[:1]

    @property
    def network_calls(self) -> int:
        return sum(s.network_calls for s in self.steps)

    @property
    def diagnostic_calls(self) -> int:
        """UNet rows the diagnostics cost on top of the method: residuals and the reconstruction."""
        return sum(s.diagnostic_calls for s in self.steps) + self.reconstruction_calls

    @property
    def total_calls(self) -> int:
        """Every UNet row evaluated to produce this inversion: the method's and the diagnostics'."""
        return self.network_calls + self.diagnostic_calls

    @property
    def gradient_calls(self) -> int:
        return sum(s.gradient_calls for s in self.steps)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    def diagnostics(self) -> dict:
        return {
            "method": self.method,
            "settings": self.settings,
            "num_steps": self.schedule.num_steps,
            "noise_error": self.noise_error,
            "reconstruction_error": self.reconstruction_error,
            "network_calls": self.network_calls,
            "diagnostic_calls": self.diagnostic_calls,
            "total_calls": self.total_calls,
            "gradient_calls": self.gradient_calls,
            "seconds": self.seconds,
            "warnings": [f"step {s.index}: {s.warning}" for s in self.steps if s.warning],
            "steps": [asdict(s) for s in self.steps],
        }


StepSolver = Callable[[Tensor, int], StepResult]


@dataclass(frozen=True)
class FixedPointMap:
    """f(x) = C1 z_{k-1} + C2 out(x, t_k, c) of inversion step k: the map whose fixed point is the
    ideal inversion step (out = eps for diffusion, the velocity for rectified flow; `schedule`)."""

    model: DiffusionModel
    z_prev: Tensor
    embedding: Tensor
    timestep: int
    c1: float
    c2: float
    evaluated: list[tuple[Tensor, Tensor]] | None = field(default=None, compare=False, repr=False)

    def __call__(self, x: Tensor) -> Tensor:
        eps = self.model.eps(x, self.timestep, self.embedding)
        self.remember(x, eps)
        return self.of_eps(eps)

    def remember(self, x: Tensor, eps: Tensor) -> None:
        """With `evaluated` (a list), keep the network's output at x (a copy: a descent moves x in place)."""
        if self.evaluated is not None:
            self.evaluated.append((x.detach().clone(), eps.detach()))

    def eps_at(self, x: Tensor) -> Tensor | None:
        """The network's output at x if this map evaluated it (with `evaluated`), else None."""
        return next((eps for seen, eps in self.evaluated or () if torch.equal(seen, x)), None)

    def of_eps(self, eps: Tensor) -> Tensor:
        return self.c1 * self.z_prev + self.c2 * eps

    @torch.no_grad()
    def with_next_eps(self, x: Tensor, next_timestep: int) -> tuple[Tensor, Tensor]:
        """(f(x), eps(x, next_timestep, c)) from one UNet call on a batch of two rows."""
        eps = self.model.eps(torch.cat([x, x]), [self.timestep, next_timestep], self.embedding)
        return self.of_eps(eps[:1]), eps[1:]


def fixed_point_map(model: DiffusionModel, schedule: Schedule, k: int, z_prev: Tensor,
                    embedding: Tensor, remember: bool = False) -> FixedPointMap:
    """The fixed-point map f of inversion step k (`remember`: keeping its evaluations, `eps_at`)."""
    c1, c2 = schedule.coefficients(k)
    return FixedPointMap(model, z_prev, embedding, schedule.timesteps[k - 1], float(c1), float(c2),
                         [] if remember else None)


@torch.no_grad()
def fixed_point_residual(model, schedule, k: int, z_prev: Tensor, z: Tensor, embedding: Tensor) -> float:
    """Mean squared residual ||f(z) - z||^2 / n of inversion step k."""
    f = fixed_point_map(model, schedule, k, z_prev, embedding)
    return float((f(z) - z).pow(2).mean())


def guess_from_eps(schedule: Schedule, k: int, z_prev: Tensor, eps: Tensor) -> Tensor:
    """Plain inversion step k given the network's output at (z_{k-1}, schedule.guess_timestep(k))."""
    return schedule.inverse_step(k, z_prev, eps)


@torch.no_grad()
def ddim_guess(model: DiffusionModel, schedule: Schedule, k: int, z_prev: Tensor, embedding: Tensor) -> Tensor:
    """Plain inversion step k: DDIM's eps(z_{k-1}, t_k), or rectified flow's explicit Euler step
    with v(z_{k-1}, sigma_{k-1}) (`schedule.guess_timestep`)."""
    return guess_from_eps(schedule, k, z_prev, model.eps(z_prev, schedule.guess_timestep(k), embedding))


def run_inversion(
    model: DiffusionModel,
    z0: Tensor,
    embedding: Tensor,
    schedule: Schedule,
    solve_step: StepSolver,
    *,
    method: str,
    diagnose: bool = True,
    progress: bool = True,
) -> tuple[Tensor, list[StepReport]]:
    """Walk z_0 -> z_T with `solve_step(z_prev, k)`; time each step and, with `diagnose`, measure
    residuals the solver did not (extra forwards, not timed, counted in `diagnostic_calls`)."""
    latents = [z0.float()]
    reports = []
    for k in tqdm(range(1, schedule.num_steps + 1), desc=f"invert ({method})", disable=not progress, leave=False):
        z_prev = latents[-1]
        start = time.perf_counter()
        result = solve_step(z_prev, k)
        seconds = time.perf_counter() - start
        report = StepReport(
            index=k, timestep=schedule.timesteps[k - 1], iterations=result.iterations,
            network_calls=result.network_calls, gradient_calls=result.gradient_calls, seconds=seconds,
            warning=result.warning,
        )
        if diagnose:
            measure_residuals(model, schedule, k, z_prev, embedding, result, report)
        reports.append(report)
        latents.append(result.latent.detach().float())
    return torch.cat(latents), reports


def measure_residuals(model: DiffusionModel, schedule: Schedule, k: int, z_prev: Tensor, embedding: Tensor,
                      result: StepResult, report: StepReport) -> None:
    """Fill the report's residuals, measuring (and counting, one UNet row each) those the solver
    did not: the result's, and the DDIM guess's (two rows: the guess, then its residual)."""
    after = result.residual_after
    if after is None:
        after = fixed_point_residual(model, schedule, k, z_prev, result.latent, embedding)
        report.diagnostic_calls += 1
    before = result.residual_before
    if before is None and result.iterations == 0:
        before = after
    elif before is None:
        guess = ddim_guess(model, schedule, k, z_prev, embedding)
        before = fixed_point_residual(model, schedule, k, z_prev, guess, embedding)
        report.diagnostic_calls += 2
    report.residual_before, report.residual_after = before, after


Solver = Callable[[FixedPointMap, Tensor, object, "Tensor | None"], StepResult]
"""A fixed-point solver: solver(f, z_init, options, f_init) -> StepResult, the best measured iterate
of f from z_init (`f_init`: f(z_init) when the caller has it). `solvers.SOLVERS` and
`aidi.solve_anderson` are solvers."""


@dataclass
class LookAhead:
    """What a fixed-point inversion carries from one step to the next: the next step's plain guess
    when this step kept its own (and the rows it cost), and whether the last step kept its guess."""

    ahead: dict[int, tuple[Tensor, int]] = field(default_factory=dict)
    kept_previous: bool = True


def fixed_point_step(model: DiffusionModel, schedule: Schedule, embedding: Tensor, solver: Solver, options: object,
                     state: LookAhead | None, z_prev: Tensor, k: int) -> StepResult:
    """Inversion step k of a fixed-point method: the plain guess, then `solver(f, guess, options,
    f_guess)` on the step's map f. With a `state` (look-ahead), a step whose predecessor kept its
    guess evaluates f(guess) and the next step's plain noise in one call of two rows. On a rectified
    flow, where the next plain step evaluates v(z_k, t_k) (f's own time), the velocity f evaluated at
    the step's result is reused, whichever iterate the result is: no row for the next guess."""
    last = k == schedule.num_steps
    reuse = state is not None and not last and schedule.guess_timestep(k + 1) == schedule.timesteps[k - 1]
    f = fixed_point_map(model, schedule, k, z_prev, embedding, remember=reuse)
    guess, calls = state.ahead.pop(k, (None, 1)) if state else (None, 1)  # evaluated here, or by the step before
    if guess is None:
        guess = ddim_guess(model, schedule, k, z_prev, embedding)
    f_guess = next_eps = None
    if state is not None and state.kept_previous and not last and not reuse:
        f_guess, next_eps = f.with_next_eps(guess, schedule.guess_timestep(k + 1))
    result = solver(f, guess, options, f_guess)  # counts the evaluations of f, f_guess included
    kept = torch.equal(result.latent, guess)
    if state is not None:
        state.kept_previous = kept
    if next_eps is not None and kept:
        state.ahead[k + 1] = guess_from_eps(schedule, k + 1, guess, next_eps), 1
    elif next_eps is not None:
        calls += 1  # the next step's row, unused
    if reuse and (eps := f.eps_at(result.latent)) is not None:
        state.ahead[k + 1] = guess_from_eps(schedule, k + 1, result.latent, eps), 0
    result.network_calls += calls
    return result


def fixed_point_inversion(
    model: DiffusionModel,
    z0: Tensor,
    embedding: Tensor,
    schedule: Schedule,
    solver: Solver,
    options: object,
    *,
    method: str,
    diagnose: bool = True,
    progress: bool = True,
    look_ahead: bool = True,
    **fields,
) -> Inversion:
    """The inversion SPDInv and AIDI share: per step, the DDIM guess, then `solver(f, guess,
    options, f_guess)` on the step's fixed-point map f (`fixed_point_step`); they differ only in
    the solver. The inversion's settings are the options' fields.

    Most steps keep their guess (it already meets the tolerance), and then z_t is the guess, so
    the next step's DDIM noise eps(z_t, t_{k+1}) can be evaluated in the same UNet call as
    f(guess): one call of two rows instead of two calls in sequence. With `look_ahead`, a step
    whose predecessor kept its guess does that and hands f(guess) to the solver (`f_guess`,
    evaluated without a graph, not to be evaluated again); after a step that iterated, the next
    one leaves f(guess) to its solver. The result is the same either way, up to rounding. On a
    rectified flow the next plain step evaluates v(z_t, t), which f evaluated at the step's result
    (kept guess or iterate): every step but the first costs no row for its guess."""
    step = functools.partial(fixed_point_step, model, schedule, embedding, solver, options,
                             LookAhead() if look_ahead else None)
    trajectory, steps = run_inversion(model, z0, embedding, schedule, step, method=method, diagnose=diagnose,
                                      progress=progress)
    return Inversion(method, trajectory, schedule, embedding, steps, settings=asdict(options),
                     noise_error=noise_error(steps) if diagnose else None, **fields)


def noise_error(steps: list[StepReport]) -> float:
    """Mean over steps of the final fixed-point residual (the paper's D_Noi)."""
    return float(sum(s.residual_after for s in steps) / len(steps))
