"""Hub checkpoints are copied from a huggingface_hub cache into `out/step<N>/`, offline."""

import hashlib
import shutil

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mda.config import HubModel
from mda.errors import MdaError
from mda.model import download_hub_checkpoints, load_model, step_dir

REPO_DIR = "models--EleutherAI--pythia-14m"


def tiny_model(seed):
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32))


def add_revision(cache, revision, saved):
    """Lay out `saved` as huggingface_hub does: blobs, a snapshot of symlinks, a ref."""
    repo = cache / REPO_DIR
    commit = hashlib.sha1(revision.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        data = (saved / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(f"../../blobs/{blob.name}")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)


@pytest.fixture
def cache(tmp_path):
    models = {}
    for step in (0, 1):
        models[step] = tiny_model(seed=step)
        models[step].save_pretrained(tmp_path / f"saved{step}")
        add_revision(tmp_path / "cache", f"step{step}", tmp_path / f"saved{step}")
        shutil.rmtree(tmp_path / f"saved{step}")
    return tmp_path / "cache", models


def test_revisions_land_in_step_folders(tmp_path, cache):
    cache_dir, models = cache
    hub = HubModel(size="14m", revisions=[0, 1], cache_dir=str(cache_dir), local_files_only=True)
    done = []
    assert download_hub_checkpoints(hub, tmp_path / "out", progress=done.append) == [0, 1]
    assert done == [0, 1]
    for step, original in models.items():
        loaded = load_model(step_dir(tmp_path / "out", step)).state_dict()
        expected = original.state_dict()
        assert loaded.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(loaded[name], tensor), name


def test_missing_revision_names_repo_and_revision(tmp_path, cache):
    cache_dir, _ = cache
    hub = HubModel(size="14m", revisions=[0, 2], cache_dir=str(cache_dir), local_files_only=True)
    with pytest.raises(MdaError, match=r"EleutherAI/pythia-14m@step2: cannot fetch"):
        download_hub_checkpoints(hub, tmp_path / "out")
