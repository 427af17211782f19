"""Every ``distbelief train`` command the README shows is one a user can run as written: its
flags parse, make a valid config, and plan the job's steps (the checks the launcher makes
before it starts anything), for the data sets whose size is known without reading files."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from distbelief.data.files import FIXED_TRAIN_EXAMPLES
from distbelief.launch.cli import config_from_args, parse_args
from distbelief.launch.job_plan import planned_steps

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_train_commands() -> list[str]:
    """The README's shell blocks' ``distbelief train`` commands, continued lines joined; the
    synopsis, whose choices are written ``{a,b}``, is no command."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #", 1)[0].strip()
            if re.match(r"(\S*/)?distbelief train ", command) and "{" not in command:
                commands.append(command)
    return commands


@pytest.mark.parametrize("command", readme_train_commands())
def test_a_readme_train_command_passes_the_launchers_checks(command):
    args = parse_args(shlex.split(command)[1:])
    config = config_from_args(args)
    if config.data.name in FIXED_TRAIN_EXAMPLES:
        planned_steps(config)
