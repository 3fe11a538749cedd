"""Saving an inversion to a folder (safetensors + JSON + PNG) and loading it back."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .errors import require_finite
from .images import Framing, to_pil
from .inversion import METHODS, Inversion, run_method
from .inversion.base import StepReport
from .model import DiffusionModel
from .outputs import staged_output, write_json
from .plots import plot_residuals
from .inversion.reconstruction import reconstruct

_SIDE_INFO = ("uncond_embeddings",)
INVERT_FILES = ("z_T.safetensors", "trajectory.safetensors", "diagnostics.json", "source.png", "reconstruction.png",
                "residuals.png", "config.json")  # what `spdinv invert` writes


def save_inversion(inversion: Inversion, folder: Path) -> None:
    """z_T.safetensors, trajectory.safetensors (with any side information) and diagnostics.json."""
    folder = Path(folder)
    save_file({"z_T": inversion.z_T.contiguous()}, folder / "z_T.safetensors")
    tensors = {
        "trajectory": inversion.trajectory.contiguous(),
        "timesteps": torch.tensor(inversion.schedule.timesteps),
        "prompt_embedding": inversion.prompt_embedding.contiguous().cpu(),
    }
    tensors.update({name: getattr(inversion, name).contiguous().cpu() for name in _SIDE_INFO if getattr(inversion, name) is not None})
    metadata = {"method": inversion.method, "guidance_scale": str(inversion.guidance_scale),
                "source_as_uncond": str(inversion.source_as_uncond),
                "pin_source": str(inversion.pin_source), "settings": json.dumps(inversion.settings)}
    save_file(tensors, folder / "trajectory.safetensors", metadata=metadata)
    write_json(folder / "diagnostics.json", inversion.diagnostics())


def load_inversion(folder: Path, model: DiffusionModel) -> Inversion:
    """Read back what save_inversion wrote (the schedule is rebuilt from the model's)."""
    from safetensors import safe_open

    folder = Path(folder)
    tensors = load_file(folder / "trajectory.safetensors")
    with safe_open(folder / "trajectory.safetensors", "pt") as handle:
        metadata = handle.metadata()
    diagnostics = json.loads((folder / "diagnostics.json").read_text())
    schedule = model.schedule(len(tensors["timesteps"]), tuple(tensors["trajectory"].shape[-2:]))
    if list(schedule.timesteps) != tensors["timesteps"].tolist():
        raise ValueError("saved inversion timesteps do not match the model's scheduler")
    return Inversion(
        method=metadata["method"], trajectory=tensors["trajectory"], schedule=schedule,
        prompt_embedding=tensors["prompt_embedding"].to(model.device),
        steps=[_step_report(s) for s in diagnostics["steps"]], settings=json.loads(metadata["settings"]),
        guidance_scale=float(metadata["guidance_scale"]), source_as_uncond=metadata["source_as_uncond"] == "True",
        pin_source=metadata.get("pin_source", str(metadata["method"] == "direct")) == "True",
        noise_error=diagnostics["noise_error"], reconstruction_error=diagnostics["reconstruction_error"],
        sampler=METHODS[metadata["method"]].saved_sampler(json.loads(metadata["settings"]))
        if metadata["method"] in METHODS else None,
        **{name: tensors.get(name) for name in _SIDE_INFO},
    )


def _step_report(record: dict) -> StepReport:
    """A StepReport from diagnostics.json, where a residual that was not measured is null (NaN in memory)."""
    nan = float("nan")
    return StepReport(**{k: nan if v is None and k.startswith("residual") else v for k, v in record.items()})


def invert_to_folder(model: DiffusionModel, image: Image.Image, prompt: str, method: str, num_steps: int,
                     options: object, out: Path, *, seed: int = 0, progress: bool = True, command=None) -> str:
    """The `spdinv invert` job: invert with the method's options dataclass, reconstruct, and write
    everything to `out` all-or-nothing."""
    inversion = run_method(model, image, prompt, method, num_steps, options, seed=seed, progress=progress,
                           framing=Framing(size=image.size))  # fitted by the caller
    require_finite(inversion.trajectory, f"the {method} inversion")
    recon = reconstruct(model, inversion)  # the one the diagnostics sampled, against the input image
    require_finite(recon.image, f"the {method} reconstruction")
    with staged_output(out) as stage:
        save_inversion(inversion, stage)
        image.save(stage / "source.png")
        to_pil(recon.image)[0].save(stage / "reconstruction.png")
        plot_residuals(inversion.steps, stage / "residuals.png", title=f"{method} on {model.name.split('/')[-1]}: {prompt}")
        diagnostics = inversion.diagnostics() | {"reconstruction_psnr": recon.psnr, "reconstruction_mse": recon.mse,
                                                 "reconstruction_reference": recon.reference}
        write_json(stage / "diagnostics.json", diagnostics)
        write_json(stage / "config.json", {"prompt": prompt, "model": model.name, "device": str(model.device),
                                           "dtype": str(model.dtype).removeprefix("torch."), **inversion.settings,
                                           "command": command})
    calls = inversion.total_calls + recon.network_calls
    return (f"{method}: noise error {inversion.noise_error:.3e}, reconstruction PSNR {recon.psnr:.2f} dB, "
            f"{calls} network calls ({inversion.network_calls} inverting, {calls - inversion.network_calls} "
            f"measuring residuals and reconstructing), {inversion.seconds:.1f} s -> {out}")
