"""UNet forward time per dtype on the CPU, at one thread (the trade-off `--dtype` states).

    OMP_NUM_THREADS=1 python benchmarks/dtype_speed.py [--width 0.5] [--latent 32] [--batch 2] [--repeats 3]
        [--dtypes float32,bfloat16,float16]

Builds a UNet2DConditionModel with Stable Diffusion 1.5's published config (block layout, heads,
cross-attention width 768), its channel widths scaled by `--width` (1.0 = SD 1.5's 860M-parameter UNet),
random weights; times `--repeats` forwards (after one warm-up) of a `--batch` x 4 x latent x latent input
with 77 x 768 text states, per dtype, each in its own process so one cannot warm the next. Prints the
median seconds and the ratio to float32, measured within one run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def sd15_unet(width: float):
    from diffusers import UNet2DConditionModel

    channels = tuple(int(round(c * width / 32)) * 32 for c in (320, 640, 1280, 1280))
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)


def time_one(dtype_name: str, width: float, latent: int, batch: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    unet = sd15_unet(width).to(dtype).eval()
    z = torch.randn(batch, 4, latent, latent, dtype=dtype)
    text = torch.randn(batch, 77, 768, dtype=dtype)
    seconds = []
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.process_time()
            unet(z, 500, encoder_hidden_states=text)
            if i:  # the first is a warm-up
                seconds.append(time.process_time() - start)
    return {"dtype": dtype_name, "parameters": sum(p.numel() for p in unet.parameters()),
            "median_cpu_seconds": statistics.median(seconds)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(time_one(args.one, args.width, args.latent, args.batch, args.repeats)))
        return
    rows = []
    for name in args.dtypes.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", name, "--width", str(args.width), "--latent",
                              str(args.latent), "--batch", str(args.batch), "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = next(r for r in rows if r["dtype"] == "float32")["median_cpu_seconds"]
    print(f"SD 1.5 UNet layout, widths x{args.width} ({rows[0]['parameters'] / 1e6:.0f}M parameters), latent "
          f"{args.latent}x{args.latent}, batch {args.batch}, one thread, median of {args.repeats} forwards (CPU time)\n")
    print("| dtype | seconds per forward | x float32's time |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['median_cpu_seconds']:.2f} | {r['median_cpu_seconds'] / base:.2f} |")


if __name__ == "__main__":
    main()
