"""Where a model lives: a local checkpoint directory, or a Hugging Face repo id found in (or fetched into) the HF cache.

`resolve` turns what a user typed into a directory holding config.json, safetensors and tokenizer files.
The local Hugging Face cache is read directly (its layout is stable and documented), so a model that is
already downloaded loads with no network and without importing huggingface_hub; only a missing model is
downloaded, with huggingface_hub's own progress bars. Environment variables are read at call time so
tests and users can redirect the cache or turn downloads off per call.
"""
from __future__ import annotations

import os
import re

DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,95}"
_REPO_ID = re.compile(rf"({_NAME}/{_NAME})(?:@([^\s@]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "true", "yes", "on"}


class HubError(ValueError):
    """The model named cannot be found locally, in the Hugging Face cache, or on the Hub."""


def cache_dir() -> str:
    """The Hugging Face hub cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")


def resolve(model: str, *, offline: bool | None = None) -> str:
    """Return a local directory holding the model's config.json and weights, or a .gguf file.

    model: a directory (one holding a single .gguf file and no safetensors stands for that file), a
    config.json path, a .gguf file, or a repo id "org/name" with an optional "@revision".
    offline: None follows HF_HUB_OFFLINE; True never downloads; False downloads what the cache lacks.
    """
    model = os.fspath(model)
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return _only_gguf(os.path.abspath(path)) or os.path.abspath(path)
    if os.path.isfile(path):
        if os.path.basename(path) == "config.json":
            return os.path.dirname(os.path.abspath(path))
        if path.endswith(".gguf"):
            return os.path.abspath(path)
        raise HubError(f"not a model directory (expected a directory, its config.json or a .gguf file): {model}")
    repo_id, revision = _repo_id(model)
    return _from_hub(repo_id, revision, offline, config_only=False)


def _only_gguf(directory: str) -> str | None:
    """The one .gguf file of a directory that holds no safetensors (None if there is none or several)."""
    files = os.listdir(directory)
    ggufs = [f for f in files if f.endswith(".gguf") and os.path.isfile(os.path.join(directory, f))]
    if len(ggufs) != 1 or any(f.endswith(".safetensors") for f in files):
        return None
    return os.path.join(directory, ggufs[0])


def resolve_config(model: str, *, offline: bool | None = None) -> str:
    """Return the path of a model's config.json, reading no weights: a directory's config.json, a JSON file
    as it is, or a repo id's config.json from the cache, else fetched alone (not the whole snapshot)."""
    model = os.fspath(model)
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return os.path.join(os.path.abspath(path), "config.json")
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            raise HubError(f"memory plans are made from a config.json; a .gguf file is not planned: {model}")
        if not path.endswith(".json"):
            raise HubError(f"not a model directory or a config .json file: {model}")
        return os.path.abspath(path)
    repo_id, revision = _repo_id(model)
    return os.path.join(_from_hub(repo_id, revision, offline, config_only=True), "config.json")


def _repo_id(model: str) -> tuple[str, str | None]:
    if _looks_like_path(model):
        raise HubError(f"no such model directory: {model}")
    m = _REPO_ID.fullmatch(model)
    if not m or ".." in model or "--" in m.group(1):
        raise HubError(f"not a model directory or a Hugging Face repo id (org/name[@revision]): {model!r}")
    return m.group(1), m.group(2)


def _from_hub(repo_id: str, revision: str | None, offline: bool | None, config_only: bool) -> str:
    cache = cache_dir()
    found = cached_snapshot(repo_id, revision, cache, weights=not config_only)
    if found:
        return found
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    if offline:
        raise HubError(f"{repo_id} is not in the local Hugging Face cache ({cache}) "
                       "and downloads are off (HF_HUB_OFFLINE)")
    return _download(repo_id, revision, cache, config_only)


def _looks_like_path(model: str) -> bool:
    """Paths are told from repo ids by their start, or by a first component that exists on disk."""
    if model.startswith(("/", ".", "~")):
        return True
    head = model.split("/", 1)[0]
    return "/" in model and os.path.exists(head)


def cached_snapshot(repo_id: str, revision: str | None = None, cache: str | None = None,
                    weights: bool = True) -> str | None:
    """The cached snapshot directory of repo_id at revision (branch, tag or commit), or None.

    A snapshot counts only if it has config.json (a followed symlink into blobs/) and, with `weights`,
    safetensors, so half-finished downloads (or a config fetched alone) are not mistaken for models.
    Without a revision and without refs/main, the newest complete snapshot is used.
    """
    repo = os.path.join(cache or cache_dir(), "models--" + repo_id.replace("/", "--"))
    snapshots = os.path.join(repo, "snapshots")
    rev = revision or "main"
    commit = rev if _COMMIT.fullmatch(rev) else _read_ref(os.path.join(repo, "refs", rev))
    if commit is not None:
        snap = os.path.join(snapshots, commit)
        return snap if _complete(snap, weights) else None
    if revision is not None or not os.path.isdir(snapshots):
        return None
    complete = [os.path.join(snapshots, d) for d in os.listdir(snapshots)
                if _complete(os.path.join(snapshots, d), weights)]
    return max(complete, key=os.path.getmtime) if complete else None


def _read_ref(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _complete(snapshot: str, weights: bool = False) -> bool:
    if not os.path.isfile(os.path.join(snapshot, "config.json")):
        return False
    return not weights or any(f.endswith(".safetensors") and os.path.isfile(os.path.join(snapshot, f))
                              for f in os.listdir(snapshot))


def _download(repo_id: str, revision: str | None, cache: str, config_only: bool = False) -> str:
    where = f"{repo_id} is not in the local Hugging Face cache ({cache}) and could not be downloaded"
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(f"{where}: huggingface_hub is not installed") from None
    try:
        if config_only:
            path = os.path.dirname(huggingface_hub.hf_hub_download(repo_id, "config.json", revision=revision,
                                                                   cache_dir=cache))
        else:
            path = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                                     allow_patterns=DOWNLOAD_PATTERNS)
    except Exception as e:  # no network, 404, gated, disk full: all become one line for the user
        raise HubError(f"{where}: {_reason(e, revision)}") from e
    if not _complete(path):
        raise HubError(f"{repo_id} was downloaded to {path} but has no config.json; is it a model repo?")
    return path


def _reason(e: Exception, revision: str | None) -> str:
    """A short reason for a failed download; huggingface_hub's own messages span many lines."""
    kinds = {c.__name__ for c in type(e).__mro__}
    if "GatedRepoError" in kinds:
        return "the repo is gated (accept its terms on huggingface.co and log in with `hf auth login`)"
    if "RevisionNotFoundError" in kinds:
        return f"revision {revision!r} not found"
    if "RepositoryNotFoundError" in kinds:
        return "repo not found (or private: log in with `hf auth login`)"
    if kinds & {"LocalEntryNotFoundError", "ConnectError", "ConnectionError", "TimeoutException", "Timeout"}:
        return "cannot reach huggingface.co"
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."
