"""Hugging Face Hub ids versus local paths: the one rule the model and data loaders share.

A name that exists on disk is a local path. A name that does not is looked up on the Hub only if
it has the shape of a Hub id, `name` or `owner/name` (letters, digits, '-', '_', '.'; no '--' or
'..'), and its owner part is not a directory here. Everything else can only be a local path that
is missing, and is reported at once without touching the network: `./x`, `../x`, `/x`, `~/x`,
`a/b/c`, `x/`, `C:\\x`, `runs/sft` when `runs/` exists.

When the Hub certainly cannot be reached (hub_unreachable), a Hub id is resolved here to its snapshot
in the local Hugging Face cache (cached_hub_dir) and loaded as a local directory, or refused at once when
it is not cached: asked for a Hub id, huggingface_hub would retry the network with back-off for 25-55 s
before the same error, even with local_files_only (transformers' adapter look-up does not pass it on).
"""

from __future__ import annotations

import functools
import os
import re
import socket
import threading
import urllib.parse
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


_TRUE = {"1", "on", "yes", "true"}
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_RESOLVE_WAIT_S = 3.0  # a resolver that neither answers nor fails by then: leave the question to the Hub client


@functools.cache
def hub_unreachable() -> str | None:
    """Why this process certainly cannot reach the Hugging Face Hub, or None when it may: HF_HUB_OFFLINE
    is set, or the endpoint's host name (HF_ENDPOINT, huggingface.co by default) does not resolve. With a
    proxy configured, resolving is the proxy's business, so the answer is None. Asked once per process."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    host = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    if not host:
        return None
    outcome: list[str | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            outcome.append(None)
        except socket.gaierror:
            outcome.append(f"{host} does not resolve here")
        except OSError:
            outcome.append(None)

    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(_RESOLVE_WAIT_S)
    return outcome[0] if outcome else None


def cache_only_note(reason: str) -> str:
    """The words an error adds when a Hub id was looked up in the local cache only."""
    return f"no such local path; read from the local Hugging Face cache only, since {reason}"


def cached_hub_dir(repo_id: str, filenames: tuple[str, ...]) -> Path | None:
    """The local Hugging Face cache's snapshot of `repo_id` (its main revision) that holds one of
    `filenames`, or None; reads the cache's directories only, never the network."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):  # a path; None or the "known not to exist" marker otherwise
            return Path(found).parent
    return None
