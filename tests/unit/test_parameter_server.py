"""ParameterServer refuses to start outside a torch.distributed process group, or with a bad
argument (named before anything is joined)."""

import pytest
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
