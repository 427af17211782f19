"""Parameter group names as requests carry them (``meta["group"]``): which names are valid,
checked alike by the client before it sends one and by the shard that reads one.
"""

from __future__ import annotations

import re

DEFAULT_GROUP = ""
"""The group a request names when it names none: the shard its process started with."""
INITIALIZED_GROUPS_KEY = "initialized_groups"
"""A shard's HELLO reply: the names of its groups that hold parameters (older shards omit it)."""
_GROUP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_group_name(name: object) -> str:
    """``name`` if it can name a group; ValueError naming it otherwise."""
    if name == DEFAULT_GROUP:
        return DEFAULT_GROUP
    if not isinstance(name, str) or not _GROUP_NAME.fullmatch(name):
        raise ValueError(
            f"parameter group name {name!r} must be 1-64 letters, digits, '_', '.' or '-'"
        )
    return name
