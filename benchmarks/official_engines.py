"""spdinv's engines against ports of cure-lab/PnPInversion's editing scripts, on identical weights.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/official_engines.py [--steps 50] [--only pnp masactrl direct]
        [--json out.json]

- pnp: `benchmarks/official_pnp.py` (run_editing_pnp.py, `edit_image_directinversion_PnP`) against
  `edit(..., "pnp", preset="pnpinv")`, on a UNet with SD 1.5's block layout (tiny widths, random
  init, seed 0; `spdinv.testing.sd15_layout_unet`'s layout with the shipped text encoder's width) and
  the shipped model's VAE, tokenizer, text encoder and scheduler: the layers the script names by index
  (up_blocks.1.resnets.1, up_blocks.1.attentions.{1,2}, up_blocks.{2,3}.attentions.{0,1,2}) exist only
  in that layout. From the same DDIM trajectory (spdinv's) and end to end (each its own inversion);
  plus two controls that must differ: spdinv's own prompts (no preset) against the script, and the
  script without injection (pnp_f_t = pnp_attn_t = 0) against the preset.
- masactrl, direct: see `official_masactrl.py` and `official_direct_p2p.py`.

Every comparison: the shipped red-circle example, red -> blue circle, float32, CPU. Reported per
row: max abs and relative (Frobenius) difference of the final target latent, and the PSNR between
the decoded edits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from spdinv.editing import edit
from spdinv.images import psnr
from spdinv.inversion import invert
from spdinv.model import DiffusionModel, load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the ports beside this script
IMAGE = ROOT / "examples" / "red-circle.png"
SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"
BLEND = "circle circle"  # PIE-Bench's blended_word for this pair


def difference(model: DiffusionModel, ours, theirs) -> dict:
    """Final target latents (1, C, h, w): max abs, relative (Frobenius) difference, PSNR of the decodings."""
    ours, theirs = ours.reshape(theirs.shape).float(), theirs.float()
    return {"max_abs": float((ours - theirs).abs().max()), "relative": float((ours - theirs).norm() / theirs.norm()),
            "edit_psnr": float(psnr(model.decode(ours), model.decode(theirs)))}


def sd15_layout_model(base: DiffusionModel, seed: int = 0) -> DiffusionModel:
    """The shipped model's VAE, text encoder, tokenizer and scheduler on a random UNet with SD 1.5's
    block layout (spdinv.testing.sd15_layout_unet's, cross-attention as wide as the text encoder, the
    shipped UNet's sample size so images keep the shipped size)."""
    from diffusers import UNet2DConditionModel

    from spdinv.testing import sd15_layout_unet

    config = {**sd15_layout_unet(seed).config, "cross_attention_dim": base.text_encoder.config.hidden_size,
              "sample_size": base.unet.config.sample_size}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config).eval().requires_grad_(False)
    return dataclasses.replace(base, unet=unet, name=f"sd15-layout-random-{seed}", _prompt_cache={})


def pnp_rows(base: DiffusionModel, image: Image.Image, steps: int) -> dict:
    from official_pnp import PNP, Preprocess, edit_image_directinversion_PnP

    model = sd15_layout_model(base)
    ddim = invert(model, image, SOURCE, "ddim", steps, progress=False, diagnose=False)
    theirs_own = Preprocess(model).extract_latents(steps, image, SOURCE)
    found = {"ddim_trajectory_max_abs": float((torch.stack(theirs_own).squeeze(1) - ddim.trajectory).abs().max())}
    same, _ = edit_image_directinversion_PnP(model, image, SOURCE, TARGET, num_steps=steps,
                                             inverted_x=list(ddim.trajectory.unsqueeze(1)))
    preset = edit(model, None, SOURCE, TARGET, ddim, "pnp", num_steps=steps, preset="pnpinv")
    found["same_trajectory"] = difference(model, preset.latents[-1, 1], same)
    end_to_end, _ = edit_image_directinversion_PnP(model, image, SOURCE, TARGET, num_steps=steps)
    ours_end_to_end = edit(model, image, SOURCE, TARGET, "ddim", "pnp", num_steps=steps, preset="pnpinv")
    found["end_to_end"] = difference(model, ours_end_to_end.latents[-1, 1], end_to_end)
    defaults = edit(model, None, SOURCE, TARGET, ddim, "pnp", num_steps=steps)
    found["spdinv_prompts_vs_script"] = difference(model, defaults.latents[-1, 1], same)
    no_injection = PNP(model, steps).run_pnp(list(ddim.trajectory.unsqueeze(1)), TARGET, pnp_f_t=0, pnp_attn_t=0)
    found["script_without_injection_vs_preset"] = difference(model, preset.latents[-1, 1], no_injection)
    return found


def masactrl_rows(model: DiffusionModel, image: Image.Image, steps: int) -> dict:
    """PnPInversion's ddim+masactrl (its own DDIMScheduler: diffusers' steps_offset 0) against the
    pnpinv preset (which runs its engines on their scripts' spacing)."""
    from official_masactrl import edit_image_ddim_MasaCtrl

    from spdinv.editing.base import round_half_up

    start_step = round_half_up(4 / 50 * steps)  # the script's step 4 of 50
    theirs, trajectory = edit_image_ddim_MasaCtrl(model, image, SOURCE, TARGET, step=start_step, num_ddim_steps=steps)
    ours = edit(model, image, SOURCE, TARGET, "ddim", "masactrl", num_steps=steps, preset="pnpinv")
    found = {"ddim_trajectory_max_abs": float((torch.cat(trajectory) - ours.inversion.trajectory).abs().max()),
             "end_to_end": difference(model, ours.latents[-1, 1], theirs[1:])}
    same, _ = edit_image_ddim_MasaCtrl(model, image, SOURCE, TARGET, step=start_step, num_ddim_steps=steps,
                                       start_code=ours.inversion.z_T)
    found["same_z_T"] = difference(model, ours.latents[-1, 1], same[1:])
    unedited, _ = edit_image_ddim_MasaCtrl(model, image, SOURCE, TARGET, step=steps, num_ddim_steps=steps,
                                           start_code=ours.inversion.z_T)  # control: no step has mutual attention
    found["script_without_mutual_attention_vs_preset"] = difference(model, ours.latents[-1, 1], unedited[1:])
    sd_spacing, _ = edit_image_ddim_MasaCtrl(model, image, SOURCE, TARGET, step=start_step, num_ddim_steps=steps,
                                             steps_offset=1)
    found["script_on_sd_timesteps_vs_script"] = difference(model, sd_spacing[1:], theirs[1:])
    source_prompt = edit(model, image, SOURCE, TARGET, "ddim", "masactrl", num_steps=steps, guidance_scale=7.5)
    found["spdinv_source_prompt_sd_timesteps_vs_script"] = difference(model, source_prompt.latents[-1, 1], theirs[1:])
    return found


def direct_rows(model: DiffusionModel, image: Image.Image, steps: int) -> dict:
    """PnPInversion's directinversion+p2p (its DDIMSchedulerDev: steps_offset 0) against the pnpinv
    preset, and spdinv's defaults."""
    from official_direct_p2p import edit_image_directinversion

    theirs, x_stars = edit_image_directinversion(model, image, SOURCE, TARGET, BLEND.split(), num_ddim_steps=steps)
    ours = edit(model, image, SOURCE, TARGET, "direct", "p2p", num_steps=steps, preset="pnpinv", blend=BLEND)
    found = {"ddim_trajectory_max_abs": float((torch.cat(x_stars) - ours.inversion.trajectory).abs().max()),
             "end_to_end": difference(model, ours.latents[-1, 1], theirs[1:]),
             "source_branch_max_abs": float((ours.latents[-1, 0] - theirs[0]).abs().max()),
             "mask_coverage": float(ours.mask.mean())}
    sd_spacing, _ = edit_image_directinversion(model, image, SOURCE, TARGET, BLEND.split(), num_ddim_steps=steps,
                                               steps_offset=1)
    found["script_on_sd_timesteps_vs_script"] = difference(model, sd_spacing[1:], theirs[1:])
    defaults = edit(model, image, SOURCE, TARGET, "direct", "p2p", num_steps=steps, blend=BLEND)
    found["spdinv_defaults_vs_script"] = difference(model, defaults.latents[-1, 1], theirs[1:])
    return found


ROWS = {"pnp": pnp_rows, "masactrl": masactrl_rows, "direct": direct_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_model()
    image = Image.open(IMAGE).convert("RGB")
    report: dict = {"steps": args.steps, "model": base.name, "image": str(IMAGE.relative_to(ROOT))}
    for name in args.only:
        report[name] = ROWS[name](base, image, args.steps)
        print(json.dumps({name: report[name]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
