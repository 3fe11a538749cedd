"""SDXL on tiny pipelines built in memory: its conditioning (two text encoders, the pooled
embedding, time ids, zeros for the empty prompt), DDIM sampling equal to StableDiffusionXLPipeline
step for step, inversion and reconstruction, every inversion x engine, and the command line."""

import pytest
import torch
from PIL import Image

from spdinv.conditioning import unpack
from spdinv.editing import edit
from spdinv.inversion import invert
from spdinv.model import from_pipeline
from spdinv.inversion.reconstruction import reconstruction_error
from spdinv.sampling import Branch, loop
from spdinv.testing import DIFFUSION_METHODS, UNET_ENGINES, tiny_xl_pipeline

from test_editing import FAST, untouched


SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"
STEPS = 5


@pytest.fixture(scope="module")
def xl():
    return from_pipeline(tiny_xl_pipeline(), name="tiny-xl")


@pytest.fixture(scope="module")
def image(red_circle):
    return Image.open(red_circle).convert("RGB")


def test_prompt_encoding_is_the_pipelines(xl):
    """Penultimate states of both encoders side by side, the pooled embedding from the second,
    zeros for the empty prompt (force_zeros_for_empty_prompt)."""
    pipe = tiny_xl_pipeline()
    hidden, _, pooled, _ = pipe.encode_prompt(SOURCE, device="cpu", do_classifier_free_guidance=False)
    ours_hidden, ours_pooled = unpack(xl.encode_prompt(SOURCE), xl.pooled_dim)
    torch.testing.assert_close(ours_hidden, hidden, atol=0, rtol=0)
    torch.testing.assert_close(ours_pooled, pooled, atol=0, rtol=0)
    assert hidden.shape[-1] == 32 + 48 and pooled.shape[-1] == 32
    assert not xl.encode_prompt("").any()


@pytest.mark.parametrize("prediction_type, force_zeros", [("epsilon", True), ("v_prediction", True),
                                                           ("epsilon", False)])
def test_ddim_sampling_equals_the_sdxl_pipeline(prediction_type, force_zeros):
    """Same batch layout ([uncond, cond]), same UNet calls, added conditions included: equal to
    1e-5 (float32)."""
    pipe = tiny_xl_pipeline(prediction_type=prediction_type)
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    pipe.set_progress_bar_config(disable=True)
    model = from_pipeline(pipe, name="tiny-xl")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = []
    pipe(SOURCE, latents=noise.clone(), num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent",
         callback_on_step_end=lambda p, i, t, tensors: expected.append(tensors["latents"].clone()) or {})
    branch = Branch(model.encode_prompt(SOURCE), 7.5, model.encode_prompt(""))
    ours = loop(model, model.schedule(STEPS), noise, [branch])
    assert len(expected) == STEPS
    for i, latent in enumerate(expected, start=1):
        torch.testing.assert_close(ours[i], latent, atol=1e-5, rtol=0)


def test_fp16_keeps_the_vae_in_fp32(image):
    """force_upcast: the UNet and encoders run in fp16, the VAE in fp32, as the pipeline does."""
    model = from_pipeline(tiny_xl_pipeline().to(torch.float16), name="tiny-xl-fp16")
    assert model.unet.dtype == torch.float16 and model.vae.dtype == torch.float32
    latent = invert(model, image, SOURCE, "ddim", 2, progress=False, diagnose=False).z_0
    assert latent.dtype == torch.float32 and torch.isfinite(model.decode(latent)).all()


@pytest.fixture(scope="module")
def inversions(xl, image):
    return {m: invert(xl, image, SOURCE, m, STEPS, progress=False, diagnose=False, **FAST.get(m, {}))
            for m in DIFFUSION_METHODS}


def test_invert_then_reconstruct(xl, image):
    """SPDInv's fixed-point search reconstructs the tiny SDXL's z_0 far better than DDIM (measured:
    latent MSE 0.168 at K=20 against DDIM's 1.32; 0.088 at K=100)."""
    ddim = invert(xl, image, SOURCE, "ddim", STEPS, progress=False)
    spd = invert(xl, image, SOURCE, "spdinv", STEPS, progress=False, K=20, lr=1e-2)
    assert spd.reconstruction_error < ddim.reconstruction_error / 5
    assert spd.noise_error < ddim.noise_error


def test_null_text_optimises_sdxls_unconditional_embedding(xl, inversions):
    """Null-text starts from SDXL's all-zero empty prompt and moves it, pooled rows included."""
    uncond = inversions["null_text"].uncond_embeddings
    assert uncond.shape == (STEPS, *xl.encode_prompt("").shape[1:])
    hidden, pooled = unpack(uncond, xl.pooled_dim)
    assert hidden.abs().amax() > 0 and pooled.abs().amax() > 0


@pytest.mark.parametrize("engine", UNET_ENGINES)
@pytest.mark.parametrize("method", DIFFUSION_METHODS)
def test_every_inversion_with_every_engine_on_sdxl(xl, inversions, method, engine):
    before = dict(xl.unet.attn_processors)
    options = dict(blend="red blue") if engine == "p2p" else {}
    result = edit(xl, None, SOURCE, TARGET, inversions[method], engine, **options)
    assert result.edited.shape == (1, 3, xl.image_size, xl.image_size) and torch.isfinite(result.edited).all()
    assert untouched(xl, before)


def test_cli_edit_on_an_sdxl_folder(tmp_path, red_circle):
    from spdinv.cli import main

    folder = tmp_path / "xl"
    tiny_xl_pipeline().save_pretrained(folder)
    out = tmp_path / "out"
    code = main(["edit", str(red_circle), "--source", SOURCE, "--target", TARGET, "--model", str(folder),
                 "--steps", "3", "--inversion", "spdinv", "--engine", "p2p", "--K", "2", "--no-cache", "--quiet",
                 "--out", str(out)])
    assert code == 0 and (out / "config.json").exists()


def test_engine_layers_on_an_sdxl_shaped_unet(xl):
    """SDXL base's topology (narrow channels): no attention at the latent's own resolution, 2 and
    10 transformer layers at 1/2 and 1/4 of it, latent 128: 70 self- and 70 cross-attention layers
    (the count MasaCtrl's SDXL code uses). The SD rules, by relative resolution and depth fraction,
    pick: MasaCtrl the self-attention layers from depth 44 (0.625 x 70), LocalBlend the maps at 1/4
    of the latent (SD: 16 of 64; SDXL: 32 of 128), PnP the decoder block at 1/4."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from spdinv.editing.attention import attention_layers
    from spdinv.editing.masactrl import MasaCtrlEditor, MasaCtrlOptions
    from spdinv.editing.p2p import P2PEditor, P2POptions
    from spdinv.editing.pnp import PnPEditor, PnPOptions

    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(16, 16, 32), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=4, norm_num_groups=8)
    layers = attention_layers(unet)
    assert sum(not l.cross for l in layers) == sum(l.cross for l in layers) == 70
    assert {l.downscale for l in layers} == {2, 4}
    model = SimpleNamespace(unet=unet, device=torch.device("cpu"))
    inversion = SimpleNamespace(schedule=SimpleNamespace(num_steps=50), trajectory=torch.zeros(51, 4, 128, 128),
                                z_T=torch.zeros(1, 4, 128, 128))
    masa = MasaCtrlEditor(MasaCtrlOptions())
    masa.prepare(model, inversion)
    assert [l.depth for l in masa.mutual] == list(range(44, 70))
    p2p = P2PEditor(xl, SOURCE, TARGET, P2POptions(blend="red blue"))
    p2p.prepare(model, inversion)
    assert {l.downscale for l in p2p.blend_layers} == {4} and {l.place for l in p2p.blend_layers} == {"down", "up"}
    pnp = PnPEditor(PnPOptions())
    pnp.prepare(model, inversion)
    assert pnp.resnet is unet.up_blocks[0].resnets[1]
    assert {(l.block, l.attention) for l in pnp.qk_layers} == {(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)}


def test_sdxl_single_file_checkpoint(tmp_path):
    """An SDXL checkpoint in the original layout (OpenCLIP second encoder) is recognised as SDXL,
    loads with --config to the same weights, and is refused with an SD folder as --config."""
    from spdinv.errors import SpdinvError
    from spdinv.model import load_model
    from original_layout import save_original_checkpoint
    from spdinv.testing import tiny_pipeline

    pipe = tiny_xl_pipeline()
    pipe.save_pretrained(tmp_path / "xl")
    tiny_pipeline().save_pretrained(tmp_path / "sd")
    save_original_checkpoint(pipe, tmp_path / "xl.safetensors")
    loaded, reference = load_model(tmp_path / "xl.safetensors", config=tmp_path / "xl"), load_model(tmp_path / "xl")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(SpdinvError, match=r"Stable Diffusion XL checkpoint \(xl_base\).*pass --config"):
        load_model(tmp_path / "xl.safetensors")
    with pytest.raises(SpdinvError, match="is a Stable Diffusion 1.x/2.x folder"):
        load_model(tmp_path / "xl.safetensors", config=tmp_path / "sd")


def test_the_inversion_cache_keeps_sdxl_entries(xl, image, tmp_path):
    """SDXL's prompt embedding packs both encoders' states (and the pooled rows), so its width is
    the UNet's cross-attention width, not the first text encoder's: a stored entry must be a hit."""
    from spdinv.editing.cache import InversionCache

    cache = InversionCache(tmp_path)
    first, hit = cache.invert(xl, image, "a red circle", "ddim", 3)
    again, hit_again = cache.invert(xl, image, "a red circle", "ddim", 3)
    assert (hit, hit_again, cache.dropped) == (False, True, 0)
    assert torch.equal(again.trajectory, first.trajectory.cpu())


@pytest.mark.parametrize("pipeline", ["sd", "sdxl"])
def test_a_non_square_image_keeps_its_shape_through_every_engine(xl, tiny, pipeline, tmp_path):
    """A 48x32 drawing on the tiny models (32 px native, sides multiples of 8): fitted to 40x24 (area
    about 32^2, aspect ratio 5:3, the nearest to 3:2 on that grid), inverted once, edited by every
    engine at 40x24 (LocalBlend's mask at the 10x6 latent); SDXL's added time ids carry that size;
    the cache keys the fitted image and hits on the second call; `Framing(crop=True)` is the old
    centre square and `Framing(size=...)` an exact size."""
    from PIL import ImageDraw

    from spdinv.editing.cache import InversionCache
    from spdinv.images import Framing

    model = xl if pipeline == "sdxl" else tiny
    image = Image.new("RGB", (48, 32), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((16, 8, 32, 24), fill=(220, 40, 40))
    assert model.fit(image)[0].size == (40, 24) and model.size_multiple == 8
    inversion = invert(model, image, SOURCE, "ddim", STEPS, progress=False, diagnose=False)
    assert inversion.z_T.shape[-2:] == (6, 10)
    seen = []
    hook = model.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("added_cond_kwargs")), with_kwargs=True)
    try:
        for engine in UNET_ENGINES:
            options = dict(blend="red blue") if engine == "p2p" else {}
            result = edit(model, None, SOURCE, TARGET, inversion, engine, **options)
            assert result.edited.shape == (1, 3, 24, 40) and torch.isfinite(result.edited).all()
            if engine == "p2p":
                assert result.mask.shape == (1, 1, 6, 10)
    finally:
        hook.remove()
    if pipeline == "sdxl":
        assert all(added["time_ids"][0].tolist() == [24, 40, 0, 0, 24, 40] for added in seen)
    cache = InversionCache(tmp_path / "cache")
    for hit in (False, True):
        assert edit(model, image, SOURCE, TARGET, "ddim", "none", num_steps=2, cache=cache).cache_hit is hit
    cropped = edit(model, image, SOURCE, TARGET, "ddim", "none", num_steps=2, cache=cache, framing=Framing(crop=True))
    assert cropped.cache_hit is False and cropped.edited.shape == (1, 3, 32, 32)
    sized = edit(model, image, SOURCE, TARGET, "ddim", "none", num_steps=2, framing=Framing(size=(48, 32)))
    assert sized.edited.shape == (1, 3, 32, 48)
