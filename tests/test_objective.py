"""The pure objective functions and the documented seed/noise recipe."""

import hashlib
import json

import torch

from pipeline.store.keys import derive_seed, digest
from pipeline.objective import draw_timestep_index, flow_noisy, flow_target, draw_noise, per_sample_mse


def test_flow_matching_interpolates_between_data_and_noise():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    xt = flow_noisy(x0, eps, sigma)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], eps[2])
    assert torch.allclose(xt[1], (x0[1] + eps[1]) / 2)
    assert torch.equal(flow_target(x0, eps), eps - x0)


def test_noise_recipe_is_plain_torch_randn():
    seed = derive_seed("noise", 0, "abc", 1)
    expected = torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    assert torch.equal(draw_noise(seed, (4, 8, 8))[0], expected)


def test_seed_and_key_recipes_match_the_readme():
    parts = ["noise", 0, "abc", 1]
    text = json.dumps(parts, separators=(",", ":"))
    assert derive_seed(*parts) == int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)
    assert digest(*parts) == hashlib.sha256(text.encode()).hexdigest()[:32]
    assert derive_seed("noise", 0, "abc", 1) != derive_seed("noise", 0, "abc", 2)


def test_timestep_draws_are_deterministic_and_follow_the_scheme():
    def draws(scheme, seed0):
        return [
            draw_timestep_index(torch.Generator().manual_seed(seed0 + i), 1000, scheme, 0.0, 1.0, 1.29) for i in range(400)
        ]

    assert draws("logit_normal", 0) == draws("logit_normal", 0)
    logit = draws("logit_normal", 0)
    uniform = draws("uniform", 0)
    assert all(0 <= i < 1000 for i in logit + uniform)
    middle = lambda xs: sum(250 <= i < 750 for i in xs) / len(xs)  # noqa: E731
    assert middle(logit) > 0.6 > middle(uniform) - 0.1  # logit-normal concentrates mid-range


def test_per_sample_mse():
    a, b = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
    assert torch.equal(per_sample_mse(a, b), torch.tensor([1.0, 3.0]))
