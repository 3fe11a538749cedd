"""How far apart the same edit lands on two machines: each edit run as is and under a
batch-shape-dependent rounding of 1e-6 relative per UNet call (what another CPU, thread count or a
GPU does), on the embedded model at 50 steps and a drawn image.

    python benchmarks/reproducibility.py
"""

from __future__ import annotations

import numpy as np

from spdinv.editing import edit
from spdinv.images import psnr, to_pil
from spdinv.model import load_model
from spdinv.testing import hand_drawn_square, shape_dependent_unet_rounding

SOURCE = "a large purple square in the centre on a brown background"
TARGET = "a large purple triangle in the centre on a brown background"
RUNS = [("spdinv", "p2p", dict(blend="square triangle")), ("ddim", "p2p", dict(blend="square triangle")),
        ("direct", "masactrl", {}), ("ddim", "pnp", {})]


def main() -> None:
    model, image = load_model(), hand_drawn_square()
    for method, engine, options in RUNS:
        plain = edit(model, image, SOURCE, TARGET, method, engine, **options)
        with shape_dependent_unet_rounding(1e-6):
            rounded = edit(model, image, SOURCE, TARGET, method, engine, **options)
        pixels = [np.asarray(to_pil(r.edited)[0], dtype=np.int16) for r in (plain, rounded)]
        print(f"{method} + {engine}: final latents differ by at most "
              f"{float((plain.latents[-1] - rounded.latents[-1]).abs().max()):.2e}, the PNGs by at most "
              f"{int(np.abs(pixels[0] - pixels[1]).max())}/255 (PSNR {psnr(plain.edited, rounded.edited):.1f} dB); "
              f"reconstructions {psnr(plain.reconstruction, rounded.reconstruction):.1f} dB apart", flush=True)


if __name__ == "__main__":
    main()
