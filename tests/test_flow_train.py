"""`spdinv world train --flow` on a handful of scenes: a stock StableDiffusion3Pipeline folder, the training
conditioning equal to the pipeline's own, and a run killed after a checkpoint resumes to exactly the weights of an
uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from spdinv.world.config import FlowTrainConfig
from spdinv.world.flow_train import ZERO_TOKENS, FlowTrainer, RepeatedTokenJointAttnProcessor

TINY = dict(n_scenes=12, flow_steps=4, flow_batch=2, flow_warmup=1, flow_layers=1, flow_heads=2, flow_head_dim=8,
            checkpoint_every=1, threads=1)


class Crash(Exception):
    pass


def weights(trainer: FlowTrainer) -> dict[str, torch.Tensor]:
    state = {f"transformer.{k}": v.detach().clone() for k, v in trainer.transformer.state_dict().items()}
    state.update({f"ema.{i}": p.detach().clone() for i, p in enumerate(trainer.ema.shadow_params)})
    return state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-train")
    trainer = FlowTrainer(root / "work", FlowTrainConfig(**TINY))
    out = trainer.run(root / "model")
    return out, weights(trainer)


def test_training_writes_a_stock_sd3_pipeline(uninterrupted):
    from diffusers import StableDiffusion3Pipeline

    out, _ = uninterrupted
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    assert pipe.vae.config.shift_factor == 0.0 and pipe.transformer.config.num_layers == 1
    image = pipe("a red circle on a white background", num_inference_steps=2, height=64, width=64,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and (out / "training.json").is_file()


def test_one_weighted_zero_row_equals_the_pipelines_zero_rows(uninterrupted):
    """Training feeds one zero row for the stock pipeline's 256; outputs agree to float32 rounding of
    softmax sums taken over different lengths (1e-5)."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    out, _ = uninterrupted
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    prompts = ["a large blue star on the left on a gray background", ""]
    stock, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
    short, _, _, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=1)
    assert stock.shape[1] == short.shape[1] - 1 + ZERO_TOKENS
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 900.0])
    with torch.no_grad():
        pipe.transformer.set_attn_processor(JointAttnProcessor2_0())
        expected = pipe.transformer(x, encoder_hidden_states=stock, pooled_projections=pooled, timestep=t).sample
        pipe.transformer.set_attn_processor(RepeatedTokenJointAttnProcessor(ZERO_TOKENS))
        got = pipe.transformer(x, encoder_hidden_states=short, pooled_projections=pooled, timestep=t).sample
        pipe.transformer.set_attn_processor(RepeatedTokenJointAttnProcessor(1))
        unweighted = pipe.transformer(x, encoder_hidden_states=short, pooled_projections=pooled, timestep=t).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (unweighted - expected).abs().max() > 1e-3  # the weight matters: the comparison can fail


def test_the_text_encoders_are_the_shipped_one(uninterrupted):
    """SD3 reads penultimate hidden states: the first encoder's is the shipped encoder's output before its final
    LayerNorm, the second's its layer 2; the pooled output is the shipped encoder's at the end token."""
    from transformers import CLIPTextModel

    from spdinv.world.flow_train import SOURCE, text_encoders

    shipped = CLIPTextModel.from_pretrained(SOURCE / "text_encoder", local_files_only=True)
    first, second = text_encoders()
    ids = torch.tensor([[331, 5, 40, 332, 332]])
    with torch.no_grad():
        reference = shipped(ids, output_hidden_states=True)
        one, two = first(ids, output_hidden_states=True), second(ids, output_hidden_states=True)
    torch.testing.assert_close(one.hidden_states[-2], reference.hidden_states[-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(two.hidden_states[-2], reference.hidden_states[-2], rtol=0, atol=1e-6)
    torch.testing.assert_close(one.text_embeds, reference.pooler_output, rtol=0, atol=1e-5)


def test_a_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted, monkeypatch):
    _, expected = uninterrupted
    saves = []
    original = FlowTrainer.save_checkpoint

    def crash_after_second_checkpoint(self):
        original(self)
        saves.append(self.step)
        if len(saves) == 2:
            raise Crash

    monkeypatch.setattr(FlowTrainer, "save_checkpoint", crash_after_second_checkpoint)
    with pytest.raises(Crash):
        FlowTrainer(tmp_path / "work", FlowTrainConfig(**TINY)).run(tmp_path / "model")
    monkeypatch.setattr(FlowTrainer, "save_checkpoint", original)
    resumed = FlowTrainer(tmp_path / "work", FlowTrainConfig(**TINY))
    resumed.run(tmp_path / "model")
    assert saves == [1, 2] and resumed.step == TINY["flow_steps"]
    got = weights(resumed)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_a_checkpoint_of_another_run_is_refused(tmp_path, uninterrupted):
    from spdinv.errors import SpdinvError

    FlowTrainer(tmp_path / "work", FlowTrainConfig(**{**TINY, "flow_steps": 1})).run(tmp_path / "model")
    with pytest.raises(SpdinvError, match="--flow-layers"):
        FlowTrainer(tmp_path / "work", FlowTrainConfig(**{**TINY, "flow_layers": 2})).resume()


def test_the_command_trains_and_exports(tmp_path, capsys):
    from spdinv.cli import main

    args = ["world", "train", "--flow", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "flow_steps": 2}.items()]
    assert main(args) == 0
    assert (tmp_path / "o" / "transformer" / "config.json").is_file()
    assert torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=False)["step"] == 2
    capsys.readouterr()
    assert main(args + ["--flow-heads=0"]) == 2
    err = capsys.readouterr().err
    assert "--flow-heads must be > 0" in err and len(err.strip().splitlines()) == 1
