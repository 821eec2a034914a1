"""Hub checkpoints are copied from a huggingface_hub cache into `out/step<N>/`, offline (fixture `cache` in conftest)."""

import pytest
import torch

from mda.core.config import HubModel
from mda.core.errors import MdaError
from mda.model.neox import download_hub_checkpoints, load_model, step_dir


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
