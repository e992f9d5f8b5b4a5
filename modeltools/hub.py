"""Model sources: a local folder, or a Hugging Face hub ID (ORG/NAME) resolved through the hub's cache with
huggingface_hub, so a user who has the model cached (or is online) needs no manual download. Offline
(HF_HUB_OFFLINE=1) only the cache is read; online a missing or outdated snapshot is downloaded into it."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# What a pipeline folder never needs: other frameworks' weights and pickled checkpoints
_IGNORE = ["*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.gguf"]


class SourceError(ValueError):
    """A model source that is neither a folder here nor a hub ID the cache (or the hub) can give."""


def is_hub_id(source: str) -> bool:
    return bool(HUB_ID_RE.match(source)) and not os.path.exists(source)


@functools.cache
def resolve(source: str) -> str:
    """The local folder of `source`: itself if it is a folder, else the hub ID's snapshot in the cache."""
    if os.path.isdir(source):
        return source
    if not is_hub_id(source):
        raise SourceError(f"{source}: no such folder (and not a hub ID of the form ORG/NAME)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    try:
        return snapshot_download(source, ignore_patterns=_IGNORE)
    except GatedRepoError:
        raise SourceError(f"{source}: the hub requires accepting its terms and a token (HF_TOKEN) to download "
                          f"it, and it is not in {where}") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise SourceError(f"{source}: no such model on the hub, and not in {where}") from None
    except LocalEntryNotFoundError as exc:
        why = "HF_HUB_OFFLINE=1 forbids downloading it" if constants.HF_HUB_OFFLINE else \
            f"the hub is unreachable ({_cause(exc)})"
        raise SourceError(f"{source}: not in {where}, and {why}; download it once where the hub is reachable "
                          f"(`hf download {source}`), or give a local folder") from None
    except OSError as exc:  # the network, or the cache's disk
        raise SourceError(f"{source}: not in {where}, and it could not be downloaded ({_cause(exc)})") from None


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def describe(source: str) -> str:
    """How a source is shown in logs: the hub ID with its snapshot folder, or the folder."""
    path = resolve(source)
    return source if path == source else f"{source} ({Path(path)})"


def storage_roots(folder: str) -> list[str]:
    """Where the weights of `folder` really are: a hub snapshot's files are links into its repository's
    blobs/ (the mmapped paths name those), so that folder is added."""
    path = Path(folder).absolute()
    if path.parent.name == "snapshots" and (path.parent.parent / "blobs").is_dir():
        return [str(path), str(path.parent.parent / "blobs")]
    return [str(path)]
