"""examples/recommendation.py as its docstring says to run it: two shard processes started
first, then the script, which must learn clicks (test AUC well above chance)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CHILD_ENV

EXAMPLE = Path(__file__).parents[2] / "examples" / "recommendation.py"


@pytest.mark.timeout(300)
def test_the_example_learns_clicks_against_two_shards(shard_cluster):
    addresses = shard_cluster(2, "--row-optimizer", "adagrad", "--row-lr", "0.05")
    done = subprocess.run(
        # Small tables: each id comes back often enough to learn in 100 steps (AUC ~0.61).
        [
            *(sys.executable, str(EXAMPLE), "--ps", ",".join(addresses)),
            *("--steps", "100", "--table-size", "200"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=CHILD_ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"test AUC ([\d.]+) \(the hidden model's: ([\d.]+)\)", done.stdout)
    assert found is not None, done.stdout
    assert 0.58 < float(found.group(1)) < float(found.group(2)), done.stdout


def test_a_bad_value_is_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--ps", "garbage", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=CHILD_ENV,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "recommendation.py: error: address 'garbage' is not of the form tcp://HOST:PORT"
    )
