"""Models by hub name (org/name[@revision]): from a cache laid out as huggingface_hub lays it out,
with HF_HUB_OFFLINE=1; the clear errors; what a download would fetch (the hub itself is mocked)."""
import json
import shutil
from types import SimpleNamespace

import huggingface_hub
import pytest

from offloadgen.checkpoint import open_checkpoint
from offloadgen.checkpoint import hub
from offloadgen.errors import OffloadgenError

MAIN, OLD = "a" * 40, "b" * 40


def snapshot(cache, repo, sha, source, refs=(), layers=None):
    """Copy a model folder into the cache as snapshot `sha`, pointed at by each ref in `refs`."""
    root = cache / f"models--{repo.replace('/', '--')}"
    folder = root / "snapshots" / sha
    shutil.copytree(source, folder)
    if layers is not None:  # tell snapshots apart: a config that reads fewer layers is still complete
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"num_hidden_layers": layers}))
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(sha)
    return folder


@pytest.fixture
def cache(tiny, tmp_path, monkeypatch):
    """org/tiny in a fresh hub cache: main (3 layers) and tag v1 (2 layers, an older commit)."""
    _, source = tiny("llama2-mha")
    cache = tmp_path / "hf" / "hub"
    snapshot(cache, "org/tiny", MAIN, source, refs=["main"])
    snapshot(cache, "org/tiny", OLD, source, refs=["v1"], layers=2)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OFFLOADGEN_HUB_OFFLINE_DEFAULT", raising=False)

    def no_network(*a, **k):
        raise AssertionError("the hub was asked although the model is cached or offline mode is on")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    return cache


def test_cached_model_loads_without_network(cache):
    ckpt = open_checkpoint("org/tiny")
    assert ckpt.path == cache / "models--org--tiny" / "snapshots" / MAIN
    assert ckpt.name == "tiny" and ckpt.cfg.n_layers == 3


@pytest.mark.parametrize("revision,layers", [(OLD, 2), ("v1", 2), ("main", 3), (MAIN, 3)])
def test_revision_pins_a_snapshot(cache, revision, layers):
    ckpt = open_checkpoint(f"org/tiny@{revision}")
    assert ckpt.cfg.n_layers == layers


def test_not_cached_and_offline_is_one_clear_line(cache):
    with pytest.raises(OffloadgenError, match=r"org/other is not in the local Hugging Face cache .*HF_HUB_OFFLINE=1"):
        open_checkpoint("org/other")
    with pytest.raises(OffloadgenError, match=r"org/tiny@v9 is not in the local"):
        open_checkpoint("org/tiny@v9")


def test_cli_says_it_in_one_line_and_exits_2(cache, capsys):
    from offloadgen.cli import main
    assert main(["generate", "org/other", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "org/other" in err and "hf download org/other" in err


def test_local_folder_named_like_a_hub_model_wins(cache, tiny, tmp_path, monkeypatch):
    _, source = tiny("opt")
    shutil.copytree(source, tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert open_checkpoint("org/tiny").cfg.family == "opt"


def test_interrupted_download_is_not_taken_for_a_snapshot(cache):
    folder = cache / "models--org--tiny" / "snapshots" / MAIN
    (folder / hub.INDEX).write_text(json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}}))
    assert hub.cached_snapshot("org/tiny", None) is None


def test_names_that_are_not_hub_names():
    assert hub.parse_hub_name("org/name@v1.0") == ("org/name", "v1.0")
    for name in ("./org/name", "/abs/path", "a/b/c", "org/", "name", "org/name/"):
        assert hub.parse_hub_name(name) is None


# -- downloads, with the hub mocked: the CLI's default offline mode is not the user's ----------------

def fake_hub(monkeypatch, files, index=None, error=None):
    monkeypatch.setenv("OFFLOADGEN_HUB_OFFLINE_DEFAULT", "1")  # as the CLI sets it
    fetched = {}

    def model_info(self, repo, revision=None):
        if error is not None:
            raise error
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in files])

    def hf_hub_download(repo, filename, revision=None, cache_dir=None):
        path = hub.Path(cache_dir) / "index.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(index))
        return str(path)

    def snapshot_download(repo, revision=None, cache_dir=None, allow_patterns=None, **kw):
        if kw.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        fetched["patterns"] = allow_patterns
        raise OSError("stop here: nothing is downloaded in tests")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return fetched


def test_download_fetches_config_tokenizer_and_indexed_shards_only(cache, monkeypatch):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    files = ["config.json", "tokenizer.json", hub.INDEX, *shards, "consolidated.safetensors", "pytorch_model.bin"]
    fetched = fake_hub(monkeypatch, files, index={"weight_map": {"a": shards[0], "b": shards[1]}})
    with pytest.raises(OffloadgenError, match="cannot download org/big"):
        open_checkpoint("org/big")
    patterns = fetched["patterns"]
    assert set(shards) | {hub.INDEX, "config.json", "tokenizer.json"} <= set(patterns)
    assert "consolidated.safetensors" not in patterns and not any(p.endswith((".bin", ".pt", "*")) for p in patterns)


def test_repo_without_safetensors(cache, monkeypatch):
    fake_hub(monkeypatch, ["config.json", "pytorch_model.bin"])
    with pytest.raises(OffloadgenError, match=r"org/pickled has no safetensors weights \(only pickled"):
        open_checkpoint("org/pickled")


def test_gated_repo_without_token(cache, monkeypatch):
    response = SimpleNamespace(headers={}, request=None)
    fake_hub(monkeypatch, [], error=huggingface_hub.errors.GatedRepoError("401", response=response))
    with pytest.raises(OffloadgenError, match=r"org/gated is gated: accept its terms .*HF_TOKEN"):
        open_checkpoint("org/gated")
