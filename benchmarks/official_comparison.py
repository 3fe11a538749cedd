"""spdinv's `spdinv-official` preset against a minimal port of the official SPDInv inversion loop,
on identical weights (the shipped shapes-world model) and the shipped example, plus the measured
effect of each switch docs/fidelity.md lists.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/official_comparison.py [--steps 50] [--json out.json]

The port follows leeruibin/SPDInv's P2P/SPDInv.py (`SourcePromptDisentanglementInversion.SPD_loop`
and `next_step`) line for line, on the script's timesteps (`script_scheduler`: its DDIMSchedulerDev,
steps_offset 0; the preset runs on the same spacing) and the model's betas (the script's), with the
UNet called through `DiffusionModel.eps` (fp32, CPU): per timestep the DDIM guess, a fresh AdamW (lr 1e-3), up to K = 25
rounds of loss = mse(z, next_step(eps(z))), backward, step, then `if loss < delta: break`, and the
post-step latent kept. Reported: max |z_T(official port) - z_T(preset)|, the iteration counts of
both, and the edit PSNR between P2P edits (the preset's engine settings) from the two trajectories.
Effects (edit PSNR between two settings, the final target latent's max abs / relative difference):
the stop rules, ProxEdit's pull-back rows, LocalBlend's stored maps (edited, the official, vs the
unedited ones spdinv read before issue 28) at thresholds 0.3 and 0.85, the preset against the
defaults, and PnP with PnPInversion's two prompts against spdinv's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import sys

import torch
import torch.nn.functional as F
from PIL import Image

from spdinv.editing import edit, run_editor
from spdinv.editing.p2p import P2PEditor, P2POptions
from spdinv.editing.sampler import SamplerOptions
from spdinv.images import psnr
from spdinv.inversion import image_latent, invert
from spdinv.model import load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # official_p2p.py beside this script
IMAGE = ROOT / "examples" / "red-circle.png"
SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"
BLEND = "circle circle"


def next_step(model, eps, timestep: int, sample, num_steps: int):
    """The official `next_step`: one DDIM inversion step from the timestep before `timestep`."""
    scheduler = model.scheduler
    previous = min(timestep - scheduler.config.num_train_timesteps // num_steps, 999)
    alpha_prod_t = scheduler.alphas_cumprod[previous] if previous >= 0 else scheduler.final_alpha_cumprod
    alpha_prod_t_next = scheduler.alphas_cumprod[timestep]
    beta_prod_t = 1 - alpha_prod_t
    next_original_sample = (sample - beta_prod_t ** 0.5 * eps) / alpha_prod_t ** 0.5
    return alpha_prod_t_next ** 0.5 * next_original_sample + (1 - alpha_prod_t_next) ** 0.5 * eps


def script_scheduler():
    """run_SPDInv_P2P.py's `DDIMSchedulerDev(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False)`: the shipped model's betas, diffusers' default steps_offset 0
    (timesteps 980 ... 0). Its `step` is not used here: the ports step with the official formulas."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False)


def official_spd_loop(model, latent, cond, timesteps: list[int], K: int = 25, lr: float = 1e-3,
                      delta: float = 5e-6) -> tuple[torch.Tensor, list[int]]:
    """The official SPD_loop: (trajectory z_0 ... z_T, rounds per timestep)."""
    all_latent, rounds = [latent], []
    latent = latent.clone().detach()
    for t in timesteps:
        with torch.no_grad():
            noise_pred = model.eps(latent, t, cond)
        latent_ztm1 = latent.clone().detach()
        latent = next_step(model, noise_pred, t, latent_ztm1, len(timesteps))
        optimal_latent = latent.clone().detach().requires_grad_(True)
        optimizer = torch.optim.AdamW([optimal_latent], lr=lr)
        taken = 0
        for _ in range(K):
            with torch.enable_grad():
                optimizer.zero_grad()
                pred_latent = next_step(model, model.eps(optimal_latent, t, cond), t, latent_ztm1, len(timesteps))
                loss = F.mse_loss(optimal_latent, pred_latent)
                loss.backward()
                optimizer.step()
                taken += 1
                if loss < delta:
                    break
        latent = optimal_latent.clone().detach()
        all_latent.append(latent)
        rounds.append(taken)
    return torch.cat(all_latent), rounds


class UneditedStore(P2PEditor):
    """spdinv's LocalBlend before issue 28: the maps stored before the edit (its float32 path kept
    the edited maps at the first step only, by aliasing; this is the float16 path, unedited at every step)."""

    def edit_probs(self, layer, probs):
        if layer.name in self.blend_names:
            self._keep_blend_maps(layer, probs)  # summed right away: the maps before the edit below
        return self._replace_maps(layer, probs)


def difference(a, b) -> dict:
    """Max abs and relative (Frobenius) difference of two final target latents."""
    return {"max_abs": float((a - b).abs().max()), "relative": float((a - b).norm() / b.norm())}


def edit_psnr(a, b) -> float:
    return float(psnr(a.edited, b.edited))


def stop_rules(model, image, steps: int) -> dict:
    rules = {rule: invert(model, image, SOURCE, "spdinv", steps, progress=False, solver="gradient", stop_rule=rule)
             for rule in ("measured", "official")}
    return {"z_T": difference(rules["measured"].z_T, rules["official"].z_T),
            **{f"{rule}_iterations": sum(s.iterations for s in inv.steps) for rule, inv in rules.items()},
            **{f"{rule}_network_calls": inv.network_calls for rule, inv in rules.items()}}


def local_blend_store(model, inversion, threshold: float) -> dict:
    options = P2POptions(**{**_preset_engine_fields(), "blend": BLEND, "blend_threshold": threshold})
    sampler = SamplerOptions(uncond="source")
    results = {}
    for name, cls in (("edited", P2PEditor), ("unedited", UneditedStore)):
        editor = cls(model, SOURCE, TARGET, options)
        images, latents, _, _ = run_editor(model, inversion, TARGET, editor, sampler)
        results[name] = (images[1:], latents[-1, 1], float(editor.mask.mean()))
    (edited, z_edited, cover_edited), (unedited, z_unedited, cover_unedited) = results["edited"], results["unedited"]
    return {"psnr": float(psnr(edited, unedited)), "latent": difference(z_unedited, z_edited),
            "mask_coverage_edited": cover_edited, "mask_coverage_unedited": cover_unedited}


def _preset_engine_fields() -> dict:
    from spdinv.presets import PRESETS

    names = {f.name for f in dataclasses.fields(P2POptions)}
    return {k: v for k, v in PRESETS["spdinv-official"].engines["p2p"].items() if k in names}


def official_edits(model, ours, trajectory, timesteps: list[int], steps: int) -> dict:
    """The official P2P edit (benchmarks/official_p2p.py) against the preset's, at LocalBlend
    threshold 0.3 and 0.85: end to end (each from its own inversion) and from the same trajectory."""
    from official_p2p import official_p2p

    found = {}
    for threshold in (0.3, 0.85):
        preset = edit(model, None, SOURCE, TARGET, ours, "p2p", num_steps=steps, preset="spdinv-official",
                      blend=BLEND, blend_threshold=threshold)
        words = tuple((w,) for w in BLEND.split())
        for name, x_stars in (("end_to_end", trajectory), ("same_trajectory", ours.trajectory)):
            latents = official_p2p(model, x_stars, [SOURCE, TARGET], timesteps, blend=words, threshold=threshold)
            edited = model.decode(latents[1:])
            found[f"{name}@{threshold}"] = {"edit_psnr": float(psnr(preset.edited, edited)),
                                            "latent": difference(preset.latents[-1, 1], latents[1])}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model()
    image = Image.open(IMAGE).convert("RGB")
    report: dict = {"steps": args.steps, "model": model.name, "image": str(IMAGE.relative_to(ROOT))}

    ours = invert(model, image, SOURCE, "spdinv", args.steps, progress=False, preset="spdinv-official")
    cond = model.encode_prompt(SOURCE)
    scheduler = script_scheduler()
    scheduler.set_timesteps(args.steps)  # diffusers' order (noisiest first); the official loop walks it backwards
    timesteps = [int(scheduler.timesteps[len(scheduler.timesteps) - i - 1]) for i in range(args.steps)]
    trajectory, rounds = official_spd_loop(model, image_latent(model, image).float(), cond, timesteps)
    report["official_port"] = {"z_T": difference(ours.z_T, trajectory[-1:]),
                               "trajectory_max_abs": float((ours.trajectory - trajectory).abs().max()),
                               "official_rounds": sum(rounds), "preset_iterations": sum(s.iterations for s in ours.steps),
                               "rounds_equal": rounds == [s.iterations for s in ours.steps]}
    print(json.dumps(report["official_port"]), flush=True)
    theirs = dataclasses.replace(ours, trajectory=trajectory)
    preset = edit(model, None, SOURCE, TARGET, ours, "p2p", num_steps=args.steps, preset="spdinv-official", blend=BLEND)
    from_port = edit(model, None, SOURCE, TARGET, theirs, "p2p", num_steps=args.steps, preset="spdinv-official",
                     blend=BLEND)
    report["official_port"]["edit_psnr"] = edit_psnr(preset, from_port)
    report["official_port"]["edit_latent"] = difference(preset.latents[-1, 1], from_port.latents[-1, 1])

    report["official_p2p"] = official_edits(model, ours, trajectory, [int(t) for t in scheduler.timesteps], args.steps)
    print(json.dumps(report["official_p2p"]), flush=True)
    report["stop_rules"] = stop_rules(model, image, args.steps)
    target_pull = edit(model, None, SOURCE, TARGET, ours, "p2p", num_steps=args.steps, preset="spdinv-official",
                       blend=BLEND, prox_pull="target")
    report["prox_pull_target_vs_both"] = {"psnr": edit_psnr(target_pull, preset),
                                          "latent": difference(target_pull.latents[-1, 1], preset.latents[-1, 1])}
    defaults = edit(model, image, SOURCE, TARGET, "spdinv", "p2p", num_steps=args.steps, blend=BLEND)
    report["defaults_vs_preset"] = {"psnr": edit_psnr(defaults, preset),
                                    "latent": difference(defaults.latents[-1, 1], preset.latents[-1, 1])}
    report["local_blend_store"] = {str(th): local_blend_store(model, ours, th) for th in (0.3, 0.85)}
    ddim = invert(model, image, SOURCE, "ddim", args.steps, progress=False)
    pnp_official = edit(model, None, SOURCE, TARGET, ddim, "pnp", num_steps=args.steps, preset="pnpinv")
    pnp_ours = edit(model, None, SOURCE, TARGET, ddim, "pnp", num_steps=args.steps)
    report["pnp_prompts"] = {"psnr": edit_psnr(pnp_ours, pnp_official),
                             "latent": difference(pnp_ours.latents[-1, 1], pnp_official.latents[-1, 1])}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
