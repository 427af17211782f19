"""The debug line that says how a client reads a same-host shard's parameters names why they
go by request: the shard's reason, or this client's own (its pulls narrowed or changes only)."""

from __future__ import annotations

import logging

import pytest
import torch

from distbelief.client.shared_memory import SharedMemory


@pytest.mark.parametrize(
    ("reads", "reply", "said"),
    [
        (False, {"shared": True}, "by request (this client's pulls are narrowed or changes only)"),
        (True, {"shared": False, "why": "its consistency decides"}, "by request (its consistency"),
        (True, {}, "by request (the shard shares no parameters)"),
    ],
)
def test_the_debug_log_says_why_reads_go_by_request(caplog, reads, reply, said):
    memory = SharedMemory([[(4, torch.float32)]], reads=reads, channel_of=lambda _: None)
    with caplog.at_level(logging.DEBUG, logger="distbelief.client.shared_memory"):
        memory._ask(0, object(), lambda _offer: reply, None)
    assert f"shard 0: reads {said}" in caplog.text
    assert "None" not in caplog.text
