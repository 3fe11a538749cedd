"""Peak memory of one SDXL-shaped P2P edit at 1024 px against plain sampling (issue 27 B6).

    OMP_NUM_THREADS=1 python benchmarks/attention_memory.py [--size 1024] [--steps 2] [--width 0.125]
        [--cases plain,none,p2p,p2p-probs] [--json out.json]

The UNet has SDXL base's block layout (no attention at the latent's own resolution; 2 and 10 transformer
layers at 1/2 and 1/4 of it; heads 10 and 20, so every attention map has SDXL's size: a 64x64 self-attention
layer at 1024 px holds 10 x 4096^2 scores a row), its channel widths scaled by `--width` (SDXL's are 320, 640,
1280; full SDXL's 2.6B parameters do not fit this benchmark's CPU budget), with random weights; tiny text
encoders (SDXL's two-encoder conditioning, 2048-wide token states) and a small VAE of SDXL's factor 8.
Each case runs in its own process and reports its peak resident set (ru_maxrss) and the peak above the
resident set just before sampling (the working memory):

- plain: DDIM sampling of the target prompt alone (one branch, guidance 7.5: 2 UNet rows), no processors;
- none: the edit sampler's [source, target] branches (3 rows) with the `none` engine (no processors);
- p2p: P2P with LocalBlend (blend words) and self-attention injection at every self-attention layer
  (`self_replace_scale` 1.0), as shipped: fused kernel for the injection, LocalBlend keeping (2, Nq) a layer;
- p2p-probs: the same with every injected map materialised (`fused = False`), the pre-fix path.

The inversion (DDIM, `--steps`) runs before the measured sampling in every case. `--layer` measures one
SDXL 64x64 self-attention layer instead (10 heads of 64, the edit's 3 batch rows, two calls): diffusers'
AttnProcessor2_0, spdinv's processor injecting the source's maps by the fused kernel, and the same through
materialised maps.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"


def sdxl_shaped_model(width: float):
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from spdinv.model import from_pipeline
    from spdinv.testing import tiny_scheduler
    from spdinv.world.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = dict(vocab_size=len(tokenizer), intermediate_size=64, num_attention_heads=4,
                  max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
    text_encoder = CLIPTextModel(CLIPTextConfig(**config, hidden_size=768, num_hidden_layers=2))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config, hidden_size=1280, num_hidden_layers=10,
                                                                projection_dim=1280))
    channels = tuple(max(40, int(c * width) // 20 * 20) for c in (320, 640, 1280))
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        cross_attention_dim=2048, norm_num_groups=20)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=1024,
                        block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                        scaling_factor=0.13025, force_upcast=True)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=tiny_scheduler(), force_zeros_for_empty_prompt=True)
    return from_pipeline(pipe, name="sdxl-shaped")


def rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() // 1024


def run_case(case: str, size: int, steps: int, width: float) -> dict:
    import torch
    from PIL import Image, ImageDraw

    from spdinv.editing import run_editor
    from spdinv.editing.base import NoEditor
    from spdinv.editing.p2p import P2PEditor, P2POptions
    from spdinv.inversion import invert
    from spdinv.sampling import Branch, loop

    torch.set_num_threads(1)
    model = sdxl_shaped_model(width)
    image = Image.new("RGB", (size, size), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 40))
    inversion = invert(model, image, SOURCE, "ddim", steps, progress=False, diagnose=False)
    before = rss_kib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        if case == "plain":
            branch = Branch(model.encode_prompt(TARGET), 7.5, model.encode_prompt(""))
            loop(model, model.schedule(steps), inversion.z_T, [branch])
        else:
            editor = NoEditor() if case == "none" else P2PEditor(model, SOURCE, TARGET, P2POptions(
                blend="red blue", self_replace=1.0, self_replace_scale=1.0))
            editor.fused = case != "p2p-probs"
            run_editor(model, inversion, TARGET, editor)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": case, "peak_mib": peak / 1024, "before_sampling_mib": before / 1024,
            "peak_before_sampling_mib": peak_before / 1024, "working_mib": (peak - before) / 1024,
            "unet_parameters": sum(p.numel() for p in model.unet.parameters())}


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--cases", default="plain,none,p2p,p2p-probs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--layer", action="store_true", help="one SDXL 64x64 self-attention layer per case "
                        "(plain, p2p, p2p-probs) instead of a whole edit")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        result = run_layer(args.one, (args.size // 16) ** 2) if args.layer else run_case(args.one, args.size, args.steps,
                                                                                       args.width)
        print(json.dumps(result))
        return
    if args.layer and args.cases == parser.get_default("cases"):
        args.cases = "plain,p2p,p2p-probs"
    rows = []
    for case in args.cases.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", case, "--size", str(args.size), "--steps",
                              str(args.steps), "--width", str(args.width), *(["--layer"] if args.layer else [])],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    plain = next((r for r in rows if r["case"].endswith("plain")), rows[0])
    what = (f"one SDXL self-attention layer at {args.size} px ({(args.size // 16) ** 2} tokens, 10 heads of 64, 3 rows)"
            if args.layer else f"SDXL-layout UNet ({rows[0]['unet_parameters'] / 1e6:.0f}M parameters, widths "
            f"x{args.width}), {args.size} px, {args.steps} steps")
    print(f"\n{what}, one thread; peak resident set per process\n")
    print("| case | peak MiB | x plain's peak | working MiB (peak - before sampling) | x plain's working |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['peak_mib']:.0f} | {r['peak_mib'] / plain['peak_mib']:.2f} | "
              f"{r['working_mib']:.0f} | {r['working_mib'] / max(plain['working_mib'], 1e-9):.2f} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
