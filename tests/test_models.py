import pytest
import torch

from mechmem import models
from mechmem.hooks import pattern_hook, z_hook
from mechmem.models import PYTHIA, PYTHIA_REVISIONS, ModelNotFound, load_model, pythia_spec, random_pythia


def test_registry_matches_published_pythia_shapes():
    assert (PYTHIA["1b"].n_layers, PYTHIA["1b"].n_heads, PYTHIA["1b"].d_model) == (16, 8, 2048)
    assert (PYTHIA["12b"].n_layers, PYTHIA["12b"].n_heads, PYTHIA["12b"].d_model) == (36, 40, 5120)
    assert pythia_spec("EleutherAI/pythia-2.8b-deduped").n_layers == 32
    assert PYTHIA["410m"].hf_name(deduped=False) == "EleutherAI/pythia-410m"
    assert PYTHIA_REVISIONS[0] == "step0" and PYTHIA_REVISIONS[-1] == "step143000"
    assert len(PYTHIA_REVISIONS) == 154
    with pytest.raises(ModelNotFound, match="unknown Pythia size"):
        pythia_spec("3b")


def test_local_checkpoint_loads_as_hooked_model(tiny_model):
    names = set(tiny_model.hook_dict)
    for layer in range(tiny_model.cfg.n_layers):
        assert pattern_hook(layer) in names and z_hook(layer) in names
    assert tiny_model.cfg.n_heads == 4


def test_random_pythia_has_the_size_asked_for():
    m = random_pythia("14m", device="cpu", seed=1)
    assert (m.cfg.n_layers, m.cfg.n_heads, m.cfg.d_model) == (6, 4, 128)
    assert m.mechmem_name == "random-pythia-14m-seed1"
    logits = m(torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, 50304)


def test_missing_folder_and_unreachable_hub_give_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFound, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelNotFound, match="not a local folder"):
        load_model("./does/not/exist")
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models, "_in_hub_cache", lambda name, revision: False)
    with pytest.raises(ModelNotFound, match="cannot reach the Hugging Face hub") as err:
        load_model("EleutherAI/pythia-70m-deduped")
    assert "\n" not in str(err.value) and "--local-dir" in str(err.value)
    with pytest.raises(ModelNotFound, match="unknown Pythia revision"):
        load_model("EleutherAI/pythia-70m-deduped", revision="step7")


def test_an_uncached_revision_is_in_the_download_command(monkeypatch):
    """The hint for a hub model at a revision fetches that revision, not the final weights."""
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models, "_in_hub_cache", lambda name, revision: False)
    with pytest.raises(ModelNotFound) as err:
        load_model("EleutherAI/pythia-70m-deduped", revision="step1000")
    message = str(err.value)
    assert "'EleutherAI/pythia-70m-deduped' at revision step1000" in message and "\n" not in message
    assert f"`{models.download_command('EleutherAI/pythia-70m-deduped', 'step1000')}`" in message
    assert "download EleutherAI/pythia-70m-deduped --revision step1000 --local-dir DIR` and pass DIR in place of " \
           "the name and --revision" in message
    with pytest.raises(ModelNotFound) as err:
        load_model("EleutherAI/pythia-70m-deduped")
    assert "--revision" not in str(err.value) and str(err.value).endswith("--local-dir DIR` and pass DIR")


@pytest.mark.parametrize("installed, cli", [("0.30.2", "huggingface-cli"), ("0.34.0", "hf"), ("2.4.0", "hf")])
def test_the_download_command_is_the_installed_hub_clients(monkeypatch, installed, cli):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed)
    assert models.download_command("org/m", "step1") == f"{cli} download org/m --revision step1 --local-dir DIR"
    assert models.download_command("org/m") == f"{cli} download org/m --local-dir DIR"


def test_blocks_to_offload_keeps_on_the_gpu_what_processing_fits():
    blocks, other, overhead = [10, 10, 10, 10], 5, 3.0  # processing needs 4x what it holds
    assert models.blocks_to_offload(blocks, other, free_bytes=4 * 45, overhead=overhead) == []
    assert models.blocks_to_offload(blocks, other, free_bytes=4 * 45 - 1, overhead=overhead) == [3]
    assert models.blocks_to_offload(blocks, other, free_bytes=4 * 25, overhead=overhead) == [2, 3]
    assert models.blocks_to_offload(blocks, other, free_bytes=0, overhead=overhead) == [0, 1, 2, 3]


def test_compatibility_mode_with_blocks_offloaded_processes_the_same_weights():
    """The CPU stands in for the GPU here (the move itself is checked on an H200 by
    benchmarks/compat_offload.py): the offload path must give the weights the plain one gives."""
    plain = random_pythia("14m", device="cpu", seed=3, compatibility_mode=False)
    split = random_pythia("14m", device="cpu", seed=3, compatibility_mode=False)
    assert models.enable_compatibility_mode(plain, "cpu") == []
    kept = models.param_bytes(split) - 2 * models.param_bytes(split.blocks[0])
    fits = int((1 + models.PROCESSING_OVERHEAD[torch.float32]) * kept)
    assert models.enable_compatibility_mode(split, "cpu", free_bytes=fits) == [4, 5]
    assert split.compatibility_mode and plain.compatibility_mode
    a, b = plain.state_dict(), split.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    unprocessed = random_pythia("14m", device="cpu", seed=3, compatibility_mode=False).state_dict()
    assert any(not torch.equal(a[k], unprocessed[k]) for k in a)  # processing did change weights
