"""ParameterServer refuses to start outside a torch.distributed process group."""

import pytest
import torch.distributed as dist
from torch import nn

from distbelief.server import ParameterServer


def test_parameter_server_without_a_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"no torch.distributed process group.*init_process_group"):
        ParameterServer(nn.Linear(4, 2))
