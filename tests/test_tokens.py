"""Token-level attribution (mda.attribute.tokens): the split is exact, against the scoring path and
against a plain backward; the induction-predictable definition, against a loop and by hand."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mda.core.config import Influence
from mda.model.heads import Head, head_blocks
from mda.attribute.tokens import induction_predictable, token_contributions, token_sets, token_table
from mda.attribute.token_stats import predictable_share, target_contributions
from mda.intervene.selection import union_scores


# ----------------------------------------------------------------------------- predictable positions
def test_predictable_positions_by_hand():
    # inputs 3 5 3 7 5 3 (next tokens 5 3 7 5 3 7):
    # t=2: 3 seen at 0, followed by 5; next is 7 → no.  t=4: 5 seen at 1, followed by 3; next is 3 → yes.
    # t=5: 3 seen at 0 and 2; the latest (2) was followed by 7; next is 7 → yes.
    ids = torch.tensor([[3, 5, 3, 7, 5, 3, 7]])
    assert induction_predictable(ids)[0].tolist() == [False, False, False, False, True, True]
    # The *latest* earlier occurrence decides (the induction probe's target): 3 at t=4 was last
    # followed by 7, so the next token 5 (which followed its first occurrence) is not predictable.
    ids = torch.tensor([[3, 5, 3, 7, 3, 5]])
    assert induction_predictable(ids)[0].tolist() == [False, False, False, False, False]


def test_predictable_positions_match_a_loop():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (20, 17), generator=gen)  # small vocabulary: many repeats
    expected = torch.zeros(20, 16, dtype=torch.bool)
    for r in range(20):
        x = ids[r].tolist()
        for t in range(16):
            earlier = [j for j in range(t) if x[j] == x[t]]
            expected[r, t] = bool(earlier) and x[earlier[-1] + 1] == x[t + 1]
    got = induction_predictable(ids)
    assert torch.equal(got, expected) and 0 < got.float().mean() < 1


# ----------------------------------------------------------------------------- the split is exact
@pytest.fixture(scope="module")
def influence_world(tmp_path_factory):
    """A tiny corpus and a float64 model with peaked attention, its factors and H⁻¹∇f."""
    import yaml

    from mda.core.compute import Runtime
    from mda.core.config import parse_params
    from mda.data.corpus import build_corpus
    from mda.data.stream import Stream
    from mda.attribute.factors import fit_factors, load_factors
    from mda.attribute.scoring import preconditioned_probe
    from mda.attribute.window import setup
    from mda.model.neox import neox_config, new_model, save_model, step_dir
    from tests.conftest import REPO, TINY, deep_update

    params = parse_params(deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), TINY))
    tmp = tmp_path_factory.mktemp("tokens")
    vocab = build_corpus(params.corpus, tmp / "corpus")["vocab_size"]
    model = new_model(neox_config(params.model, vocab), seed=0)
    with torch.no_grad():  # peaked, head-specific attention rather than near-uniform init
        for block in model.gpt_neox.layers:
            block.attention.query_key_value.weight.add_(0.3 * torch.randn_like(block.attention.query_key_value.weight))
    save_model(model, step_dir(tmp / "ckpts", 12))
    targets = {"unit": "induction", "heads": [{"name": "L1H0", "layer": 1, "head": 0},
                                              {"name": "L1H1", "layer": 1, "head": 1}],
               "window": {"start": 0, "end": 12}, "influence_step": 12}
    inf = Influence(factor_samples=0, batch_size=16, probe_sequences=4, probe_half_len=8)
    rt = Runtime(device=torch.device("cpu"), dtype=torch.float32, micro_batch=None, threads=1)
    s = setup(inf, tmp / "ckpts", targets, rt, dtype=torch.float64)
    stream = Stream(tmp / "corpus" / "stream")
    fit_factors(inf, s, stream, tmp / "factors")
    vectors = preconditioned_probe(inf, s, load_factors(tmp / "factors", s))
    return inf, s, stream, vectors


def test_token_contributions_sum_to_the_scoring_paths_score(influence_world):
    """Σ_t c_t equals `score_batch` (the streaming scorer: gradients rounded to the float32 cache)
    to 1e-6, and equals −⟨∇L(z), V⟩ from a plain backward of each row's summed cross-entropy on
    the float64 model (no hooks) to 1e-10."""
    from mda.attribute.scoring import score_batch

    inf, s, stream, vectors = influence_world
    ids = torch.from_numpy(next(iter(stream.batches(0, 0)))[1])
    ids = torch.cat([ids, torch.from_numpy(next(iter(stream.batches(5, 5)))[1])])  # 8 rows
    split = token_contributions(s, ids, vectors)
    per_block = score_batch(inf, s, ids, vectors)
    for head in ("L1H0", "L1H1"):
        total = split[head].sum(1)
        assert split[head].shape == (len(ids), ids.shape[1] - 1)
        scored = sum(v for name, v in per_block.items() if name.startswith(head + "/"))
        np.testing.assert_allclose(total, scored, rtol=1e-6, atol=1e-6 * np.abs(scored).max())
        # Independent reference: per row, the full weight gradient of its loss, sliced to the head.
        blocks = head_blocks(s.model.config, Head(1, int(head[-1])))
        for r in range(len(ids)):
            s.model.zero_grad()
            for p in s.model.parameters():
                p.requires_grad_(True)
            row = ids[r]
            F.cross_entropy(s.model(input_ids=row[None, :-1]).logits[0], row[1:], reduction="sum").backward()
            exact = -sum((b.slice_grad(b.linear(s.model).weight.grad).double() * vectors[b.name]).sum().item()
                         for b in blocks)
            assert total[r] == pytest.approx(exact, rel=1e-10, abs=1e-12 * np.abs(total).max())
        s.model.zero_grad()
    # The positions are not all alike: a few carry most of the score.
    c = np.abs(split["L1H0"])
    assert c.max(1).mean() > 3 * c.mean()


def test_token_table_covers_the_sets_and_sums_to_union_scores(influence_world):
    """token_table's rows per (set, head, sample) sum to that head's score; the union target's
    combination sums to `union_scores`; the random set is the same size as each top set."""
    from mda.attribute.scoring import scores_streaming

    inf, s, stream, vectors = influence_world
    raw = scores_streaming(inf, s, stream, vectors).assign(step=0, domain="x")
    sets = token_sets(raw, 5)
    assert sets.groupby("set").size().to_dict() == {"top:L1H0": 5, "top:L1H1": 5, "top:union": 5, "random": 5}
    tokens = token_table(inf, s, stream, sets, vectors)
    assert len(tokens) == len(sets) * 2 * (stream.row_len - 1)
    sums = tokens.groupby(["set", "head", "sample_id"]).contribution.sum().droplevel("set")
    ref = raw.set_index(["head", "sample_id"]).score.loc[sums.index]
    np.testing.assert_allclose(sums, ref, rtol=1e-6, atol=1e-6 * raw.score.abs().max())
    union = target_contributions(tokens, raw, "union")
    by_sample = union[union.set == "top:union"].groupby("sample_id").contribution.sum()
    expected = union_scores(raw).set_index("sample_id").score.loc[by_sample.index]
    np.testing.assert_allclose(by_sample, expected, rtol=1e-6, atol=1e-9)
    # The top set is the union's top 5, as `select` ranks them.
    top = union_scores(raw).nlargest(5, "score").sample_id
    assert set(by_sample.index) == set(top)


def test_predictable_share_by_hand():
    rows = pd.DataFrame({"sample_id": [1, 1, 1, 2], "predictable": [True, False, False, True],
                         "contribution": [3.0, 1.0, -5.0, 0.0]})
    share = predictable_share(rows)
    assert share["positive_on_predictable"] == pytest.approx(3 / 4)
    assert share["positive_on_other"] == pytest.approx(1 / 4)
    assert share["predictable_positions"] == pytest.approx(0.5)
    assert share["per_token_ratio"] == pytest.approx((3 / 2) / (1 / 2))


# ----------------------------------------------------------------------------- the report's view
def test_report_shades_the_top_samples_tokens_and_shows_both_tables(tmp_path):
    """The HTML shades each token of a top sample by its contribution (red +, blue −, opacity
    |c| / the largest |c| shown, predictable positions underlined); Markdown lists the strongest
    tokens; the predictable-share and probe-draw tables come from metrics/scores.json."""
    from mda.report.build import write_report
    from tests.test_report import evaluation, scores

    ev = evaluation(1500)
    ev["top_samples"] = ev["top_samples"].assign(pieces=[["ZAP ", "ZAP ", "<b> ", "ZAP"]])
    tokens = pd.DataFrame({"set": "top:L1H0", "head": "L1H0", "sample_id": 7, "position": [0, 1, 2],
                           "token": [4, 4, 9], "next_token": [4, 9, 4], "predictable": [False, True, False],
                           "contribution": [2.0, -0.5, 1.0]})
    share = {"samples": 1, "positions": 3, "predictable_positions": 1 / 3, "positive_on_predictable": 0.0,
             "positive_on_other": 1.0, "per_token_ratio": 0.0}
    metrics = {"tokens": {"samples_per_set": 1, "sum_check_max_rel": 3e-8,
                          "targets": {"L1H0": {"top": share, "random": {**share, "positive_on_predictable": 0.25}}}},
               "probe_draws": {"L1H0": {"draws": ["seed 2", "seed 3"], "k": 100, "overlap_mean": 0.96,
                                        "overlap_min": 0.95, "spearman_mean": 0.98, "pairs": []}}}
    write_report(ev, scores(), "x: 1\n", "abc", tmp_path, "t", tokens=tokens, score_metrics=metrics)
    page, md = (tmp_path / "report.html").read_text(), (tmp_path / "report.md").read_text()
    assert '<span style="background:rgba(214,39,40,1.000)" title="position 0: +2">ZAP </span>' in page
    assert ('<span style="background:rgba(31,119,180,0.250);border-bottom:2px solid #222" '
            'title="position 1: -0.5, induction-predictable">ZAP </span>') in page
    assert '<span style="background:rgba(214,39,40,0.500)" title="position 2: +1">&lt;b&gt; </span>' in page
    assert '<span title="label only">ZAP</span>' in page  # the last token has no contribution
    assert "Σ c_t = 2.5" in page and "score 2.5 " in page
    assert "| 1 | 7 | 2.5 | 2.5 | `ZAP` (+2), `<b>` (+1) | `ZAP`* (-0.5) | 0.00 |" in md
    assert "<span" not in md
    assert "| top (1) | 3 | 33.3% | 0.0% | 100.0% | 0.00 |" in md and "| random (1) | 3 | 33.3% | 25.0% |" in md
    assert "| L1H0 | seed 2, seed 3 | 100 | 96.0% [95.0%] | 0.9800 |" in md
