"""Models by hub name: `org/name` or `org/name@revision`, resolved with huggingface_hub.

A snapshot already in the local Hugging Face cache (HF_HUB_CACHE / HF_HOME) is used with no
network at all. Otherwise it is downloaded, with a progress bar, unless the user has asked for
offline mode: config, tokenizer files and the safetensors weights with their index, never pickled
weights (*.bin, *.pt), and only the shards the index names (some repos also carry a second copy in
another layout, e.g. Mistral's consolidated.safetensors).

The command line sets HF_HUB_OFFLINE=1 for itself, so that transformers never reaches the hub of
its own accord, and says so in OFFLOADGEN_HUB_OFFLINE_DEFAULT: a hub model the user names is
still downloaded then. Offline mode that the user set (HF_HUB_OFFLINE=1 without that marker) is
honoured. Every way this can fail is one line saying what to do, raised before anything loads.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path

from ..errors import OffloadgenError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SMALL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja"]
INDEX = "model.safetensors.index.json"


def parse_hub_name(model: str) -> tuple[str, str | None] | None:
    """(repo id, revision) if `model` reads as org/name[@revision], else None."""
    repo, _, revision = model.partition("@")
    if not _REPO_ID.match(repo) or repo.endswith((".", "-")) or ".." in repo:
        return None
    return repo, revision or None


def cache_dir() -> str:
    """The hub cache, from the environment as it is now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return constants.HF_HUB_CACHE


def user_wants_offline() -> bool:
    if os.environ.get("OFFLOADGEN_HUB_OFFLINE_DEFAULT") == "1":
        return False  # the CLI's own default, not the user's
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _label(repo: str, revision: str | None) -> str:
    return f"{repo}@{revision}" if revision else repo


def cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The complete cached snapshot of repo at revision (a branch, tag or commit), without network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    try:
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir(), local_files_only=True,
                                       allow_patterns=["config.json"]))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None
    if not (folder / "config.json").is_file():
        return None
    index = folder / INDEX
    if index.is_file():  # an interrupted download leaves shards missing
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        if not all((folder / s).is_file() for s in shards):
            return None
    return folder


@contextlib.contextmanager
def _network_allowed():
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: lift the CLI's default for this call."""
    from huggingface_hub import constants
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _weight_files(api, repo: str, revision: str | None, label: str) -> list[str]:
    """The safetensors files to fetch: the index and the shards it names, or the single file."""
    from huggingface_hub import hf_hub_download
    names = [s.rfilename for s in api.model_info(repo, revision=revision).siblings or []]
    if INDEX in names:
        index = hf_hub_download(repo, INDEX, revision=revision, cache_dir=cache_dir())
        return [INDEX, *sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))]
    top = [n for n in names if n.endswith(".safetensors") and "/" not in n]
    if "model.safetensors" in top:
        return ["model.safetensors"]
    if top:
        return top
    pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    raise OffloadgenError(f"{label} has no safetensors weights" + (" (only pickled ones, which offloadgen never loads: "
                          "unpickling can run code)" if pickled else "") + "; pick a repo that ships *.safetensors")


def download(repo: str, revision: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    label = _label(repo, revision)
    try:
        with _network_allowed():
            files = _weight_files(HfApi(), repo, revision, label)
            print(f"offloadgen: downloading {label} (config, tokenizer, {len(files)} safetensors files) into the "
                  "Hugging Face cache", file=sys.stderr)
            return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir(),
                                          allow_patterns=_SMALL_FILES + files))
    except GatedRepoError:
        raise OffloadgenError(f"{label} is gated: accept its terms on its hub page, then log in (`hf auth login`) "
                              "or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise OffloadgenError(f"{repo} has no revision {revision!r}: check the branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise OffloadgenError(f"no model {repo} on the hub (a private one needs `hf auth login` or HF_TOKEN)") from None
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as e:
        raise OffloadgenError(f"cannot download {label} ({type(e).__name__}) and it is not in the local Hugging Face "
                              "cache: connect to the hub, or copy the model folder here and give its path") from None


def resolve(repo: str, revision: str | None) -> Path:
    """The local folder of a hub model: from the cache, or downloaded where allowed."""
    folder = cached_snapshot(repo, revision)
    if folder is not None:
        return folder
    if user_wants_offline():
        raise OffloadgenError(f"{_label(repo, revision)} is not in the local Hugging Face cache ({cache_dir()}) "
                              "and HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE, or download it "
                              f"first (`hf download {repo}`)")
    return download(repo, revision)
