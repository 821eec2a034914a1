"""The trajectory estimator (`mda.attribute.trajectory`) against the `ekfac` path: a window of one
segment is EK-FAC at that checkpoint; a longer window is, segment by segment, EK-FAC at each
segment's own checkpoint over its own samples."""

import numpy as np
import pytest
import torch

from mda.core.compute import Runtime
from mda.core.config import Influence
from mda.core.errors import MdaError

from mda.attribute.trajectory import segments, trajectory_scores

RT = Runtime(device=torch.device("cpu"), dtype=torch.float32, micro_batch=None, threads=1)
INF = Influence(factor_samples=0, batch_size=16, probe_sequences=4, probe_half_len=8, token_samples=0)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A tiny corpus and three different models saved as the checkpoints at steps 0, 4 and 8."""
    from tests.conftest import TINY, REPO, deep_update
    import yaml
    from mda.core.config import parse_params
    from mda.data.corpus import build_corpus
    from mda.model.neox import neox_config, new_model, save_model, step_dir

    root = tmp_path_factory.mktemp("trajectory")
    params = parse_params(deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), TINY))
    vocab = build_corpus(params.corpus, root / "corpus")["vocab_size"]
    for i, step in enumerate((0, 4, 8)):
        model = new_model(neox_config(params.model, vocab), seed=i)
        with torch.no_grad():  # peaked, head-specific attention rather than near-uniform init
            for block in model.gpt_neox.layers:
                block.attention.query_key_value.weight.add_(0.3 * torch.randn_like(block.attention.query_key_value.weight))
        save_model(model, step_dir(root / "ckpts", step))
    return root


def targets(start, end, influence_step):
    return {"unit": "induction", "heads": [{"name": "L1H0", "layer": 1, "head": 0}],
            "window": {"start": start, "end": end}, "influence_step": influence_step}


def ekfac(root, start, end, checkpoint):
    """The `ekfac` estimator's path (factors → preconditioned probe → streamed scores) at `checkpoint`."""
    from mda.data.stream import Stream
    from mda.attribute.ekfac import fit_ekfac
    from mda.attribute.factors import WindowSource, factor_subset
    from mda.attribute.scoring import preconditioned_probe, scores_streaming
    from mda.attribute.window import setup

    stream = Stream(root / "corpus" / "stream")
    s = setup(INF, root / "ckpts", targets(start, end, checkpoint), RT)
    factors = fit_ekfac(s.model, WindowSource(factor_subset(INF, s, stream), stream), s.all_blocks,
                        fisher=INF.fisher, alpha=INF.damping, seed=INF.label_seed, where=s.where, rt=RT)
    return scores_streaming(INF, s, stream, preconditioned_probe(INF, s, factors)).set_index("sample_id").score


def test_segments_run_from_each_saved_checkpoint_to_the_next():
    assert segments([0, 1, 2, 4, 8, 12], 4, 12) == [(4, 4, 7), (8, 8, 11)]
    assert segments([0, 4, 8], 8, 9) == [(8, 8, 8)]
    with pytest.raises(MdaError, match="window start 3 is not a saved checkpoint"):
        segments([0, 4, 8], 3, 9)


def test_one_segment_is_ekfac_at_that_checkpoint(checkpointed):
    from mda.data.stream import Stream

    stream = Stream(checkpointed / "corpus" / "stream")
    got = trajectory_scores(INF, checkpointed / "ckpts", targets(8, 12, 12), stream, RT).set_index("sample_id")
    assert set(got.checkpoint) == {8}
    expected = ekfac(checkpointed, 8, 12, 8)
    assert list(got.index) == list(expected.index)
    np.testing.assert_allclose(got.score.to_numpy(), expected.to_numpy(), rtol=1e-12, atol=0)


def test_each_segment_is_ekfac_at_its_own_checkpoint(checkpointed):
    from mda.data.stream import Stream

    stream = Stream(checkpointed / "corpus" / "stream")
    got = trajectory_scores(INF, checkpointed / "ckpts", targets(0, 12, 12), stream, RT).set_index("sample_id")
    assert sorted(set(got.checkpoint)) == [0, 4, 8] and len(got) == 12 * 4
    for checkpoint, first, end in ((0, 0, 4), (4, 4, 8), (8, 8, 12)):
        expected = ekfac(checkpointed, first, end, checkpoint)
        seg = got[got.checkpoint == checkpoint]
        np.testing.assert_allclose(seg.score.to_numpy(), expected.loc[seg.index].to_numpy(), rtol=1e-12, atol=0)
    # Each checkpoint's model differs, so scoring every sample at the window end would disagree.
    at_end = ekfac(checkpointed, 0, 12, 8)
    assert not np.allclose(got.score.to_numpy(), at_end.loc[got.index].to_numpy(), rtol=1e-3)
