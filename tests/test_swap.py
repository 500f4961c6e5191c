"""Block swap (train.blocks_to_swap, pipeline/denoiser/swap.py): training and the cached priors are bit for bit those
without swap, and every computation reads a swapped block's weights only while they are resident: the
tests park swapped weights as NaN copies, so a missed onload (forward,
backward, or checkpointing's recomputation) fails the run instead of silently reading CPU memory."""

import pytest
import torch

from pipeline.cache.stage import run_cache
from pipeline.store.store import Store
from pipeline.errors import UserError
from pipeline.families import family_class
from pipeline.data.plan import make_plan
from pipeline.denoiser.swap import BlockSwap, apply_block_swap, swapped_indices
from pipeline.train.stage import train_lora

from conftest import configure


def test_swapped_blocks_are_spread_and_include_the_last():
    assert swapped_indices(57, 0) == []
    assert swapped_indices(57, 57) == list(range(57))
    picked = swapped_indices(57, 3)
    assert picked == [18, 37, 56]
    assert len(swapped_indices(48, 20)) == 20


def test_sdxl_refuses_block_swap_in_one_line_naming_the_key():
    with pytest.raises(UserError, match="'train.blocks_to_swap'.*sdxl"):
        apply_block_swap(torch.nn.Linear(2, 2), family_class("sdxl"), 1, torch.device("cpu"))


def test_config_refuses_swap_with_quantize_and_unknown_quantize(project):
    path, _ = project()
    with pytest.raises(UserError, match="'model.quantize' must be one of none, int8, fp8, nf4"):
        configure(path, model={"quantize": "int4"})
    with pytest.raises(UserError, match="'train.blocks_to_swap' works with model.quantize"):
        configure(path, model={"quantize": "int8"}, train={"blocks_to_swap": 1})


@pytest.fixture
def nan_parking(monkeypatch):
    """Swapped weights parked as NaN (a meta placeholder would be cleaner, but `.data` cannot switch a CPU
    tensor to meta): a read of a parked weight poisons the prediction, the loss or the gradients. Returns
    the BlockSwaps built."""
    built = []
    init = BlockSwap.__init__

    def record(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(BlockSwap, "__init__", record)
    monkeypatch.setattr(BlockSwap, "_parked", lambda self, t: torch.full_like(self.host[id(t)], float("nan")))
    return built


@pytest.mark.e2e
@pytest.mark.parametrize("model,swap,checkpointing", [("flux", 2, False), ("flux", 3, True), ("hidream", 1, False)])
def test_block_swap_caches_and_trains_exactly_as_without(project, tiny_family_model, nan_parking, model, swap,
                                                         checkpointing):
    steps = 3
    results = []
    for n in (0, swap):
        path, _ = project(name=f"swap{n}.toml", model=tiny_family_model(model), dtype="fp32", max_steps=steps,
                          lr=1e-2, cache=project.root / f"cache{n}", out=project.root / f"out{n}")
        cfg = configure(path, train={"blocks_to_swap": n, "gradient_checkpointing": checkpointing})
        run_cache(cfg, progress=False)
        trained, _ = train_lora(cfg, progress=False)
        plan, store = make_plan(cfg), Store(cfg.cache.dir)
        priors = {k: store.read(plan.prior_kind(), k)[0]["prediction"] for k in sorted(store.keys(plan.prior_kind()))}
        store.close()
        lora = {k: v.detach().clone() for k, v in trained.state_dict().items() if "lora_" in k}
        results.append((priors, lora))
    (priors0, lora0), (priors1, lora1) = results
    assert priors0 and priors0.keys() == priors1.keys()
    assert all(torch.equal(priors0[k], priors1[k]) for k in priors0)
    assert lora0.keys() == lora1.keys() and all(torch.equal(lora0[k], lora1[k]) for k in lora0)
    assert not all(torch.equal(v, torch.zeros_like(v)) for k, v in lora1.items() if "lora_B" in k)  # it trained
    cache_swap, train_swap = nan_parking  # the prior phase's, then the train stage's
    assert len(cache_swap.blocks) == len(train_swap.blocks) == swap
    # every training step brings each swapped block in for its forward and again for its backward
    assert train_swap.onloads >= 2 * steps * swap
    assert cache_swap.onloads >= swap and not cache_swap.resident and not train_swap.resident
    assert train_swap.offloads == train_swap.onloads
