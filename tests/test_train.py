import pytest
import torch

from mda.data.corpus import build_corpus
from mda.data.stream import Stream
from mda.model.neox import TRAINER_STATE, neox_config, new_model, save_model, step_dir
from mda.train.loop import Trainer, lr_factor, pythia_save_steps, resume, train_steps
from tests.conftest import run_stage


def test_pythia_save_schedule():
    assert pythia_save_steps(3000, 250) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512,
                                            750, 1000, 1250, 1500, 1750, 2000, 2250, 2500, 2750, 3000]
    assert pythia_save_steps(10, 4) == [0, 1, 2, 4, 8, 10]


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = [lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert f[0] == 0.1 and f[9] == 1.0
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert abs(lr_factor(100, 10, 100, 0.1) - 0.1) < 1e-12


def test_save_then_continue_is_bit_exact(tmp_path, tiny_params):
    """Train 12 steps straight vs. train 5, save, reload everything, continue 7."""
    p = tiny_params
    vocab = build_corpus(p.corpus, tmp_path / "corpus")["vocab_size"]
    stream = Stream(tmp_path / "corpus" / "stream")

    def fresh():
        model = new_model(neox_config(p.model, vocab), seed=0)
        return Trainer(model, p.pretrain, total_steps=12)

    straight = fresh()
    saved = {}

    def save(step):
        path = step_dir(tmp_path / "ckpt", step)
        save_model(straight.model, path)
        torch.save(straight.state_dict(next_step=step), path / TRAINER_STATE)
        saved[step] = path

    train_steps(straight, ((s, ids) for s, ids, _ in stream.batches(0, 11)), {5}, save, end_step=12)

    trainer, next_step = resume(saved[5], p.pretrain)
    assert next_step == 5
    train_steps(trainer, ((s, ids) for s, ids, _ in stream.batches(5, 11)), set(), lambda s: None, 12)

    a, b = straight.model.state_dict(), trainer.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert trainer.lr == straight.lr


@pytest.mark.slow
def test_checkpoints_stage_rerun_writes_the_same_bytes(trained_repo):
    """Weights, optimizer, schedule and every recorded RNG state: nothing unseeded leaks in."""
    ckpts = trained_repo / "data/checkpoints"
    first = {p.relative_to(ckpts): p.read_bytes() for p in sorted(ckpts.rglob("*")) if p.is_file()}
    res = run_stage(trained_repo, "checkpoints")
    assert res.returncode == 0, res.stderr
    assert {p.relative_to(ckpts): p.read_bytes() for p in sorted(ckpts.rglob("*")) if p.is_file()} == first


def test_release_freed_heap_returns_fragmented_pages():
    """A fixed arm's evaluations free their attention patterns between training steps; glibc kept
    those pages (RSS grew with every probe seed). 900 MiB of heap blocks freed around survivors
    every 50th block must go back to the OS."""
    psutil = pytest.importorskip("psutil")
    from mda.intervene.retrain import release_freed_heap

    rss = lambda: psutil.Process().memory_info().rss / 2**20
    blocks = [torch.ones(7 * 4096) for _ in range(8000)]  # 112 KiB each: heap, not mmap
    survivors = blocks[::50]
    del blocks
    held = rss()
    if not release_freed_heap():
        pytest.skip("no malloc_trim in this C library")
    assert rss() < held - 500, (held, rss())
    assert len(survivors) == 160
