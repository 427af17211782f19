"""Raising the open-file limit toward the hard limit (this process's own, restored after)."""

import resource

import pytest

from distbelief.wire.fd_limit import fd_limit, raise_fd_limit


@pytest.fixture
def limits():
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield before
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_a_low_soft_limit_is_raised_to_what_is_wanted(limits):
    _, hard = limits
    wanted = 3000 if hard == resource.RLIM_INFINITY else min(3000, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    assert raise_fd_limit(wanted) == wanted == fd_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (wanted, hard)


def test_a_limit_high_enough_is_left_alone(limits):
    soft, hard = limits
    assert raise_fd_limit(16) == fd_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
