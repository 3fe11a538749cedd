"""Matplotlib figures of inversion diagnostics."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .inversion.base import StepReport  # noqa: E402


def plot_residuals(steps: list[StepReport], path: Path, title: str = "") -> None:
    """Per-step fixed-point residual before/after (log scale) and iterations used, against timestep."""
    timesteps = [s.timestep for s in steps]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.semilogy(timesteps, [max(s.residual_before, 1e-12) for s in steps], "o-", ms=3, label="before (DDIM guess)")
    top.semilogy(timesteps, [max(s.residual_after, 1e-12) for s in steps], "o-", ms=3, label="after")
    top.set_ylabel("mean squared residual ||f(z_t) - z_t||²")
    top.legend()
    top.grid(alpha=0.3)
    bottom.bar(timesteps, [s.iterations for s in steps], width=max(1, (timesteps[-1] - timesteps[0]) / len(steps) * 0.8))
    bottom.set_ylabel("iterations")
    bottom.set_xlabel("timestep t (inversion runs left to right)")
    bottom.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
