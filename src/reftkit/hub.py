"""Hugging Face Hub ids versus local paths: the one rule the model and data loaders share.

A name that exists on disk is a local path. A name that does not is looked up on the Hub only if
it has the shape of a Hub id, `name` or `owner/name` (letters, digits, '-', '_', '.'; no '--' or
'..'), and its owner part is not a directory here. Everything else can only be a local path that
is missing, and is reported at once without touching the network: `./x`, `../x`, `/x`, `~/x`,
`a/b/c`, `x/`, `C:\\x`, `runs/sft` when `runs/` exists.
"""

from __future__ import annotations

import re
from pathlib import Path

# huggingface_hub's repo-id pattern: an optional owner, then a name of up to 96 characters.
_HUB_ID = re.compile(r"(?:\b[\w\-.]+\b/)?\b[\w\-.]{1,96}\b")


def could_be_hub_id(name: str, *, need_owner: bool = False) -> bool:
    """Whether a name that is not on disk may be a Hub id (with `need_owner`, only `owner/name`)."""
    if not _HUB_ID.fullmatch(name) or "--" in name or ".." in name:
        return False
    owner = name.rpartition("/")[0]
    if need_owner and not owner:
        return False
    return not (owner and Path(owner).is_dir())


def missing_path_message(what: str, name: str) -> str:
    """`what 'name': no such file or directory`, saying where a relative path was looked for."""
    where = "" if Path(name).expanduser().is_absolute() else f" (looked in {Path.cwd()})"
    return f"{what} {name!r}: no such file or directory{where}"
