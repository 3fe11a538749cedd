"""Presets: the settings of a published script, as data. A preset names, per inversion method,
the inversion options its script uses and, per editing engine, the engine and sampler options;
explicit options always override a preset's. `spdinv edit --help`, the README and
docs/fidelity.md list them; `preset_settings` is what `invert`, `edit`, the command line, the
benchmark and the demo apply.

- `spdinv-official`: leeruibin/SPDInv's run_SPDInv_P2P.py end to end (P2P/SPDInv.py's SPD_loop,
  utils/control_utils.make_controller, P2P/ptp_utils.diffusion_step).
- `pnpinv`: cure-lab/PnPInversion's run_editing_p2p.py (models/p2p_editor.py, null-text as in
  models/p2p/inversion.py), run_editing_masactrl.py and run_editing_pnp.py, per engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, TypeVar

from .errors import SpdinvError
from .schedule import DDIMSettings

# The scripts that build their own `DDIMScheduler(beta_start=0.00085, beta_end=0.012, "scaled_linear",
# clip_sample=False, set_alpha_to_one=False)` (SPDInv's run_SPDInv_P2P.py, PnPInversion's P2PEditor and
# MasaCtrlEditor) get diffusers' default steps_offset 0: timesteps 980, 960, ..., 0 at 50 steps, not SD's
# 981, ..., 1 (run_editing_pnp.py loads SD's scheduler config, whose offset is 1).
SCRIPT_DDIM = DDIMSettings(steps_offset=0)

PNP_NEGATIVE_PROMPT = "ugly, blurry, black, low res, unrealistic"  # run_editing_pnp.py, PNP.run_pnp

_P2P_CONTROLLER = dict(mode="refine", self_replace=0.6, self_replace_scale=0.5, reweight=2.0, blend_threshold=0.3,
                       blend_start=0.2, blend_norm="max", blend_map="attention", guidance_scale=7.5)


@dataclass(frozen=True)
class Preset:
    """`inversion`: method -> its options; `engines`: engine -> engine and sampler options (an
    engine not listed has no script: an error); `empty_source`: engines whose script inverts and
    samples the source under the empty prompt, whatever source prompt is given; `ddim`: the DDIM
    spacing of the script behind each engine (and of `invert(preset=...)`: `inversion_ddim`), where
    it is not the model's own."""

    name: str
    summary: str
    follows: str
    inversion: Mapping[str, Mapping[str, object]]
    engines: Mapping[str, Mapping[str, object]]
    empty_source: tuple[str, ...] = field(default=())
    ddim: Mapping[str, DDIMSettings] = field(default_factory=dict)
    inversion_ddim: DDIMSettings | None = None


PRESETS: dict[str, Preset] = {
    "spdinv-official": Preset(
        "spdinv-official", "the official SPDInv + P2P script end to end",
        "leeruibin/SPDInv run_SPDInv_P2P.py",
        inversion={"spdinv": MappingProxyType(dict(solver="gradient", optimizer="adamw", stop_rule="official", K=25,
                                                   lr=1e-3, delta=5e-6, relative_delta=None))},
        engines={"p2p": MappingProxyType(dict(_P2P_CONTROLLER, cross_replace=0.8, uncond="source", prox=True,
                                              prox_quantile=0.7, prox_timestep=400, prox_pull="both"))},
        ddim=MappingProxyType({"p2p": SCRIPT_DDIM}), inversion_ddim=SCRIPT_DDIM,
    ),
    "pnpinv": Preset(
        "pnpinv", "PIE-Bench's published rows: PnPInversion's run_editing_* settings per engine",
        "cure-lab/PnPInversion run_editing_p2p.py, run_editing_masactrl.py, run_editing_pnp.py",
        inversion={"null_text": MappingProxyType(dict(guidance=7.5, inner_steps=10, lr=1e-2, lr_decay=1e-2,
                                                      early_stop=1e-5, early_stop_growth=2e-5, stop_rule="official"))},
        engines={
            "p2p": MappingProxyType(dict(_P2P_CONTROLLER, cross_replace=0.4, prox=False, uncond="inversion",
                                         source_guidance_scale=7.5)),
            "masactrl": MappingProxyType(dict(start_step=0.08, start_layer=0.625, pin_source=False, guidance_scale=7.5)),
            "pnp": MappingProxyType(dict(feature_injection=0.8, attention_injection=0.5, source_branch_prompt="empty",
                                         negative_prompt=PNP_NEGATIVE_PROMPT, guidance_scale=7.5)),
        },
        empty_source=("masactrl",),
        ddim=MappingProxyType({"p2p": SCRIPT_DDIM, "masactrl": SCRIPT_DDIM}), inversion_ddim=SCRIPT_DDIM,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SpdinvError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def inversion_settings(name: str | None, method: str) -> dict:
    """The inversion options preset `name` sets for `method` (none for a method its script does not run)."""
    return {} if name is None else dict(get_preset(name).inversion.get(method, {}))


def engine_settings(name: str | None, engine: str) -> dict:
    """The engine and sampler options preset `name` sets for `engine`; an engine it has no script for is an error."""
    if name is None:
        return {}
    preset = get_preset(name)
    if engine not in preset.engines:
        raise SpdinvError(f"preset {name!r} has no settings for engine {engine!r} ({preset.follows}); its engines: "
                          f"{', '.join(preset.engines)}")
    return dict(preset.engines[engine])


def empty_source(name: str | None, engine: str) -> bool:
    """Whether preset `name` inverts and samples `engine`'s source branch under the empty prompt."""
    return name is not None and engine in get_preset(name).empty_source


Model = TypeVar("Model")


def preset_model(model: Model, name: str | None, engine: str | None = None) -> Model:
    """`model` (a DiffusionModel) with the DDIM spacing of preset `name`'s script for `engine` (None:
    the script `invert(preset=name)` follows); unchanged without a preset or where the script uses
    the model's own scheduler config."""
    if name is None:
        return model
    preset = get_preset(name)
    settings = preset.inversion_ddim if engine is None else preset.ddim.get(engine)
    if settings is None or getattr(model, "ddim", settings) == settings:
        return model
    return dataclasses.replace(model, ddim=settings)


def describe(name: str) -> str:
    """One line per preset setting, for --help and the README."""
    preset = get_preset(name)
    parts = [f"{method}: " + ", ".join(f"{k}={v}" for k, v in options.items())
             for method, options in preset.inversion.items()]
    parts += [f"{engine}: " + ", ".join(f"{k}={v}" for k, v in options.items())
              + ("; source prompt ''" if engine in preset.empty_source else "")
              + (f"; DDIM steps_offset {preset.ddim[engine].steps_offset}" if engine in preset.ddim else "")
              for engine, options in preset.engines.items()]
    return f"{name} ({preset.follows}): " + "; ".join(parts)
