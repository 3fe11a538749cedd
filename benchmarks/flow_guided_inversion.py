"""Inverting at the edit's guidance on the flow model: does SPDInv's fixed point of the *guided*
velocity (v_u + w (v_c - v_u), the source prompt against the empty one) keep a drawn object through
a background edit better than the inversion at guidance 1 (issue 25's missed background target)?

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/flow_guided_inversion.py --guidance 7.5,3 [--n 8]

The drawn background cases of `flow_drawn_edits.py` (same seed), 15 steps, SPDInv `anderson` at its
defaults on the guided velocity; both branches then sample at that guidance (the source branch is the
reconstruction). Per case and guidance: the no-op edit (target = source, engine none) and the real
edit under p2p and none, judged as in `flow_drawn_edits.judge` (kept: PSNR of the eroded object).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from flow_drawn_edits import cases, judge  # noqa: E402
from spdinv.editing import edit  # noqa: E402
from spdinv.inversion import image_latent  # noqa: E402
from spdinv.inversion.spdinv import spdinv  # noqa: E402
from spdinv.model import DiffusionModel, load_model  # noqa: E402
from spdinv.world.classifier import load_classifier  # noqa: E402


class GuidedVelocity:
    """The model seen through its guided output: what the inversion's fixed-point map evaluates."""

    def __init__(self, model: DiffusionModel, guidance: float, uncond: torch.Tensor) -> None:
        self.model, self.guidance, self.uncond = model, guidance, uncond

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def eps(self, z, t, embedding, guidance_scale: float = 1.0, uncond_embedding=None):
        return self.model.eps(z, t, embedding, self.guidance, self.uncond)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-world-flow")
    parser.add_argument("--n", type=int, default=8, help="cases of flow_drawn_edits (the background half is run)")
    parser.add_argument("--seed", type=int, default=25)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--guidance", default="7.5,3")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, classifier = load_model(args.model), load_classifier()
    rows = []
    for case in [c for c in cases(args.n, args.seed) if c.kind == "background"]:
        z0 = image_latent(model, case.image)
        embedding = model.encode_prompt(case.source)
        schedule = model.schedule(args.steps, tuple(z0.shape[-2:]))
        for w in (float(x) for x in args.guidance.split(",")):
            guided = GuidedVelocity(model, w, model.encode_prompt(""))
            inversion = dataclasses.replace(spdinv(guided, z0, embedding, schedule, diagnose=False, progress=False),
                                            guidance_scale=w)
            for target, engine in ((case.source, "none"), (case.target, "p2p"), (case.target, "none")):
                result = edit(model, None, case.source, target, inversion, engine, num_steps=args.steps,
                              guidance_scale=w)
                judged = judge(classifier, case, result)
                rows.append({"case": case.name, "guidance": w, "edit": "no-op" if target == case.source else "edit",
                             "engine": engine, "inversion_rows": 2 * inversion.network_calls,
                             "right": judged["right"], "kept_db": judged["kept_db"]})
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
