"""Peak memory of one SDXL-shaped P2P edit at 1024 px against plain sampling (issue 27 B6).

    OMP_NUM_THREADS=1 python benchmarks/attention_memory.py [--size 1024] [--steps 2] [--width 1]
        [--cases plain,none,p2p,p2p-probs] [--json out.json]

`--width 1` (default): SDXL base 1.0's published configs with random weights (UNet 2,567,463,684
parameters, both CLIP text encoders, the SDXL VAE; about 13.4 GiB of float32 weights, so keep one such
run on a machine at a time). `--width` below 1: the UNet's channel widths scaled by it (SDXL's block
layout, heads 10 and 20 kept, so every attention map keeps SDXL's size: a 64x64 self-attention layer at
1024 px holds 10 x 4096^2 scores a row), tiny text encoders and a small VAE: the attention's memory with
little else around it. float32, CPU, one thread. Each case runs in its own process, whole, as a user
runs it; the parent reads that child's peak resident set from wait4 (ru_maxrss), and the child records
its peak after each phase (which phase set the peak) and the resident set once the model is built
(working memory = peak - that):

- plain: sampling the target prompt from noise: prompt encoding, `--steps` DDIM steps at guidance 7.5
  (2 UNet rows a step), no processors, VAE decode;
- none: the edit without processors: VAE encode, DDIM inversion (`--steps`), the edit sampler's
  [source, target] branches (3 rows a step), decode of the target;
- p2p: the same with P2P: LocalBlend (blend words) and self-attention injection at every self-attention
  layer (`self_replace_scale` 1.0), as shipped: fused kernel for the injection, LocalBlend keeping (2, Nq)
  a layer;
- p2p-probs: the same with every injected map materialised (`fused = False`), the pre-fix path.

`--layer` measures one SDXL 64x64 self-attention layer instead (10 heads of 64, the edit's 3 batch rows,
two calls): diffusers' AttnProcessor2_0, spdinv's processor injecting the source's maps by the fused
kernel, and the same through materialised maps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"


def sdxl_unet(channels: tuple[int, int, int], norm_groups: int):
    """SDXL base's UNet config (unet/config.json) at the given block widths."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        cross_attention_dim=2048, norm_num_groups=norm_groups)


def sdxl_vae(channels: tuple[int, ...], layers: int, norm_groups: int):
    """SDXL's VAE config (vae/config.json: factor 8, scaling 0.13025, upcast) at the given widths."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, block_out_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=layers, norm_num_groups=norm_groups, scaling_factor=0.13025,
                         force_upcast=True)


def as_model(tokenizer, text_encoder, text_encoder_2, unet, vae, name: str):
    from diffusers import StableDiffusionXLPipeline

    from spdinv.model import from_pipeline
    from spdinv.testing import tiny_scheduler

    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=tiny_scheduler(), force_zeros_for_empty_prompt=True)
    return from_pipeline(pipe, name=name)


def sdxl_shaped_model(width: float):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from spdinv.world.tokenizer import build_tokenizer, text_config_fields

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = dict(**text_config_fields(tokenizer), intermediate_size=64, num_attention_heads=4, hidden_act="gelu")
    text_encoder = CLIPTextModel(CLIPTextConfig(**config, hidden_size=768, num_hidden_layers=2))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config, hidden_size=1280, num_hidden_layers=10,
                                                                projection_dim=1280))
    channels = tuple(max(40, int(c * width) // 20 * 20) for c in (320, 640, 1280))
    unet = sdxl_unet(channels, 20)
    vae = sdxl_vae((16, 32, 32, 32), 1, 8)
    return as_model(tokenizer, text_encoder, text_encoder_2, unet, vae, "sdxl-shaped")


def published_sdxl_model():
    """SDXL base 1.0's published configs (stabilityai/stable-diffusion-xl-base-1.0: unet, text_encoder,
    text_encoder_2, vae config.json), random weights: UNet 2,567,463,684 parameters, CLIP ViT-L and
    OpenCLIP bigG text encoders (vocabulary 49,408, 77 positions), the SDXL VAE. The prompts are tokenized by
    the shapes world's CLIP BPE tokenizer (ids < 49,408) padded to 77 tokens, as SDXL's are."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from spdinv.world.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 77
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(**ids, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        **ids, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
        projection_dim=1280, hidden_act="gelu"))
    unet = sdxl_unet((320, 640, 1280), 32)
    vae = sdxl_vae((128, 256, 512, 512), 2, 32)
    return as_model(tokenizer, text_encoder, text_encoder_2, unet, vae, "sdxl-base-1.0-random")


def rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() // 1024


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Phases(dict):
    """The peak resident set (MiB) and the seconds since the start after each named phase."""

    def __init__(self) -> None:
        super().__init__()
        self.start = time.perf_counter()
        self.mark("start")

    def mark(self, name: str) -> None:
        self[name] = {"peak_mib": round(peak_mib(), 1), "seconds": round(time.perf_counter() - self.start, 1)}


def drawn_circle(size: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 40))
    return image


def run_case(case: str, size: int, steps: int, width: float, vae_slicing: bool = False) -> dict:
    """One whole run in this process, a user's: `plain` samples the target prompt from noise (prompt
    encoding, `steps` DDIM steps at guidance 7.5, 2 UNet rows a step, decode); the editing cases invert
    the drawn image (VAE encode, DDIM inversion, `steps` steps) and edit it (`run_editor`: 3 UNet rows a
    step, decode). The peak resident set after each phase says which phase set the peak."""
    import torch

    from spdinv.editing import run_editor
    from spdinv.editing.base import NoEditor
    from spdinv.editing.p2p import P2PEditor, P2POptions
    from spdinv.inversion import invert
    from spdinv.sampling import Branch, loop

    torch.set_num_threads(1)
    phases = Phases()
    model = published_sdxl_model() if width >= 1 else sdxl_shaped_model(width)
    if vae_slicing:  # decode a batch one image at a time (the edit decodes its source and target rows)
        model.vae.enable_slicing()
    phases.mark("model built")
    loaded = rss_kib() / 1024
    with torch.no_grad():
        if case == "plain":
            branch = Branch(model.encode_prompt(TARGET), 7.5, model.encode_prompt(""))
            phases.mark("prompts encoded")
            generator = torch.Generator().manual_seed(0)
            z_T = torch.randn((1, 4, size // 8, size // 8), generator=generator)
            latents = loop(model, model.schedule(steps), z_T, [branch])
            phases.mark("sampled")
            model.decode(latents[-1])
            phases.mark("decoded")
        else:
            inversion = invert(model, drawn_circle(size), SOURCE, "ddim", steps, progress=False, diagnose=False)
            phases.mark("inverted")
            editor = NoEditor() if case == "none" else P2PEditor(model, SOURCE, TARGET, P2POptions(
                blend="red blue", self_replace=1.0, self_replace_scale=1.0))
            editor.fused = case != "p2p-probs"
            run_editor(model, inversion, TARGET, editor)
            phases.mark("edited and decoded")
    return {"case": case, "peak_mib": peak_mib(), "loaded_mib": loaded, "working_mib": peak_mib() - loaded,
            "phases": phases, "unet_parameters": sum(p.numel() for p in model.unet.parameters())}


class _InjectingEditor:
    """The attention side of P2P's self-attention injection on one layer (the target reads the source's maps)."""

    def __init__(self, fused: bool) -> None:
        from spdinv.editing.attention import AttentionEditor
        from spdinv.sampling import BatchRows

        class Editor(AttentionEditor):
            def target_reads_source(self, layer) -> bool:
                return True

            def edit_probs(self, layer, probs) -> bool:
                probs[1] = probs[0]
                return True

        self.editor = Editor()
        self.editor.fused = fused
        self.editor.rows = BatchRows.of([1], 2)  # [target uncond, source cond, target cond]: the edit's 3 rows


def run_layer(case: str, tokens: int, repeats: int = 2) -> dict:
    """One SDXL self-attention layer at the 1024-px edit's finest attention resolution (64x64 = 4096
    tokens, 640 channels, 10 heads of 64), the edit's 3 batch rows: diffusers' own processor
    (`plain`), the P2P injection by the fused kernel (`p2p`), or through materialised maps (`p2p-probs`)."""
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from spdinv.editing.attention import AttentionLayer, EditingProcessor

    torch.set_num_threads(1)
    torch.manual_seed(0)
    attention = Attention(query_dim=640, heads=10, dim_head=64).eval()
    if case == "plain":
        attention.set_processor(AttnProcessor2_0())
    else:
        layer = AttentionLayer("attn1", "up", 1, 0, False, 2, 0, 1)
        attention.set_processor(EditingProcessor(layer, _InjectingEditor(fused=case == "p2p").editor))
    hidden = torch.randn(3, tokens, 640)
    before = rss_kib()
    with torch.no_grad():
        for _ in range(repeats):
            out = attention(hidden)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": f"layer-{case}", "peak_mib": peak / 1024, "before_sampling_mib": before / 1024,
            "working_mib": (peak - before) / 1024, "unet_parameters": 0, "checksum": float(out.double().sum())}


def run_child(case: str, args: argparse.Namespace) -> dict:
    """One case in a fresh process; its peak resident set as the kernel counted it (wait4's rusage of that
    child alone, so no earlier case's peak leaks in)."""
    command = [sys.executable, __file__, "--one", case, "--size", str(args.size), "--steps", str(args.steps),
               "--width", str(args.width), *(["--layer"] if args.layer else []),
               *(["--vae-slicing"] if args.vae_slicing else [])]
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(command, stdout=out)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise SystemExit(f"case {case} failed (exit {child.returncode})")
        out.seek(0)
        row = json.loads(out.read().strip().splitlines()[-1])
    row["child_maxrss_mib"] = usage.ru_maxrss / 1024
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--width", type=float, default=1.0, help="1: SDXL base's published configs; "
                        "below 1: an SDXL-layout UNet at that fraction of its widths, tiny text encoders")
    parser.add_argument("--cases", default="plain,none,p2p,p2p-probs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--layer", action="store_true", help="one SDXL 64x64 self-attention layer per case "
                        "(plain, p2p, p2p-probs) instead of a whole edit")
    parser.add_argument("--vae-slicing", action="store_true", help="the VAE decodes a batch one image at a time")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        result = run_layer(args.one, (args.size // 16) ** 2) if args.layer else run_case(
            args.one, args.size, args.steps, args.width, args.vae_slicing)
        print(json.dumps(result))
        return
    if args.layer and args.cases == parser.get_default("cases"):
        args.cases = "plain,p2p,p2p-probs"
    rows = []
    for case in args.cases.split(","):
        rows.append(run_child(case, args))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:  # after every case: a long run's finished cases survive an interrupted one
            with open(args.json, "w") as out:
                json.dump(rows, out, indent=1)
    plain = next((r for r in rows if r["case"].endswith("plain")), rows[0])
    what = (f"one SDXL self-attention layer at {args.size} px ({(args.size // 16) ** 2} tokens, 10 heads of 64, 3 rows)"
            if args.layer else f"{'SDXL base (published configs' if args.width >= 1 else 'SDXL-layout UNet (widths x' + str(args.width)}, "
            f"UNet {rows[0]['unet_parameters']:,} parameters, random weights), {args.size} px, {args.steps} steps")
    print(f"\n{what}, one thread; peak resident set per process\n")
    print("| case | peak MiB | x plain's peak | working MiB (peak - resident once built) | x plain's working |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['peak_mib']:.0f} | {r['peak_mib'] / plain['peak_mib']:.2f} | "
              f"{r['working_mib']:.0f} | {r['working_mib'] / max(plain['working_mib'], 1e-9):.2f} |")


if __name__ == "__main__":
    main()
