"""classlab's CPU optimizers against torch's own: same updates, same state format, safe fallbacks."""

import pytest
import torch

from classlab.train.optim import FusedRMSprop, LeanAdam, LeanAdamW

CASES = [
    (torch.optim.Adam, LeanAdam, {"lr": 1e-2, "weight_decay": 1e-3, "fused": True}),
    (torch.optim.AdamW, LeanAdamW, {"lr": 1e-2, "weight_decay": 1e-2, "fused": True}),
    (torch.optim.RMSprop, FusedRMSprop, {"lr": 1e-2, "weight_decay": 1e-3}),
]


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _step(model, opt, x, y, skip_bias: bool = False) -> None:
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    if skip_bias:
        model[2].bias.grad = None  # a parameter without a gradient this step: torch's own code must take it
    opt.step()


@pytest.mark.parametrize(("torch_cls", "ours_cls", "kwargs"), CASES, ids=["adam", "adamw", "rmsprop"])
def test_same_trajectory_as_torch_through_resume_and_a_missing_gradient(torch_cls, ours_cls, kwargs):
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "fused"}  # torch's reference: the plain for-loop
    a, b = _net(), _net()
    ref, ours = torch_cls(a.parameters(), **ref_kwargs), ours_cls(b.parameters(), **kwargs)
    sched_a = torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(ours, step_size=3, gamma=0.5)
    x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
    for i in range(8):
        if i == 4:  # a checkpoint taken mid-run loads into a fresh optimizer of either class
            saved = ours.state_dict()
            steps = [st["step"] for st in saved["state"].values()]
            assert len({id(t) for t in steps}) == len(steps), "state_dict must not alias the step counters"
            ours = ours_cls(b.parameters(), **kwargs)
            ours.load_state_dict(saved)
            torch_cls(_net().parameters(), **ref_kwargs).load_state_dict(saved)
            sched_b.optimizer = ours
        skip = i == 6
        _step(a, ref, x, y, skip_bias=skip)
        _step(b, ours, x, y, skip_bias=skip)
        sched_a.step()
        sched_b.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    # after the skipped step the bias has one step fewer than the weights, in both
    steps_ref = sorted(float(st["step"]) for st in ref.state.values())
    steps_ours = sorted(float(st["step"]) for st in ours.state.values())
    assert steps_ref == steps_ours and steps_ours[0] < steps_ours[-1]


def test_lean_adam_counts_each_step_once():
    """The shared step counter advances by one per step (not once per parameter)."""
    model = _net()
    opt = LeanAdam(model.parameters(), lr=1e-3, fused=True)
    x, y = torch.randn(8, 20), torch.randint(0, 3, (8,))
    for _ in range(5):
        _step(model, opt, x, y)
    assert opt._plan is not None  # the fast path is in use
    assert {float(st["step"]) for st in opt.state.values()} == {5.0}
