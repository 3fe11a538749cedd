import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from spdinv.schedule import DDIMSchedule, ddim_inverse_step, ddim_step, inversion_coefficients
from spdinv.schedule import sd_ddim_scheduler


@pytest.fixture(params=[1, 0], ids=["steps_offset=1", "steps_offset=0"])
def scheduler(request):
    config = dict(sd_ddim_scheduler().config)
    config["steps_offset"] = request.param
    return DDIMScheduler.from_config(config)


def test_inverse_step_matches_diffusers(scheduler):
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(50)
    schedule = DDIMSchedule.from_scheduler(scheduler, 50)
    assert tuple(inverse.timesteps.tolist()) == schedule.timesteps
    generator = torch.Generator().manual_seed(0)
    for k, t in enumerate(inverse.timesteps.tolist(), start=1):
        z = torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64)
        eps = torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64)
        expected = inverse.step(eps, t, z).prev_sample
        ours = ddim_inverse_step(z, eps, schedule.abar(k - 1), schedule.abar(k))
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_forward_step_matches_diffusers(scheduler):
    scheduler.set_timesteps(50)
    schedule = DDIMSchedule.from_scheduler(scheduler, 50)
    generator = torch.Generator().manual_seed(1)
    n = schedule.num_steps
    for i, t in enumerate(scheduler.timesteps.tolist()):
        k = n - i
        assert schedule.timesteps[k - 1] == t
        z = torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64)
        eps = torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64)
        expected = scheduler.step(eps, t, z, eta=0.0).prev_sample
        torch.testing.assert_close(ddim_step(z, eps, schedule.abar(k), schedule.abar(k - 1)), expected, atol=1e-6, rtol=0)


def test_inverse_then_forward_with_same_eps_is_identity():
    schedule = DDIMSchedule.from_scheduler(sd_ddim_scheduler(), 10)
    z = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(z)
    for k in range(1, 11):
        up = ddim_inverse_step(z, eps, schedule.abar(k - 1), schedule.abar(k))
        torch.testing.assert_close(ddim_step(up, eps, schedule.abar(k), schedule.abar(k - 1)), z)


def test_coefficients_formula():
    c1, c2 = inversion_coefficients(0.9, 0.5)
    assert float(c1) == pytest.approx((0.5 / 0.9) ** 0.5)
    assert float(c2) == pytest.approx(0.5**0.5 - (0.5 * 0.1 / 0.9) ** 0.5)
    schedule = DDIMSchedule.from_scheduler(sd_ddim_scheduler(), 50)
    assert schedule.timesteps[0] == 1 and schedule.timesteps[-1] == 981
    assert float(schedule.abar(0)) == pytest.approx(float(sd_ddim_scheduler().alphas_cumprod[0]))
