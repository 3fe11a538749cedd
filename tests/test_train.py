"""`spdinv world train` on a handful of scenes: a loadable SD folder, seeded, and a run killed after a
checkpoint resumes to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from spdinv.world.train import TrainConfig, Trainer

TINY = dict(n_scenes=12, vae_steps=2, vae_batch=2, unet_steps=4, unet_batch=2, unet_warmup=1, checkpoint_every=1,
            threads=1)


class Crash(Exception):
    pass


def final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name in ("vae", "text_encoder", "unet")
            for k, v in getattr(trainer, name).state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    trainer = Trainer(root / "work", TrainConfig(**TINY))
    out = trainer.run(root / "model")
    return out, final_weights(trainer)


def test_training_writes_a_stock_diffusers_pipeline(uninterrupted):
    from diffusers import StableDiffusionPipeline

    out, _ = uninterrupted
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipe.vae.config.scaling_factor > 0
    image = pipe("a red circle on a white background", num_inference_steps=2, height=64, width=64,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)
    assert (out / "training.json").is_file()


def test_a_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted, monkeypatch):
    _, expected = uninterrupted
    saves = []
    original = Trainer.save_checkpoint

    def crash_after_second_unet_checkpoint(self, extra):
        original(self, extra)
        if self.state["phase"] == "unet" and self.state["step"] > 0:
            saves.append(self.state["step"])
            if len(saves) == 2:
                raise Crash

    monkeypatch.setattr(Trainer, "save_checkpoint", crash_after_second_unet_checkpoint)
    with pytest.raises(Crash):
        Trainer(tmp_path / "work", TrainConfig(**TINY)).run(tmp_path / "model")
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    resumed = Trainer(tmp_path / "work", TrainConfig(**TINY))
    resumed.run(tmp_path / "model")
    assert saves == [1, 2]
    weights = final_weights(resumed)
    assert weights.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_a_finished_run_extends_with_more_steps(tmp_path, uninterrupted):
    trainer = Trainer(tmp_path / "work", TrainConfig(**TINY))
    trainer.run(tmp_path / "model")
    finished = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=False)
    assert finished["state"]["step"] == TINY["unet_steps"] and {"unet_opt", "ema"} <= finished.keys()
    longer = Trainer(tmp_path / "work", TrainConfig(**{**TINY, "unet_steps": TINY["unet_steps"] + 2}))
    longer.run(tmp_path / "model")
    assert longer.state["step"] == TINY["unet_steps"] + 2
    _, four_steps = uninterrupted
    assert any(not torch.equal(v, four_steps[k]) for k, v in final_weights(longer).items() if k.startswith("unet."))


def test_a_checkpoint_without_optimizer_state_continues_with_a_fresh_warm_optimizer(tmp_path):
    """Checkpoints written before the optimizer state was kept at the end (phase "done") still extend."""
    Trainer(tmp_path / "work", TrainConfig(**TINY)).run(tmp_path / "model")
    path = tmp_path / "work" / "checkpoint.pt"
    old = torch.load(path, weights_only=False)
    for key in ("unet_opt", "ema"):
        old.pop(key)
    old["state"]["phase"] = "done"
    torch.save(old, path)
    longer = Trainer(tmp_path / "work", TrainConfig(**{**TINY, "unet_steps": TINY["unet_steps"] + 2}))
    longer.run(tmp_path / "model")
    assert longer.state["step"] == TINY["unet_steps"] + 2
