"""ELITE's global mapper on tiny random instances with the official checkpoint's key layout."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from spdinv.editing import edit
from spdinv.elite import encode_concept, load_global_mapper, projections_installed
from spdinv.errors import SpdinvError
from spdinv.testing import tiny_pipeline

INPUT, HIDDEN = 8, 12


def official_state_dict(unet, output_dim: int) -> dict[str, torch.Tensor]:
    """The layout ELITE's training script saves, written out independently of spdinv.elite:
    mapping_{i} / mapping_patch_{i} Sequentials (weights at 0, 1, 3, 4, 6) and bias-free to_k /
    to_v per attn2 module, named by its path with dots as underscores."""
    shapes = {"0": (HIDDEN, INPUT), "1": (HIDDEN,), "3": (HIDDEN, HIDDEN), "4": (HIDDEN,), "6": (output_dim, HIDDEN)}
    state = {}
    for i in range(5):
        for prefix in (f"mapping_{i}", f"mapping_patch_{i}"):
            for index, shape in shapes.items():
                state[f"{prefix}.{index}.weight"] = torch.randn(shape)
                state[f"{prefix}.{index}.bias"] = torch.randn(shape[0])
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            state[f"{name.replace('.', '_')}_to_k.weight"] = torch.randn(module.to_k.weight.shape)
            state[f"{name.replace('.', '_')}_to_v.weight"] = torch.randn(module.to_v.weight.shape)
    return state


@pytest.fixture(scope="module")
def unet():
    return tiny_pipeline().unet


@pytest.fixture(scope="module")
def checkpoint(unet, tmp_path_factory):
    state = official_state_dict(unet, unet.config.cross_attention_dim)
    path = tmp_path_factory.mktemp("elite") / "global_mapper.pt"
    torch.save(state, path)
    return path, state


def test_the_official_layout_loads_strictly_and_maps_like_elite(unet, checkpoint):
    path, state = checkpoint
    mapper = load_global_mapper(path, unet, input_dim=INPUT, hidden=HIDDEN)
    assert set(mapper.state_dict()) == set(state)
    assert any(k.endswith("attn2_to_k.weight") for k in state)
    features = [torch.randn(2, 5, INPUT) for _ in range(5)]
    words = mapper(features)
    assert words.shape == (2, 5, unet.config.cross_attention_dim)
    # word 0 by hand: CLS MLP + mean over patches of the patch MLP (LeakyReLU slope 0.01)
    def mlp(prefix, x):
        for index in ("0", "3"):
            linear = x @ state[f"{prefix}.{index}.weight"].T + state[f"{prefix}.{index}.bias"]
            norm = f"{prefix}.{int(index) + 1}"
            x = torch.nn.functional.layer_norm(linear, (HIDDEN,), state[f"{norm}.weight"], state[f"{norm}.bias"])
            x = torch.nn.functional.leaky_relu(x)
        return x @ state[f"{prefix}.6.weight"].T + state[f"{prefix}.6.bias"]
    expected = mlp("mapping_0", features[0][:, :1]) + mlp("mapping_patch_0", features[0][:, 1:]).mean(1, keepdim=True)
    assert torch.allclose(words[:, :1], expected, atol=1e-5)
    k, v = mapper.projections(next(n for n, _ in unet.named_modules() if n.endswith("attn2")))
    assert k.bias is None and v.bias is None


def test_encode_concept_gives_w0_from_a_clip_vision_model(unet, checkpoint):
    path, _ = checkpoint
    mapper = load_global_mapper(path, unet, input_dim=INPUT, hidden=HIDDEN)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=INPUT, intermediate_size=16, num_hidden_layers=16,
                                               num_attention_heads=2, image_size=32, patch_size=16)).eval()
    concept = encode_concept(mapper, encoder, torch.randn(1, 3, 32, 32))
    assert concept.vectors.shape == (1, unet.config.cross_attention_dim) and concept.word == "S"


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("mapping_3.6.weight"), "1 keys missing"),
    (lambda s: s.update(extra=torch.zeros(1)), "1 unexpected"),
    (lambda s: s.update({"mapping_0.0.weight": torch.zeros(3, 3)}), "this model needs"),
])
def test_wrong_keys_or_shapes_are_one_line_errors(unet, checkpoint, tmp_path, change, message):
    state = dict(checkpoint[1])
    change(state)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(SpdinvError, match=message) as error:
        load_global_mapper(tmp_path / "bad.pt", unet, input_dim=INPUT, hidden=HIDDEN)
    assert "\n" not in str(error.value)


def test_a_corrupt_checkpoint_is_a_one_line_error(unet, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(SpdinvError, match="not a readable checkpoint"):
        load_global_mapper(tmp_path / "bad.pt", unet)


def test_projections_compose_with_an_engine_and_are_put_back(tiny, tmp_path):
    state = official_state_dict(tiny.unet, tiny.unet.config.cross_attention_dim)
    torch.save(state, tmp_path / "global_mapper.pt")
    mapper = load_global_mapper(tmp_path / "global_mapper.pt", tiny.unet, input_dim=INPUT, hidden=HIDDEN)
    before = {n: (m.to_k, m.to_v) for n, m in tiny.unet.named_modules() if getattr(m, "is_cross_attention", False)}
    processors = dict(tiny.unet.attn_processors)
    z, embedding = torch.randn(1, 4, 8, 8), tiny.encode_prompt("a red circle")
    plain = tiny.eps(z, 500, embedding)
    with projections_installed(tiny.unet, mapper):
        swapped = tiny.eps(z, 500, embedding)
        name = next(iter(before))
        assert dict(tiny.unet.named_modules())[name].to_k is mapper.projections(name)[0]
        result = edit(tiny, None, "a red circle", "a blue circle", _inversion(tiny), "p2p")
    assert not torch.allclose(plain, swapped) and torch.isfinite(result.edited).all()
    without = edit(tiny, None, "a red circle", "a blue circle", _inversion(tiny), "p2p")
    assert not torch.allclose(result.edited, without.edited)  # the engine's processors used the swapped projections
    after = {n: (m.to_k, m.to_v) for n, m in tiny.unet.named_modules() if getattr(m, "is_cross_attention", False)}
    assert after == before and dict(tiny.unet.attn_processors) == processors
    assert torch.equal(tiny.eps(z, 500, embedding), plain)


def _inversion(model):
    from spdinv.inversion import invert

    return invert(model, torch.zeros(1, 3, 32, 32), "a red circle", "ddim", 3, progress=False, diagnose=False)
