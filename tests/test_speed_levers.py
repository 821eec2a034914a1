"""The speed levers of the training loop change no bits (benchmarks/default.py measures their gain).

References: PyTorch's own per-parameter AdamW and clipping loops (`foreach=False`, what the loop
used before), and PyTorch's NaN fill of new memory under deterministic algorithms (before).
"""

import io
from contextlib import contextmanager

import pytest
import torch

from mda.core.config import ProbeSettings
from mda.model.losses import token_losses
from mda.units.measure import checkpoint_metrics
from mda.units.probes import probe_tokens
from mda.model.neox import neox_config, new_model
from mda.train.loop import Trainer, deterministic

VOCAB = 2067  # the synthetic corpus's vocabulary: the default model's shapes


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def nan_fill(on: bool):
    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = on
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]


def default_trainer(params, **kwargs) -> Trainer:
    return Trainer(new_model(neox_config(params.model, VOCAB), seed=0), params.pretrain, total_steps=100, **kwargs)


def batches(params, n: int, seed: int = 0, rows: int = 4) -> list[torch.Tensor]:
    """`n` steps of `rows` default-length rows (fewer rows than the default's 16: seconds, same kernels)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (rows, params.corpus.seq_len + 1), generator=g) for _ in range(n)]


def assert_same_state(a: Trainer, b: Trainer) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for i in sa:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_foreach_kernels_give_the_bits_of_the_per_parameter_loops(params, n_threads):
    """Default model, weight decay on, clipping active at every step (a tiny max norm)."""
    recipe = params.pretrain.model_copy(update={"grad_clip": 0.05, "warmup_steps": 2})
    p = params.model_copy(update={"pretrain": recipe})
    with threads(n_threads):
        loops, multi = default_trainer(p, foreach=False), default_trainer(p)
        assert all(g["foreach"] for g in multi.optimizer.param_groups)
        for ids in batches(p, 8):
            assert loops.step(ids) == multi.step(ids)
        assert_same_state(loops, multi)


def test_a_state_saved_by_the_loops_resumes_on_foreach_kernels(params):
    loops = default_trainer(params, foreach=False)
    for ids in batches(params, 3):
        loops.step(ids)
    resumed = default_trainer(params)
    resumed.model.load_state_dict(loops.model.state_dict())
    saved = io.BytesIO()  # as a checkpoint holds it: a copy, not the live optimizer tensors
    torch.save(loops.state_dict(next_step=3), saved)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=False))
    assert all(g["foreach"] for g in resumed.optimizer.param_groups)
    more = batches(params, 4, seed=1)
    for ids in more:
        loops.step(ids)
        resumed.step(ids)
    assert_same_state(loops, resumed)


def test_no_nan_fill_trains_and_evaluates_to_the_same_bits(params):
    """Training steps, the chunked-vocabulary loss (it allocates with torch.empty) and the full
    head metrics, with PyTorch's NaN fill of new memory and without."""
    out = {}
    for fill in (True, False):
        with nan_fill(fill):
            trainer = default_trainer(params)
            losses = [trainer.step(ids) for ids in batches(params, 6)]
            model = trainer.model
            ids = batches(params, 1, seed=2)[0][:4]
            model.zero_grad()
            chunked = token_losses(model, ids, budget=64 * VOCAB)  # 64 positions per chunk
            chunked.sum().backward()
            grad = model.get_output_embeddings().weight.grad.clone()
            model.eval()
            probe = probe_tokens(ProbeSettings(sequences=4, half_len=16, seed=1), model.config, VOCAB)
            heads, row = checkpoint_metrics(model, probe, batches(params, 1, seed=3)[0], 1024, full=True)
            out[fill] = (losses, model.state_dict(), chunked.detach(), grad, heads, row)
    a, b = out[True], out[False]
    assert a[0] == b[0]
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert a[4].equals(b[4]) and a[5] == b[5]


@pytest.mark.parametrize("n_threads", [1, 2])
def test_heldout_loss_in_chunks_is_the_one_forward_loss(params, n_threads):
    """`checkpoint_metrics` scores held-out rows HELDOUT_ROWS_PER_FORWARD at a time; the reference
    is one forward of all rows (what it did before), on the default model and held-out size."""
    from mda.units.measure import HELDOUT_ROWS_PER_FORWARD
    from mda.units.metrics import icl_score

    model = default_trainer(params).model.eval()
    heldout = torch.randint(2, VOCAB, (params.locate.heldout_rows, params.corpus.seq_len + 1),
                            generator=torch.Generator().manual_seed(4))
    assert len(heldout) > HELDOUT_ROWS_PER_FORWARD
    probe = probe_tokens(ProbeSettings(sequences=4, half_len=16, seed=1), model.config, VOCAB)
    with threads(n_threads), torch.no_grad():
        whole = token_losses(model, heldout)
        _, row = checkpoint_metrics(model, probe, heldout, params.locate.max_sequences, full=False)
    assert row == {"heldout_loss": whole.mean().item(), "icl_score": icl_score(whole)}


def test_deterministic_keeps_deterministic_kernels_and_drops_the_fill():
    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    try:
        deterministic("cpu")
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]


@pytest.fixture
def params():
    from pathlib import Path

    from mda.core.config import load_params

    return load_params(Path(__file__).resolve().parents[1] / "params.yaml")
