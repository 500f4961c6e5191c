"""The optimizer of full fine-tuning (train.method = "full"): the denoiser's weights stay in train.dtype,
so that the forward is the one the priors were cached with, and the optimizer updates them in fp32:

- train.master_weights = true: an fp32 copy of each trained weight (4 bytes more a weight) is what the
  optimizer holds and updates; the weight gets it rounded to nearest after each step.
- false, bf16 weights: no copy kept. At its step a weight's fp32 value is made for the moment, updated,
  and written back with stochastic rounding (`round_stochastic`: the standard bit trick, random low 16
  bits added before truncation), so that updates smaller than bf16's spacing still move the weight on
  average. The random bits are seeded by (train.seed, step, weight), so a resumed run rounds alike.
- fp32 weights: the optimizer holds them directly.

Each weight is stepped on its own (`step_one`), so a temporary fp32 copy exists for one weight at a time;
with train.fused_backward that step runs in the weight's post-accumulate-grad hook as soon as the backward
has its gradient, and the gradient is freed at once: gradients never all live together (torch's
"optimizer step in backward" recipe). The optimizer itself is torch's or bitsandbytes' or transformers'
(train.optim.build_optimizer), with one parameter group a weight, so that the learning-rate schedule
(built on `inner`) applies to all of them.
"""

from __future__ import annotations

import torch

from pipeline.store.keys import derive_seed


def round_stochastic(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator) -> None:
    """Write fp32 `source` into bf16 `target`, rounding each value up or down with probability by its
    distance (so the rounding is unbiased): add random bits below bf16's 16 kept bits, then truncate."""
    bits = torch.randint(0, 1 << 16, source.shape, dtype=torch.int32, device=source.device, generator=generator)
    bits.add_(source.view(torch.int32)).bitwise_and_(-65536)  # 0xFFFF0000: keep sign, exponent, 7 mantissa bits
    target.copy_(bits.view(torch.float32))


class FullOptimizer:
    """The optimizer over the trained weights `params` (see the module's docstring). `build(proxies)`
    makes the inner optimizer over their fp32 stand-ins (a list of parameter groups, one a weight)."""

    def __init__(self, params: list[torch.nn.Parameter], build, master: bool, seed: int, fused: bool):
        self.params, self.seed, self.master = params, seed, master
        self.rounds = [p.dtype == torch.bfloat16 and not master for p in params]
        self.proxies = [p if p.dtype == torch.float32 else
                        torch.nn.Parameter(p.detach().float().clone() if master else torch.empty(0, device=p.device))
                        for p in params]
        self.inner = build([{"params": [q]} for q in self.proxies])
        self.step_number = 0  # the optimizer step being taken (the rounding's seed); set by the loop
        self.armed = False  # fused: the backward that ends the step's accumulation steps each weight
        self.hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: self._hook(i))
                      for i, p in enumerate(params)] if fused else []

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def _hook(self, i: int) -> None:
        if self.armed:
            self.step_one(i)

    def step_one(self, i: int) -> None:
        """One weight's update from its gradient, which is freed."""
        p, q = self.params[i], self.proxies[i]
        if p.grad is None:
            return
        if q is not p:
            if self.rounds[i]:
                q.data = p.detach().float()
            q.grad = p.grad.float()
            p.grad = None
        groups = self.inner.param_groups
        self.inner.param_groups = [groups[i]]  # torch's optimizers step the groups they list
        try:
            self.inner.step()
        finally:
            self.inner.param_groups = groups
        if q is p:
            p.grad = None
            return
        q.grad = None
        with torch.no_grad():
            if self.rounds[i]:
                gen = torch.Generator(q.device).manual_seed(derive_seed("rounding", self.seed, self.step_number, i))
                round_stochastic(p.data, q.data, gen)
                q.data = torch.empty(0, device=q.device)
            else:
                p.data.copy_(q.data)

    def step(self) -> None:
        """Step every weight that has a gradient (not fused: after the backward)."""
        for i in range(len(self.params)):
            self.step_one(i)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """The inner optimizer's state, and the fp32 master weights where they are kept."""
        return {"inner": self.inner.state_dict(),
                "master": [q.detach() for p, q in zip(self.params, self.proxies) if self.master and q is not p]}

    def load_state_dict(self, state: dict) -> None:
        masters = iter(state["master"])
        for p, q in zip(self.params, self.proxies):
            if self.master and q is not p:
                q.data.copy_(next(masters))
        self.inner.load_state_dict(state["inner"])
