"""torch.optim.Optimizer's methods called without their compiler guard (``unguarded.py``):
the same results as torch's, no ``torch._dynamo`` import while nothing compiles, and torch's
guarded methods once it is loaded. Each case runs in a fresh interpreter: this one has loaded
``torch._dynamo`` long ago."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_UNGUARDED_SGD = """
import sys, torch
from distbelief.unguarded import call_unguarded

class UnguardedSGD(torch.optim.SGD):
    def add_param_group(self, group):
        call_unguarded("add_param_group", self, group)

    def zero_grad(self, set_to_none=True):
        call_unguarded("zero_grad", self, set_to_none)

    def state_dict(self):
        return call_unguarded("state_dict", self)

    def load_state_dict(self, state):
        call_unguarded("load_state_dict", self, state)

def train(optimizer, params, copy_to=None):
    torch.manual_seed(0)
    for _ in range(3):
        optimizer.zero_grad()
        (params[0] ** 2).sum().backward()
        # torch.optim.SGD.step itself imports torch._dynamo: the update is made by hand here.
        with torch.no_grad():
            params[0] -= 0.1 * params[0].grad
            optimizer.state[params[0]]["momentum_buffer"] = params[0].grad.clone()
    state = optimizer.state_dict()
    if copy_to is not None:
        copy_to.load_state_dict(state)
    return state
"""


def _run(code: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()


def test_an_optimizer_that_never_compiles_does_without_torch_dynamo_and_matches_torch():
    loaded, same_groups, same_state, zeroed = _run(
        _UNGUARDED_SGD
        + """
mine = [torch.ones(4, requires_grad=True)]
optimizer = UnguardedSGD([{"params": mine, "lr": 0.1}], lr=0.1, momentum=0.9)
copy = UnguardedSGD([torch.ones(4, requires_grad=True)], lr=0.5, momentum=0.9)
state = train(optimizer, mine, copy_to=copy)
optimizer.zero_grad()
print("torch._dynamo" in sys.modules)
theirs = [torch.ones(4, requires_grad=True)]
reference = torch.optim.SGD([{"params": theirs, "lr": 0.1}], lr=0.1, momentum=0.9)
expected = train(reference, theirs)
print(state["param_groups"] == expected["param_groups"] == copy.state_dict()["param_groups"])
print(all(torch.equal(state["state"][k]["momentum_buffer"], v["momentum_buffer"])
          for k, v in expected["state"].items()))
print(mine[0].grad is None)
"""
    )
    assert loaded == "False"
    assert (same_groups, same_state, zeroed) == ("True", "True", "True")


def test_once_torch_dynamo_is_loaded_the_guarded_methods_run():
    (guarded,) = _run(
        _UNGUARDED_SGD
        + """
import torch._dynamo
params = [torch.ones(2, requires_grad=True)]
UnguardedSGD(params, lr=0.1).zero_grad()
# torch's guard keeps the function it made on the method it wraps, at its first call.
print(hasattr(torch.optim.Optimizer.zero_grad.__wrapped__, "__dynamo_disable"))
"""
    )
    assert guarded == "True"
