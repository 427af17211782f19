"""Checkpoint metadata that checks itself: a JSON object written with the SHA-256 of its other
fields, so that a field edited by hand or damaged into another valid value (a shard's version,
its shard count, the name of its tensor file) is refused on reading, as damaged tensor bytes
are. Knows nothing of what the fields mean; torch-free.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distbelief.errors import CheckpointError
from distbelief.files import write_text_atomic

DIGEST_KEY = "meta_sha256"
"""The field holding the hex SHA-256 of the object's other fields as canonical JSON (sorted
keys, no spaces)."""


def fields_digest(fields: Mapping[str, Any]) -> str:
    """The hex SHA-256 of ``fields`` (a JSON object as read back), leaving out DIGEST_KEY."""
    other = {key: value for key, value in fields.items() if key != DIGEST_KEY}
    text = json.dumps(other, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def write_sealed_json(path: Path, fields: Mapping[str, Any]) -> None:
    """Write ``fields`` as a JSON object to ``path`` (atomically: see ``write_text_atomic``),
    with their digest under DIGEST_KEY."""
    # The digest is of the fields as a reader will parse them (tuples as lists, keys as
    # strings), so that reading them back gives the same canonical text.
    sealed = json.loads(json.dumps(dict(fields)))
    sealed[DIGEST_KEY] = fields_digest(sealed)
    write_text_atomic(path, json.dumps(sealed, indent=1))


def check_sealed(fields: Mapping[str, Any], path: Path) -> None:
    """Refuse ``fields`` (the JSON object read from ``path``) if its digest does not match its
    other fields. An object without a digest (written before there were digests) is taken.

    Raises:
        CheckpointError: the digest does not match; the message names the file.
    """
    if not isinstance(fields, Mapping) or DIGEST_KEY not in fields:
        return
    if fields[DIGEST_KEY] != fields_digest(fields):
        raise CheckpointError(f"{path}: corrupt (its fields do not match the SHA-256 it holds)")
