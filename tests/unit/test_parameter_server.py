"""ParameterServer refuses to start outside a torch.distributed process group, or with a bad
argument (named before anything is joined)."""

import numpy
import pytest
import torch
import torch.distributed as dist
from torch import nn

from distbelief.server import ParameterServer


def test_parameter_server_without_a_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"no torch.distributed process group.*init_process_group"):
        ParameterServer(nn.Linear(4, 2))


@pytest.mark.parametrize("join_timeout_s", [0, -1.0, float("inf")])
def test_a_bad_join_timeout_is_named_before_anything_is_joined(join_timeout_s):
    with pytest.raises(ValueError, match=r"^join_timeout_s must be a finite number > 0, got "):
        ParameterServer(nn.Linear(4, 2), join_timeout_s=join_timeout_s)


@pytest.mark.parametrize(
    "lr",
    [numpy.float32(0.05), numpy.array(0.05), torch.tensor(0.05), torch.tensor([0.05])],
    ids=str,
)
def test_a_numpy_or_one_element_tensor_lr_is_a_rate_as_downpour_sgd_takes_it(lr):
    """The same rate a script gives DownpourSGD: refused only for want of a process group."""
    with pytest.raises(ValueError, match=r"^no torch.distributed process group"):
        ParameterServer(nn.Linear(4, 2), lr=lr)


def test_a_tensor_of_several_rates_is_refused_naming_lr():
    with pytest.raises(ValueError, match=r"^lr must be a finite number >= 0 \(or None\), got "):
        ParameterServer(nn.Linear(4, 2), lr=torch.tensor([0.05, 0.1]))
