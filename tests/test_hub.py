"""meganeura.hub: local directories and the Hugging Face cache layout, never the network."""
import os
import time

import pytest

from meganeura import hub
from meganeura.hub import HubError, resolve, resolve_config

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def add_snapshot(cache, repo_id, commit, ref=None, files=("config.json", "model.safetensors", "tokenizer.json")):
    """Lay out models--org--name/{blobs,snapshots/<commit>,refs/<ref>} as huggingface_hub does."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in files:
        blob = repo / "blobs" / f"{commit[:8]}-{name}"
        blob.write_text(f"{name} at {commit}")
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snap / name)
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return str(snap)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    c = tmp_path / "hub"
    c.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HOME", raising=False)
    return c


def test_local_directory_and_config_path(tmp_path, cache):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert resolve(str(d)) == str(d)
    assert resolve(str(d / "config.json")) == str(d)
    assert resolve(str(d) + "/") == str(d)


def test_relative_and_home_paths(tmp_path, cache, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve("./ckpt") == str(tmp_path / "ckpt")
    assert resolve("ckpt") == str(tmp_path / "ckpt")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve("~/ckpt") == str(tmp_path / "ckpt")


def test_missing_local_directory(tmp_path, cache, monkeypatch):
    for missing in [str(tmp_path / "nope"), "./nope", "~/surely-not-here-4f1c", "../nope/x"]:
        with pytest.raises(HubError, match="no such model directory: " + missing.replace(".", r"\.")):
            resolve(missing)
    # a path whose first component exists is a path, not a repo id
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError, match="no such model directory: models/llama"):
        resolve("models/llama")


def test_other_file_is_not_a_model(tmp_path, cache):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"")
    with pytest.raises(HubError, match="not a model directory"):
        resolve(str(f))


def test_repo_id_through_refs(cache):
    snap = add_snapshot(cache, "org/tiny", COMMIT_A, ref="main")
    add_snapshot(cache, "org/tiny", COMMIT_B)  # an older download nobody points at
    assert resolve("org/tiny") == snap
    assert os.path.isfile(os.path.join(resolve("org/tiny"), "config.json"))
    assert open(os.path.join(snap, "config.json")).read() == f"config.json at {COMMIT_A}"


def test_revision_branch_tag_and_commit(cache):
    main = add_snapshot(cache, "org/tiny", COMMIT_A, ref="main")
    v1 = add_snapshot(cache, "org/tiny", COMMIT_B, ref="v1.0")
    assert resolve("org/tiny@main") == main
    assert resolve("org/tiny@v1.0") == v1
    assert resolve(f"org/tiny@{COMMIT_B}") == v1
    with pytest.raises(HubError, match="org/tiny is not in the local Hugging Face cache"):
        resolve("org/tiny@v2.0")


def test_snapshot_without_refs(cache):
    old = add_snapshot(cache, "org/tiny", COMMIT_A)
    assert resolve("org/tiny") == old
    new = add_snapshot(cache, "org/tiny", COMMIT_B)
    t = time.time()
    os.utime(old, (t - 100, t - 100))
    os.utime(new, (t, t))
    assert resolve("org/tiny") == new
    os.utime(old, (t + 100, t + 100))
    assert resolve("org/tiny") == old


def test_snapshot_needs_config_json(cache):
    add_snapshot(cache, "org/partial", COMMIT_A, ref="main", files=("model.safetensors",))
    with pytest.raises(HubError, match="org/partial is not in the local Hugging Face cache"):
        resolve("org/partial")
    # a dangling symlink (blob missing) does not count either
    snap = add_snapshot(cache, "org/dangling", COMMIT_A, ref="main")
    os.remove(os.path.join(cache, "models--org--dangling", "blobs", f"{COMMIT_A[:8]}-config.json"))
    with pytest.raises(HubError, match="org/dangling is not in"):
        resolve("org/dangling")
    assert os.path.islink(os.path.join(snap, "config.json"))


def test_hf_home_fallback(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    snap = add_snapshot(tmp_path / "hfhome" / "hub", "org/tiny", COMMIT_A, ref="main")
    assert hub.cache_dir() == str(tmp_path / "hfhome" / "hub")
    assert resolve("org/tiny", offline=True) == snap


def test_default_cache_is_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.cache_dir() == str(tmp_path / ".cache" / "huggingface" / "hub")


def test_missing_repo_offline_names_id_and_cache(cache, monkeypatch):
    with pytest.raises(HubError) as e:
        resolve("org/absent")
    msg = str(e.value)
    assert "org/absent" in msg and str(cache) in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg
    # offline=True wins over the environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(HubError, match="downloads are off"):
        resolve("org/absent", offline=True)


def test_online_download_failure_is_one_line(cache, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def fail(repo_id, **kw):
        calls.append((repo_id, kw))
        raise OSError("Connection refused\nmore detail\nand more")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(HubError) as e:
        resolve("org/absent@dev")
    msg = str(e.value)
    assert msg.startswith(f"org/absent is not in the local Hugging Face cache ({cache}) and could not be downloaded: ")
    assert "Connection refused" in msg and "\n" not in msg
    repo_id, kw = calls[0]
    assert repo_id == "org/absent" and kw["revision"] == "dev" and kw["cache_dir"] == str(cache)
    assert set(kw["allow_patterns"]) >= {"*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"}


def test_online_download_success(cache, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    snap = str(cache / "fetched")

    def fetch(repo_id, **kw):
        os.makedirs(snap)
        open(os.path.join(snap, "config.json"), "w").close()
        return snap

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    assert resolve("org/new", offline=False) == snap


def test_config_alone(tmp_path, cache):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert resolve_config(str(d)) == str(d / "config.json")
    named = tmp_path / "gemma-config.json"
    named.write_text("{}")
    assert resolve_config(str(named)) == str(named)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(HubError, match="config .json"):
        resolve_config(str(tmp_path / "weights.safetensors"))
    # a snapshot holding only config.json (what a dry run fetches) serves a dry run, not a run
    snap = add_snapshot(cache, "org/cfg", COMMIT_A, ref="main", files=("config.json",))
    assert resolve_config("org/cfg") == os.path.join(snap, "config.json")
    with pytest.raises(HubError, match="org/cfg is not in the local Hugging Face cache"):
        resolve("org/cfg")
    with pytest.raises(HubError, match="downloads are off"):
        resolve_config("org/absent")


def test_online_config_alone_fetches_one_file(cache, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fetch(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw))
        (cache / "snap").mkdir()
        (cache / "snap" / "config.json").write_text("{}")
        return str(cache / "snap" / "config.json")

    def whole(*args, **kw):
        raise AssertionError("a dry run downloads the whole snapshot")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fetch)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", whole)
    assert resolve_config("org/new@dev", offline=False) == str(cache / "snap" / "config.json")
    assert calls == [("org/new", "config.json", {"revision": "dev", "cache_dir": str(cache)})]


@pytest.mark.parametrize("bad", ["a b", "too/many/slashes", "org/", "org/na me", "org/x@", "gpt2", ""])
def test_neither_path_nor_repo_id(bad, cache):
    with pytest.raises(HubError) as e:
        resolve(bad)
    assert bad in str(e.value) and "\n" not in str(e.value)
