"""The optimizers are torch's own (fused or foreach), and src/ keeps to torch's public API."""

import re
from pathlib import Path

import pytest
import torch

from classlab.config import TrainConfig
from classlab.train.optim import build_optimizer

SRC = Path(__file__).resolve().parents[1] / "src"
CPU = torch.device("cpu")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


@pytest.mark.parametrize(("name", "cls", "impl"), [("adam", torch.optim.Adam, "fused"),
                                                    ("adamw", torch.optim.AdamW, "fused"),
                                                    ("sgd", torch.optim.SGD, "fused"),
                                                    ("rmsprop", torch.optim.RMSprop, "foreach")])
def test_torch_optimizers_with_their_fast_kernels_follow_the_plain_loop(name, cls, impl):
    """Same hyper-parameters as the YAML says; the fused / foreach kernels follow torch's for-loop
    reference. In float64 the two agree to rounding (1e-12), on any CPU: they differ only in order of
    operations, which fp32 would turn into CPU-dependent 1e-6 noise."""
    tc = TrainConfig(optimizer=name, lr=1e-2, weight_decay=1e-3, momentum=0.5 if name in ("sgd", "rmsprop") else 0.0)
    fast_net, plain_net = _net().double(), _net().double()
    fast = build_optimizer(fast_net.parameters(), tc, CPU)
    assert type(fast) is cls and fast.defaults[impl] is True
    kwargs = {k: v for k, v in fast.defaults.items() if k in ("lr", "weight_decay", "momentum")}
    plain = cls(plain_net.parameters(), foreach=False, **kwargs)
    x, y = torch.randn(32, 20, dtype=torch.float64), torch.randint(0, 3, (32,))
    for _ in range(5):
        for net, opt in ((fast_net, fast), (plain_net, plain)):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(fast_net.parameters(), plain_net.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def _src_lines(pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [f"{p.relative_to(SRC)}:{i}" for p in sorted(SRC.rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if rx.search(line)]


def test_one_backward_and_no_private_torch_api_in_src():
    """Every feature that trains goes through the one step of train/fit.py; nothing leans on torch._*."""
    assert len(_src_lines(r"\.backward\(")) == 1, _src_lines(r"\.backward\(")
    assert _src_lines(r"torch\._[a-z]") == []
