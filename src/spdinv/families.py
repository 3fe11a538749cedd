"""Model families: which diffusers pipelines spdinv can invert and edit, and for every other one
a name to refuse it by. A family also says what its denoiser is (a UNet or a transformer), what
it is trained for (denoising diffusion: eps / v / x0 on a DDPM schedule, stepped by DDIM; or
rectified flow: a velocity, stepped by Euler) and how it is guided (classifier-free guidance with
unconditional rows, or FLUX.1's distilled guidance, an input of the network)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SpdinvError


@dataclass(frozen=True)
class ModelFamily:
    name: str
    pipelines: tuple[str, ...]  # model_index.json _class_name prefixes
    denoiser: str  # "unet" or "transformer"
    objective: str  # "diffusion" (eps, v or x0 on a DDPM noise schedule) or "flow" (rectified-flow velocity)
    supported: bool
    classifier_free: bool = True  # guidance by unconditional rows; False: distilled (an input) or none

    def matches(self, class_name: str) -> bool:
        return any(class_name.startswith(prefix) for prefix in self.pipelines)


SD = ModelFamily("Stable Diffusion 1.x/2.x", ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
                 "unet", "diffusion", True)
SDXL = ModelFamily("Stable Diffusion XL", ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
                   "unet", "diffusion", True)
SD3 = ModelFamily("Stable Diffusion 3 / 3.5 (rectified-flow transformer)",
                  ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"), "transformer", "flow", True)
FLUX = ModelFamily("FLUX.1 (rectified-flow transformer)", ("FluxPipeline", "FluxImg2ImgPipeline"), "transformer",
                   "flow", True, classifier_free=False)

# Most specific first: the first family whose prefix matches the class name is the model's.
FAMILIES: tuple[ModelFamily, ...] = (
    SD3,
    FLUX,
    ModelFamily("Stable Diffusion 3 inpainting / ControlNet / PAG (rectified-flow transformer)", ("StableDiffusion3",),
                "transformer", "flow", False),
    ModelFamily("FLUX.1 fill / control / Kontext / inpainting (rectified-flow transformer)", ("Flux",), "transformer",
                "flow", False),
    ModelFamily("AuraFlow / Lumina / Sana / CogView (flow-matching transformer)",
                ("AuraFlow", "Lumina", "Sana", "CogView", "HiDream", "QwenImage", "Chroma"), "transformer", "flow", False),
    ModelFamily("PixArt / Hunyuan-DiT (diffusion transformer)", ("PixArt", "HunyuanDiT"), "transformer", "diffusion",
                False),
    ModelFamily("Kandinsky", ("Kandinsky",), "unet", "diffusion", False),
    ModelFamily("DeepFloyd IF (pixel-space cascade)", ("IF",), "unet", "diffusion", False),
    ModelFamily("Stable Cascade / Wuerstchen", ("StableCascade", "Wuerstchen"), "unet", "diffusion", False),
    ModelFamily("Stable Diffusion inpainting / depth / upscaling",
                ("StableDiffusionInpaint", "StableDiffusionXLInpaint", "StableDiffusionDepth2Img",
                 "StableDiffusionUpscale", "StableDiffusionLatentUpscale"), "unet", "diffusion", False),
    ModelFamily("Latent Consistency Model", ("LatentConsistencyModel",), "unet", "diffusion", False),
    SDXL,
    SD,
)

SUPPORTED_FAMILIES: tuple[ModelFamily, ...] = (SD, SDXL, SD3, FLUX)
SUPPORTED = ", ".join(f"{family.name} ({family.pipelines[0]})" for family in SUPPORTED_FAMILIES)


def family_of(class_name: str | None, source: str = "the model") -> ModelFamily:
    """The supported family of a pipeline class name; anything else is refused in one line."""
    family = next((f for f in FAMILIES if class_name and f.matches(class_name)), None)
    if family is None:
        raise SpdinvError(f"{source} is a {class_name or 'unknown'} pipeline, which spdinv does not support; "
                          f"supported: {SUPPORTED}")
    if not family.supported:
        raise SpdinvError(f"{source} is a {family.name} model ({class_name}), which spdinv does not support; "
                          f"supported: {SUPPORTED}")
    return family
