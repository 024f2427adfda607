"""Model ids (``org/name``) resolved to a directory of the local Hugging Face cache.

A local directory always wins: a name that is a directory is used as it is, and only a name
that is not one and reads as a Hub id (``org/name``) goes through ``huggingface_hub``. Offline
(``HF_HUB_OFFLINE=1``, or the Hub unreachable) it is read from the cache; online, only the files
crosschip reads are downloaded: config, generation config, safetensors weights and index, and
tokenizer files. Never ``*.bin``, ``*.pt`` or ``*.py``: nothing fetched is ever code or a
pickle, and ``trust_remote_code`` is never enabled.
"""

from __future__ import annotations

import re
from pathlib import Path

from crosschip.errors import CheckpointError, ConfigurationError

#: What a crosschip load reads from a model repository (top level only, see IGNORE).
ALLOW = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "crosschip_tokenizer.json",  # the byte-level tokenizer of a model crosschip trained
]
# fnmatch's "*" also matches "/": without this, "*.safetensors" would fetch sub-folders too
# (other formats and variants some repositories keep there), which a load never reads.
IGNORE = ["*/*"]

# huggingface_hub's own id rule, restricted to "org/name" (names without "/" are presets here).
_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_model_id(name) -> bool:
    """``name`` reads as a Hub model id ``org/name`` (a string, not a path object or a path
    starting with ``.``, ``/`` or ``~``, and no ``..``)."""
    return isinstance(name, str) and bool(_MODEL_ID.match(name)) and ".." not in name


def resolve(name, revision: str | None = None, option: str = "model") -> Path | None:
    """The directory to load ``name`` from: ``name`` itself when it is a directory, the cached
    snapshot of ``name`` at ``revision`` (default ``main``) when it is a model id, None for
    anything else (the caller decides: a preset, or "not a directory"). ``option`` names the
    argument in errors (``--model`` on the command line)."""
    if Path(name).is_dir():
        if revision is not None:
            raise ConfigurationError(f"{option} {name}: a local directory, which has no revisions; "
                                     f"--revision {revision} applies only to a Hub model id (org/name)")
        return Path(name)
    if not is_model_id(name):
        if revision is not None:
            raise ConfigurationError(f"--revision {revision}: {option} {name!r} is not a Hub model id (org/name)")
        return None
    return _snapshot(name, revision, option)


def _snapshot(repo_id: str, revision: str | None, option: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = constants.is_offline_mode()
    cache = constants.HF_HUB_CACHE  # read at call time by snapshot_download too
    shown = revision or constants.DEFAULT_REVISION
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW, ignore_patterns=IGNORE,
                                      local_files_only=offline, library_name="crosschip"))
    except LocalEntryNotFoundError:
        why = ("downloads are off (HF_HUB_OFFLINE=1)" if offline
               else "the Hub could not be reached to download it")
        raise CheckpointError(
            f"model id {repo_id!r} at revision {shown!r}: not in the Hugging Face cache {cache} and {why} "
            f"(and no local directory {repo_id!r} exists); download it once online, or pass a local "
            "model directory") from None
    except ValueError as exc:  # huggingface_hub's id check (HFValidationError), e.g. "a--b/c"
        raise ConfigurationError(f"{option} {repo_id!r}: not a valid Hub model id: {exc}") from None
    except HfHubHTTPError as exc:  # not found, gated, bad revision: the Hub's own reason
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"model id {repo_id!r} at revision {shown!r}: the Hub refused it: "
                              f"{first_line}") from None
