"""Solvers for one inversion step's fixed point z = f(z) (SPDInv's `solver` option).

Each is a plain function with one signature,

    solver(f, z_init, options, f_init) -> StepResult

where f is the step's fixed-point map, z_init its DDIM guess, options the SPDInvOptions (K: most
updates; delta / relative_delta: the stop test; lr / optimizer: the gradient solver's) and f_init
f(z_init) when the caller already has it (evaluated without a graph). Every solver returns the
best *measured* iterate, and a non-finite residual ends its search with that iterate
(ResidualTracker). Network calls count evaluations of f (a JVP's primal included); gradient calls
count backward passes and JVPs (on CPU a JVP took ~6 forwards' time, a forward + backward ~2.4).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import ResidualTracker, StepResult

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
# Tikhonov weight of the Anderson least squares, relative to the largest squared column norm.
_REGULARISATION = 1e-10
ANDERSON_WINDOW = 5  # iterates remembered by SPDInv's Anderson solvers (AIDI's default)
KRYLOV_DIMENSION = 3  # GMRES iterations (JVPs) per Newton step
# The hybrid leaves Anderson for a gradient step after this many evaluations in a row without a new best.
STALL_EVALUATIONS = 2

Map = Callable[[Tensor], Tensor]


class StopOptions(Protocol):
    K: int
    delta: float
    relative_delta: float | None


def converged(residual: float, first_residual: float, options: StopOptions) -> bool:
    """The paper's absolute test, and the relative one when asked for."""
    if options.relative_delta is not None and residual >= options.relative_delta * first_residual:
        return False
    return residual < options.delta


def descend(f: Map, z_init: Tensor, options: StopOptions, f_init: Tensor | None,
            update: Callable[[Tensor, Tensor], None]) -> StepResult:
    """Descent on mean((f(z) - z)^2) from z_init: `update(z, loss)` moves the leaf z in place, at
    most K times. `f_init` is not evaluated again unless the first update needs its graph."""
    z = z_init.detach().float().clone().requires_grad_(True)
    tracker, steps = ResidualTracker(best_latent=z_init.detach().float()), 0
    if f_init is not None:
        value = float(F.mse_loss(f_init.float(), z_init.float()))
        if not tracker.observe(value, z, steps) or converged(value, value, options):
            return tracker.result(steps)
    with torch.enable_grad():
        while True:
            loss = F.mse_loss(f(z), z)
            if steps == 0 and f_init is not None:
                tracker.calls += 1  # f(z_init) again, for its graph: measured already
            else:
                value = float(loss.detach())
                stop = not tracker.observe(value, z, steps) or converged(value, tracker.first_residual, options)
                if stop or steps == options.K:
                    break
            update(z, loss)
            steps += 1
    return tracker.result(steps, gradient_calls=steps)


STOP_RULES = ("measured", "official")
DESCENT_SOLVERS = ("gradient", "polyak")  # the solvers the official stop rule applies to


def descend_official(f: Map, z_init: Tensor, options: StopOptions, f_init: Tensor | None,
                     update: Callable[[Tensor, Tensor], None]) -> StepResult:
    """The official SPDInv loop (leeruibin/SPDInv, P2P/SPDInv.py, `SPD_loop`): measure the loss,
    step, then stop once that (pre-step) loss met the test; the result is the iterate after the
    last step, never measured, and every timestep takes at least one step. A non-finite loss
    ends the search before stepping, keeping the iterate it was measured at."""
    z = z_init.detach().float().clone().requires_grad_(True)
    calls, steps, first, warning = int(f_init is not None), 0, None, ""  # f_init: its graph is needed again
    with torch.enable_grad():
        while steps < options.K:
            loss = F.mse_loss(f(z), z)
            calls += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                warning = f"non-finite residual after {steps} updates; kept the last iterate"
                break
            first = value if first is None else first
            update(z, loss)
            steps += 1
            if converged(value, first, options):
                break
    return StepResult(latent=z.detach().clone(), iterations=steps, network_calls=calls, gradient_calls=steps,
                      residual_before=first, residual_after=None, warning=warning)


def descent(f: Map, z_init: Tensor, options, f_init: Tensor | None,
            update: Callable[[Tensor, Tensor], None]) -> StepResult:
    """`descend` (the best measured iterate), or `descend_official` under stop_rule 'official'."""
    official = getattr(options, "stop_rule", "measured") == "official"
    return (descend_official if official else descend)(f, z_init, options, f_init, update)


def gradient(f: Map, z_init: Tensor, options, f_init: Tensor | None = None) -> StepResult:
    """Gradient descent with a torch optimiser (the paper's: AdamW, lr 1e-3, K 25)."""
    optimizers: list[torch.optim.Optimizer] = []  # one, made for the leaf descend() creates

    def update(z: Tensor, loss: Tensor) -> None:
        if not optimizers:
            optimizers.append(OPTIMIZERS[options.optimizer]([z], lr=options.lr))
        optimizer = optimizers[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return descent(f, z_init, options, f_init, update)


def polyak_step(z: Tensor, loss: Tensor) -> Tensor:
    """The gradient step of length 2L/||grad L||^2 on L = mean((f(z) - z)^2): it zeroes the
    linearised residual along the gradient, and is exactly z <- f(z) where f's Jacobian vanishes."""
    (grad,) = torch.autograd.grad(loss, z)
    return -(2 * loss.detach() / grad.pow(2).sum().clamp_min(torch.finfo(grad.dtype).tiny)) * grad


def polyak(f: Map, z_init: Tensor, options, f_init: Tensor | None = None) -> StepResult:
    """Gradient descent with the residual-scaled (Polyak) step 2L/||grad L||^2."""

    def update(z: Tensor, loss: Tensor) -> None:
        step = polyak_step(z, loss)
        with torch.no_grad():
            z += step

    return descent(f, z_init, options, f_init, update)


def anderson_update(iterates: list[Tensor], residuals: list[Tensor], damping: float) -> Tensor:
    """Next iterate of type-II Anderson mixing (Walker & Ni 2011) from the remembered iterates x_j
    and residuals g_j = f(x_j) - x_j (oldest first, flattened): with dX, dG the column differences,
    gamma = argmin ||g - dG gamma||, x_new = x + beta g - (dX + beta dG) gamma.
    A single iterate (or a failed solve) gives the damped step x + beta g."""
    x, g = iterates[-1], residuals[-1]
    damped = x + damping * g
    if len(iterates) < 2:
        return damped
    d_x = torch.stack([b - a for a, b in zip(iterates, iterates[1:])], dim=1).double()
    d_g = torch.stack([b - a for a, b in zip(residuals, residuals[1:])], dim=1).double()
    gram = d_g.T @ d_g
    ridge = _REGULARISATION * float(gram.diagonal().max()) + 1e-300
    gamma = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device),
                               d_g.T @ g.double())
    if not torch.isfinite(gamma).all():
        return damped
    return damped - ((d_x + damping * d_g) @ gamma).to(x.dtype)


@torch.no_grad()
def anderson_mixing(f: Map, z_init: Tensor, f_init: Tensor | None, *, updates: int, window: int, damping: float,
                    done: Callable[[float, float], bool], safeguard: bool = False,
                    earlier: tuple[Tensor, Tensor] | None = None) -> StepResult:
    """Iterate z <- f(z) from z_init with Anderson acceleration, at most `updates` times, until
    `done(residual, first_residual)`; `earlier`, an iterate before z_init and its residual, starts
    the history (so the first update already mixes). With `safeguard`, STALL_EVALUATIONS residuals in a row above
    the best (the mixing grows or stalls) are answered by a Polyak gradient step from the best
    iterate, whose residual then joins the mixing's history (the paper's reason to prefer
    gradient descent, kept as a fallback)."""
    shape = z_init.shape
    z = z_init.detach().float()
    iterates: deque[Tensor] = deque(maxlen=window)
    residuals: deque[Tensor] = deque(maxlen=window)
    if earlier is not None and window > 1:
        iterates.append(earlier[0].detach().float().flatten())
        residuals.append(earlier[1].detach().float().flatten())
    tracker, steps, backwards, stalled = ResidualTracker(best_latent=z), 0, 0, 0
    while True:
        g = (f_init.float() if steps == 0 and f_init is not None else f(z)) - z
        value = float(g.pow(2).mean())
        if not tracker.observe(value, z, steps) or done(value, tracker.first_residual) or steps == updates:
            break
        stalled = 0 if value <= tracker.best_residual else stalled + 1
        if safeguard and stalled >= STALL_EVALUATIONS:
            with torch.enable_grad():
                x = tracker.best_latent.clone().requires_grad_(True)
                z = (x + polyak_step(x, F.mse_loss(f(x), x))).detach()
            tracker.calls, backwards = tracker.calls + 1, backwards + 1
            stalled = 0
        else:
            iterates.append(z.flatten())
            residuals.append(g.flatten())
            z = anderson_update(list(iterates), list(residuals), damping).view(shape)
        steps += 1
    return tracker.result(steps, gradient_calls=backwards)


def ddim_iterate(f: Map, z_init: Tensor) -> tuple[Tensor, Tensor] | None:
    """The DDIM guess is one fixed-point iteration from the step's previous latent, z_init =
    f(z_prev), so (z_prev, z_init - z_prev) is an iterate and its residual, known at no cost."""
    z_prev = getattr(f, "z_prev", None)
    return None if z_prev is None else (z_prev, z_init.float() - z_prev.float())


def anderson(f: Map, z_init: Tensor, options, f_init: Tensor | None = None) -> StepResult:
    """Anderson-accelerated fixed-point iteration, its history started with the DDIM step."""
    return anderson_mixing(f, z_init, f_init, updates=options.K, window=ANDERSON_WINDOW, damping=1.0,
                           done=lambda value, first: converged(value, first, options), earlier=ddim_iterate(f, z_init))


def hybrid(f: Map, z_init: Tensor, options, f_init: Tensor | None = None) -> StepResult:
    """Safeguarded Anderson: a Polyak gradient step from the best iterate when it stalls or diverges."""
    return anderson_mixing(f, z_init, f_init, updates=options.K, window=ANDERSON_WINDOW, damping=1.0,
                           done=lambda value, first: converged(value, first, options), safeguard=True,
                           earlier=ddim_iterate(f, z_init))


def jvp(f: Map, z: Tensor, v: Tensor) -> Tensor:
    """J_f(z) v by forward-mode differentiation through the frozen UNet."""
    # The fused attention kernels have no forward-mode derivative; the math one is plain torch ops.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(f, (z,), (v,))[1]


def gmres(apply: Map, b: Tensor, iterations: int) -> tuple[Tensor, int]:
    """`iterations` steps of GMRES from 0 on A x = b (Arnoldi basis, least squares on the
    Hessenberg matrix); returns x and the number of products with A it took."""
    beta = b.norm()
    basis = [b / beta]
    hessenberg = torch.zeros(iterations + 1, iterations, dtype=torch.float64)
    used = 0
    for j in range(iterations):
        w = apply(basis[j])
        used += 1
        for i in range(j + 1):
            hessenberg[i, j] = (w * basis[i]).sum().double()
            w = w - hessenberg[i, j].to(w.dtype) * basis[i]
        hessenberg[j + 1, j] = w.norm().double()
        if hessenberg[j + 1, j] <= 1e-10 * beta:  # the Krylov space holds the solution
            break
        basis.append(w / hessenberg[j + 1, j].to(w.dtype))
    rhs = torch.zeros(used + 1, dtype=torch.float64)
    rhs[0] = beta.double()
    y = torch.linalg.lstsq(hessenberg[: used + 1, :used], rhs.unsqueeze(1)).solution.squeeze(1)
    return sum(float(c) * v for c, v in zip(y, basis)), used


@torch.no_grad()
def newton_krylov(f: Map, z_init: Tensor, options, f_init: Tensor | None = None) -> StepResult:
    """Jacobian-free Newton-Krylov: GMRES on (I - J_f) d = f(z) - z with JVPs, then z <- z + d."""
    z = z_init.detach().float()
    tracker, steps, jvps = ResidualTracker(best_latent=z), 0, 0
    while True:
        g = (f_init.float() if steps == 0 and f_init is not None else f(z)) - z
        value = float(g.pow(2).mean())
        if not tracker.observe(value, z, steps) or converged(value, tracker.first_residual, options) \
                or steps == options.K:
            break
        point = z
        d, used = gmres(lambda v: v - jvp(f, point, v), g, KRYLOV_DIMENSION)
        tracker.calls, jvps = tracker.calls + used, jvps + used  # each JVP also runs the forward
        z = z + d
        steps += 1
    return tracker.result(steps, gradient_calls=jvps)


SOLVERS: dict[str, Callable[..., StepResult]] = {
    "gradient": gradient, "anderson": anderson, "hybrid": hybrid, "polyak": polyak, "newton_krylov": newton_krylov,
}
# One line each for `--solver`'s help (SPDInvOptions.solver), generated from here; tests/test_readme.py
# checks that README.md names every solver.
SOLVER_SUMMARIES: dict[str, str] = {
    "gradient": "the paper's: --optimizer steps through the UNet",
    "anderson": "Anderson-accelerated iteration, forwards only",
    "hybrid": "Anderson with gradient fallback",
    "polyak": "residual-scaled gradient steps",
    "newton_krylov": "GMRES with UNet JVPs",
}
if SOLVER_SUMMARIES.keys() != SOLVERS.keys():  # a new solver needs its line
    raise ImportError(f"SOLVER_SUMMARIES {sorted(SOLVER_SUMMARIES)} != SOLVERS {sorted(SOLVERS)}")


def solver_help(default: str) -> str:
    """`--solver`'s help: every solver of SOLVERS with its summary, the default first."""
    names = [default, *(name for name in SOLVERS if name != default)]
    return "fixed-point solver: " + ", ".join(f"{name} ({SOLVER_SUMMARIES[name]})" for name in names)
