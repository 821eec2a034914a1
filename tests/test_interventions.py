"""Selection, stream edits and counterfactual retraining."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mda.core.errors import MdaError
from mda.intervene.edits import augmentation, removal, upweighting
from mda.intervene.motifs import motif_profile, motif_rows, repeated_spans
from mda.intervene.selection import select_sets, set_size
from tests.conftest import run_stage, set_params

B = 4


def fake_scores(n=40, heads=("L1H0",)):
    rng = np.random.default_rng(0)
    return pd.concat([pd.DataFrame({"sample_id": np.arange(n), "step": np.arange(n) // B, "domain": "prose",
                                    "head": h, "probe": "induction", "score": rng.normal(size=n)})
                      for h in heads], ignore_index=True)


def stream_rows(n=40):
    return pd.DataFrame({"sample_id": np.arange(n), "step": np.arange(n) // B, "batch_pos": np.arange(n) % B})


def test_selection_sizes_order_and_seeds():
    scores = fake_scores()
    sets = select_sets(scores, k=4, seeds=[0, 1], union=True)
    assert sets.groupby("set").size().to_dict() == {f"L1H0:{s}": 4 for s in ("top", "bottom", "random-0", "random-1",
                                                                              "matched-0", "matched-1")}
    top = sets[sets.set == "L1H0:top"]
    assert list(top.sample_id) == list(scores.nlargest(4, "score").sample_id) and list(top["rank"]) == [1, 2, 3, 4]
    assert set(sets[sets.set == "L1H0:bottom"].sample_id) == set(scores.nsmallest(4, "score").sample_id)
    r0, r1 = (set(sets[sets.set == f"L1H0:random-{s}"].sample_id) for s in (0, 1))
    assert r0 != r1
    # The random sets do not depend on the scores: another estimator's scores, the same random sets.
    shuffled = scores.assign(score=np.random.default_rng(5).permutation(scores.score.to_numpy()))
    other = select_sets(shuffled, k=4, seeds=[0, 1], union=True)
    for s in (0, 1):
        assert set(other[other.set == f"L1H0:random-{s}"].sample_id) == (r0, r1)[s]
    assert r0 == set(select_sets(scores, 4, [0], False).query("set == 'L1H0:random-0'").sample_id)
    two = select_sets(fake_scores(heads=("L1H0", "L1H1")), k=4, seeds=[0], union=True)
    assert "union:top" in set(two.set)
    assert set_size(40, 0.1, None) == 4 and set_size(40, 0.1, 7) == 7
    with pytest.raises(MdaError, match=r"select: k = 41 samples, but the window holds 40 \(select.count\)"):
        set_size(40, 0.1, 41)


def test_domain_matched_sets_have_the_top_sets_domain_mix_drawn_uniformly_within_each_domain():
    rng = np.random.default_rng(1)
    n, k = 600, 60
    domains = np.array(["junk"] * 150 + ["prose"] * 300 + ["code"] * 150)
    scores = pd.DataFrame({"sample_id": np.arange(n), "step": np.arange(n) // B, "domain": domains, "head": "L1H0",
                           "probe": "induction", "score": rng.normal(size=n) + 3.0 * (domains == "junk")})
    sets = select_sets(scores, k=k, seeds=list(range(40)), union=False)
    domain_of = scores.set_index("sample_id").domain
    top_mix = domain_of[sets[sets.set == "L1H0:top"].sample_id].value_counts().to_dict()
    assert top_mix["junk"] > 40  # the top set is mostly junk, as on the default
    picked = []
    for seed in range(40):
        ids = sets[sets.set == f"L1H0:matched-{seed}"].sample_id.to_numpy()
        assert len(set(ids)) == k and domain_of[ids].value_counts().to_dict() == top_mix
        picked.append(ids)
    assert len({tuple(sorted(ids)) for ids in picked}) == 40  # a new set per seed
    # uniform within a domain: every junk sample is drawn about equally often (40 · 45 / 150 = 12 times)
    counts = pd.Series(np.concatenate(picked)).value_counts()
    junk = counts.reindex(np.flatnonzero(domains == "junk"), fill_value=0)
    assert junk.min() >= 2 and junk.max() <= 25 and abs(junk.mean() - 40 * top_mix["junk"] / 150) < 1e-9
    # the uniform control ignores domains: its junk share is the window's (25 %), not the top set's
    uniform = np.concatenate([sets[sets.set == f"L1H0:random-{s}"].sample_id for s in range(40)])
    assert abs((domain_of[uniform] == "junk").mean() - 0.25) < 0.03


def test_removal_zeroes_exactly_the_selected_rows():
    edit = removal(stream_rows(), {1, 6, 7}, B)
    assert sorted(edit.weights) == [0, 1]
    assert edit.weights[0].tolist() == [1, 0, 1, 1] and edit.weights[1].tolist() == [1, 1, 0, 0]
    ids = np.arange(B * 65).reshape(B, 65)
    same, w = edit.apply(5, ids)
    assert same is ids and w is None
    assert edit.edited_steps().tolist() == [0, 1, 1]  # samples 1, 6, 7 sit at steps 0, 1, 1


def test_removed_sample_contributes_nothing_and_leaves_the_other_rows_alone():
    """Removal masks a sample through its loss weight (`removal` → `mda.train.loop.batch_loss`, what
    every training step runs): the batch's gradient is, whatever the masked row holds, that of
    the other rows' summed token losses over the unchanged normaliser (all B × T target tokens),
    computed here one row at a time with a plain cross-entropy."""
    import torch.nn.functional as F
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from mda.train.loop import batch_loss

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32)).eval()
    ids = torch.randint(1, 30, (B, 9))
    w = torch.from_numpy(removal(stream_rows(), {2}, B).weights[0])  # sample 2: step 0, batch position 2
    assert w.tolist() == [1.0, 1.0, 0.0, 1.0]

    def gradient(loss_of):
        model.zero_grad()
        loss_of().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    masked = gradient(lambda: batch_loss(model, ids, w))
    for filler in (torch.zeros(9, dtype=ids.dtype), torch.randint(1, 30, (9,))):  # padding, other text
        other = ids.clone()
        other[2] = filler
        assert torch.equal(gradient(lambda: batch_loss(model, other, w)), masked)
    targets = B * (ids.shape[1] - 1)
    kept = lambda: sum(F.cross_entropy(model(input_ids=ids[r:r + 1, :-1]).logits[0], ids[r, 1:], reduction="sum")
                       for r in (0, 1, 3)) / targets
    torch.testing.assert_close(masked, gradient(kept), rtol=1e-5, atol=1e-7 * masked.abs().max().item())


def test_later_placement_keeps_shapes_and_only_replaces_later_unselected_rows():
    rows = stream_rows()
    selected = {1, 5, 9, 38}
    tokens = {i: np.full(65, 1000 + i) for i in selected}
    sources = [(i // B, tokens[i]) for i in sorted(selected)]
    edit = augmentation(rows, sources, selected, last_step=9, copies=2, seed=0, placement="later")
    assert edit.summary["copies_placed"] == 6 and edit.summary["copies_dropped"] == 2  # 38 is in the last step
    placed, changed_steps = 0, []
    for step in range(10):
        ids = np.arange(B * 65).reshape(B, 65) + step * 10_000
        new, weights = edit.apply(step, ids)
        assert new.shape == ids.shape and weights is None
        for pos in range(B):
            if not np.array_equal(new[pos], ids[pos]):
                placed += 1
                changed_steps.append(step)
                source = int(new[pos][0]) - 1000
                assert source in selected and step > source // B           # a later step
                assert step * B + pos not in selected                        # never over a selected row
    assert placed == 6
    assert edit.edited_steps().tolist() == changed_steps  # what apply() changed, step by step
    assert augmentation(rows, sources, selected, 9, 2, seed=0, placement="later").replace.keys() == edit.replace.keys()


# Steps 0–9 of 4 rows; step 2 holds three selected rows (more copies than free rows there).
SELECTED = {1, 5, 8, 9, 10, 38}


def stream_batches(n_steps=10):
    """Step → (B, 65) rows whose tokens all equal the row's sample id."""
    return {step: np.repeat(np.arange(step * B, step * B + B)[:, None], 65, axis=1) for step in range(n_steps)}


def copy_sources(copies_of=SELECTED):
    """(origin step, tokens) of each selected sample; a copy's tokens are 1000 + its sample id."""
    return [(i // B, np.full(65, 1000 + i)) for i in sorted(copies_of)]


@pytest.mark.parametrize("copies", [1, 2])
def test_in_place_copies_replace_unselected_rows_of_the_same_step(copies):
    edit = augmentation(stream_rows(), copy_sources(), SELECTED, last_step=9, copies=copies, seed=0,
                        placement="in_place")
    changed_steps, per_source = [], {i: 0 for i in SELECTED}
    for step, ids in stream_batches().items():
        new, weights = edit.apply(step, ids)
        assert new.shape == ids.shape and weights is None                    # tokens per step constant
        in_step = [i for i in SELECTED if i // B == step]
        free = [pos for pos in range(B) if step * B + pos not in SELECTED]
        changed = [pos for pos in range(B) if not np.array_equal(new[pos], ids[pos])]
        assert set(changed) <= set(free)                                      # never over a selected row
        for pos in changed:
            source = int(new[pos][0]) - 1000
            assert source in in_step and (new[pos] == 1000 + source).all()    # a copy from this very step
            per_source[source] += 1
        assert len(changed) == min(copies * len(in_step), len(free))          # every copy placed while rows last
        changed_steps += [step] * len(changed)
    assert all(n <= copies for n in per_source.values())
    # step 2: samples 8, 9, 10 selected, one free row (11) → one copy placed, the rest dropped
    assert edit.summary["copies_placed"] == len(changed_steps)
    assert edit.summary["copies_dropped"] == copies * len(SELECTED) - len(changed_steps)
    assert edit.summary["copies_dropped"] == 3 * copies - 1
    assert edit.edited_steps().tolist() == changed_steps
    again = augmentation(stream_rows(), copy_sources(), SELECTED, 9, copies, seed=0, placement="in_place")
    assert {s: sorted(r) for s, r in again.replace.items()} == {s: sorted(r) for s, r in edit.replace.items()}


def test_in_place_positions_depend_on_the_seed():
    sources = copy_sources({1, 5, 38})
    positions = {seed: {s: tuple(sorted(r)) for s, r in augmentation(stream_rows(), sources, {1, 5, 38}, 9, 1, seed,
                                                                      "in_place").replace.items()}
                 for seed in range(6)}
    assert all(set(p) == {0, 1, 9} for p in positions.values())  # always the origin steps
    assert len(set(map(lambda p: tuple(sorted(p.items())), positions.values()))) > 1


@pytest.mark.parametrize("copies", [1, 3])
def test_upweight_raises_only_the_selected_rows_weight(copies):
    edit = upweighting(stream_rows(), SELECTED, B, copies)
    changed_steps = []
    for step, ids in stream_batches().items():
        new, weights = edit.apply(step, ids)
        assert new is ids                                                      # no row changes
        expected = np.array([1.0 + copies if step * B + pos in SELECTED else 1.0 for pos in range(B)])
        if (expected == 1).all():
            assert weights is None
        else:
            np.testing.assert_array_equal(weights, expected)
        changed_steps += [step] * int(round((expected - 1).sum()))
    assert edit.edited_steps().tolist() == changed_steps  # each upweighted row: `copies` edits at its own step
    assert edit.summary["copies_placed"] == copies * len(SELECTED) and edit.summary["copies_dropped"] == 0


def tiny_lm():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32))


def grads(model, ids, weights=None):
    from mda.train.loop import batch_loss

    model.zero_grad()
    batch_loss(model, ids, None if weights is None else torch.as_tensor(weights, dtype=torch.float32)).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("copies", [1, 2])
def test_upweight_is_the_gradient_of_copies_in_the_same_step(copies):
    """Weight 1 + c on a row = that row c + 1 times in the batch, every other row unchanged. The
    c extra copies need c places in the batch: rows that are zero-weight padding in the upweighted
    batch, so both batches have the same rows, shape and normaliser (all target tokens)."""
    model = tiny_lm()
    batch = 2 + copies
    ids = torch.randint(1, 30, (batch, 9))
    rows = pd.DataFrame({"sample_id": np.arange(batch), "step": 0, "batch_pos": np.arange(batch)})
    w = upweighting(rows, {1}, batch, copies).weights[0].copy()
    pad = np.arange(2, batch)
    w[pad] = 0.0
    duplicated = ids.clone()
    duplicated[pad] = ids[1]
    for a, b in zip(grads(model, ids, w), grads(model, duplicated)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_in_place_is_upweighting_minus_the_replaced_rows():
    """The discrete edit's gradient: selected rows weighted 1 + c, the rows it overwrote 0."""
    model = tiny_lm()
    batch, copies = 6, 2
    ids = torch.randint(1, 30, (batch, 9))
    rows = pd.DataFrame({"sample_id": np.arange(batch), "step": 0, "batch_pos": np.arange(batch)})
    edit = augmentation(rows, [(0, ids[1].numpy())], {1}, last_step=0, copies=copies, seed=3, placement="in_place")
    new, _ = edit.apply(0, ids.numpy())
    replaced = [pos for pos in range(batch) if not np.array_equal(new[pos], ids[pos].numpy())]
    assert len(replaced) == copies and 1 not in replaced
    w = np.ones(batch)
    w[1] = 1 + copies
    w[replaced] = 0
    for a, b in zip(grads(model, torch.from_numpy(new)), grads(model, ids, w)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_synthetic_motifs_carry_repeats_without_copying():
    rng = np.random.default_rng(0)
    top = rng.integers(10, 200, (50, 65))
    top[:, 40:50] = top[:, 5:15]  # a 10-token span repeated at distance 35
    profile = motif_profile(top)
    assert (10, 35) in {tuple(s) for s in profile["spans"]}
    new = motif_rows(profile, 50, 65, seed=1)
    assert new.shape == (50, 65)
    assert not any((new == row).all(1).any() for row in top)
    coverage = sum(length for r in new for length, _ in repeated_spans(r)) / new.size
    assert coverage >= 0.5 * profile["coverage"]


# ----------------------------------------------------------------------------- retraining
@pytest.fixture(scope="module")
def selected_repo(trained_repo):
    """A tiny repo through `select`, with a window from step 4 to 8."""
    for stage in ("locate",):
        assert run_stage(trained_repo, stage).returncode == 0
    targets_path = trained_repo / "data/locate/targets.json"
    targets = json.loads(targets_path.read_text())
    targets["window"].update(start=4, end=8)
    targets["influence_step"] = 8
    targets_path.write_text(json.dumps(targets))
    set_params(trained_repo, {"retrain": {"eval_every": 2}})
    for stage in ("factors", "gradients", "scores", "select"):
        res = run_stage(trained_repo, stage)
        assert res.returncode == 0, res.stderr
    return trained_repo


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["in_place", "upweight", "later"])
def test_build_edit_places_augment_arms_by_the_params(selected_repo, placement):
    """On a real stream and selection: each augment arm's edit follows `retrain.augment_placement`
    and says so in its summary (what `meta.json` records)."""
    from mda.core.config import load_params, parse_params
    from mda.data.stream import Stream
    from mda.intervene.arms import build_edit

    raw = load_params(selected_repo / "params.yaml").model_dump()
    raw["retrain"]["augment_placement"] = placement
    params = parse_params(raw)
    sets = pd.read_parquet(selected_repo / "data/select/sets.parquet")
    target = sorted(set(sets.target))[0]
    stream = Stream(selected_repo / "data/corpus/stream")
    rows = stream.read(4, 7, columns=["sample_id", "step", "batch_pos"]).to_pandas()
    top = set(sets[sets.set == f"{target}:top"].sample_id)
    top_steps = sorted(rows[rows.sample_id.isin(top)].step)
    for arm in ("augment-top", "augment-synthetic"):
        edit = build_edit(arm, 0, params, sets, target, stream, (4, 8))
        expected = "in_place" if (placement, arm) == ("upweight", "augment-synthetic") else placement
        assert edit.summary["placement"] == expected and edit.summary["augment_placement"] == placement
        steps = edit.edited_steps().tolist()
        assert len(steps) == edit.summary["copies_placed"]
        if expected in ("in_place", "upweight"):
            assert set(steps) <= set(top_steps)  # every copy (or extra weight) in a selected row's own step
        else:
            assert all(s > min(top_steps) for s in steps)
        if expected == "upweight":
            assert steps == top_steps and not edit.replace  # weight 2 on each selected row, nothing replaced


@pytest.mark.slow
def test_baseline_reproduces_pretraining_bit_exactly(selected_repo):
    from mda.model.neox import load_model

    res = run_stage(selected_repo, "retrain", args=["baseline"])
    assert res.returncode == 0, res.stderr
    out = selected_repo / "data/retrain/baseline"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["reproduces_original"] is True
    ours = load_model(out / "model").state_dict()
    original = load_model(selected_repo / "data/checkpoints/step8").state_dict()
    assert all(torch.equal(t, original[k]) for k, t in ours.items())
    trajectory = pd.read_parquet(out / "trajectory.parquet")
    assert sorted(trajectory.seed.unique()) == [0, 1, 2] and sorted(trajectory.step.unique()) == [4, 6, 8]
    # The step-4 evaluation of run seed 0 is the saved step-4 checkpoint measured on the evaluation
    # probe of seed `retrain.probe.seed` (not locate's probe, which chose the head and window).
    from mda.core.config import load_params
    from mda.data.corpus import read_corpus_meta
    from mda.units.measure import checkpoint_metrics
    from mda.units.probes import evaluation_probes, probe_tokens

    params = load_params(selected_repo / "params.yaml")
    step4 = load_model(selected_repo / "data/checkpoints/step4")
    vocab = read_corpus_meta(selected_repo / "data/corpus").get("vocab_size")
    probe = evaluation_probes(params, step4.config, vocab, [0])[0]
    assert not torch.equal(probe, probe_tokens(params.locate.probe, step4.config, vocab))
    theirs4, _ = checkpoint_metrics(step4, probe, None, params.locate.max_sequences, full=False)
    ours4 = trajectory[(trajectory.step == 4) & (trajectory.seed == 0)].sort_values(["layer", "head"])
    np.testing.assert_allclose(ours4.prefix_matching, theirs4.sort_values(["layer", "head"]).prefix_matching, rtol=1e-6)


@pytest.mark.slow
def test_random_arm_end_to_end_and_mlflow_tags(selected_repo):
    from mlflow.tracking import MlflowClient

    res = run_stage(selected_repo, "retrain", args=["remove-random", "1"])
    assert res.returncode == 0, res.stderr
    meta = json.loads((selected_repo / "data/retrain/remove-random-1/meta.json").read_text())
    assert meta["edit"]["set"].endswith(":random-1") and meta["edit"]["masked_rows"] == meta["edit"]["set_size"]
    client = MlflowClient(f"sqlite:///{selected_repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mda").experiment_id],
                              "tags.stage = 'retrain' and tags.arm = 'remove-random'")
    assert [r.data.tags["seed"] for r in runs] == ["1"]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["shuffle-top"], "error: retrain: unknown arm 'shuffle-top' (known: baseline, remove-top, remove-random, "
                      "remove-matched, remove-bottom, augment-top, augment-random, augment-matched, "
                      "augment-synthetic)"),
    (["remove-random", "9"], "error: retrain: arm remove-random needs a seed from retrain.seeds [0, 1, 2]"),
])
def test_retrain_bad_arguments(selected_repo, args, message):
    res = run_stage(selected_repo, "retrain", args=args)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [message]


@pytest.mark.slow
def test_window_start_without_trainer_state_names_the_fallback(selected_repo):
    state = selected_repo / "data/checkpoints/step4/trainer_state.pt"
    saved = state.read_bytes()
    state.unlink()
    try:
        res = run_stage(selected_repo, "retrain", args=["remove-top"])
    finally:
        state.write_bytes(saved)
    assert res.returncode == 1
    assert "step4/trainer_state.pt: missing" in res.stderr and "retrain.fresh_optimizer: true" in res.stderr
    assert not (selected_repo / "data/retrain/remove-top").exists()
