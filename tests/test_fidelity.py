"""Fidelity to the official code (issue 28): LocalBlend reads the edited maps, SPDInv's and
null-text's stop rules, ProxEdit's pull-back rows, presets, the negative prompt and PnP's source
prompt, the default solver."""

import pytest
import torch
from PIL import Image

from spdinv.editing import run_editor
from spdinv.editing.p2p import P2PEditor, P2POptions
from spdinv.inversion import invert

SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"
STEPS = 6


@pytest.fixture(scope="module")
def image(red_circle):
    return Image.open(red_circle).convert("RGB")


@pytest.fixture(scope="module")
def ddim(tiny, image):
    return invert(tiny, image, SOURCE, "ddim", STEPS, progress=False, diagnose=False)


# ---------------------------------------------------------------- LocalBlend's map store


class Snapshots(P2PEditor):
    """A P2P editor that keeps, after every step, LocalBlend's summed maps and the maps each blend
    layer used (`recorded`: the conditional maps after the edit)."""

    def end_step(self, i, t, z):
        self.snapshots.append(({k: v.clone() for k, v in self.maps.items()},
                               {k: self.recorded[k].clone() for k in self.blend_names}))
        return super().end_step(i, t, z)


def test_local_blend_sums_the_edited_maps_at_every_step(tiny, ddim):
    """The official AttentionStore keeps a view of each map that the edit then overwrites, so
    LocalBlend sums the *edited* target maps at every step (not only the first)."""
    editor = Snapshots(tiny, SOURCE, TARGET, P2POptions(blend="red blue"))
    editor.snapshots, editor.record = [], True
    run_editor(tiny, ddim, TARGET, editor)
    assert editor.cross_steps >= 2
    (sum0, used0), (sum1, used1) = editor.snapshots[:2]
    for name in editor.blend_names:
        assert torch.equal(sum0[name], used0[name])
        assert torch.allclose(sum1[name], used0[name] + used1[name], atol=1e-6)  # float32 sums of maps <= 1
        assert not torch.allclose(used1[name][1], used1[name][0])  # the target row was reweighted (x2 on 'blue')


def test_local_blend_stores_the_same_maps_in_float16_as_in_float32(tiny, ddim):
    """The store copies the edited maps to float32 whatever the model's dtype. Maps are in [0, 1]
    and the reweight doubles one word, so float16 rounding (half an ulp at 2: 2^-10) bounds the
    difference by 1e-3."""
    torch.manual_seed(0)
    stored = {}
    for dtype in (torch.float32, torch.float16):
        editor = P2PEditor(tiny, SOURCE, TARGET, P2POptions(blend="red blue"))
        editor.prepare(tiny, ddim)
        generator = torch.Generator().manual_seed(1)
        for layer in editor.blend_layers:
            h, w = layer.size(editor.latent_hw)
            logits = torch.randn(2, 4, h * w, tiny.tokenizer.model_max_length, generator=generator)
            editor.edit_probs(layer, logits.softmax(-1).to(dtype))
        stored[dtype] = editor.maps
    for name, maps in stored[torch.float32].items():
        assert stored[torch.float16][name].dtype == torch.float32
        assert torch.allclose(stored[torch.float16][name], maps, atol=1e-3, rtol=0)
