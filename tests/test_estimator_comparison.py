"""`mda.evaluate.estimators` on hand-built score tables and an lds results folder whose measured
changes are known."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import spearmanr

from mda.core.errors import MdaError
from mda.evaluate.estimators import agreement, arm_rows, lds_run, scale_along_window, top_overlap
from mda.evaluate.lds import predicted_change, subset_ids

N = 200


def series(values):
    return pd.Series(np.asarray(values, dtype=float), index=pd.Index(np.arange(N), name="sample_id"), name="score")


def test_agreement_is_spearman_and_top_overlap_per_pair():
    rng = np.random.default_rng(0)
    a = series(rng.normal(size=N))
    b = series(a.to_numpy() + 0.5 * rng.normal(size=N))
    c = series(-a.to_numpy())
    rows = {(r["a"], r["b"]): r for r in agreement({"a": a, "b": b, "c": c})}
    assert set(rows) == {("a", "b"), ("a", "c"), ("b", "c")}
    assert rows[("a", "b")]["spearman"] == pytest.approx(spearmanr(a, b).statistic)
    assert rows[("a", "c")]["spearman"] == pytest.approx(-1.0) and rows[("a", "c")]["top10_overlap"] == 0.0
    top = lambda s: set(s.sort_values(ascending=False).index[:20])
    assert rows[("a", "b")]["top10_overlap"] == len(top(a) & top(b)) / 20 == top_overlap(a, b)
    with pytest.raises(MdaError, match="score different samples"):
        agreement({"a": a, "short": a.iloc[:-1]})


def lds_folder(tmp_path, ekfac: pd.Series, measured_from: pd.Series, fraction=0.25, subsets=12):
    """An lds results folder: params, and a per_subset table whose measured probe change is exactly
    `measured_from`'s predicted change (so that estimator has LDS 1) and EK-FAC's predicted column
    is the stage's."""
    ids = np.arange(N)
    drawn = {m: subset_ids(ids, fraction, 0, m) for m in range(subsets)}
    measured = predicted_change(measured_from, drawn)
    rows = pd.DataFrame({"subset": list(drawn), "head": "L2H2", "estimator": "ekfac",
                         "predicted_change": predicted_change(ekfac, drawn).to_numpy(),
                         "probe_change": measured.to_numpy(), "target_score_change": -measured.to_numpy(),
                         "probe": 0.0, "target_score": 0.0})
    (tmp_path / "files/data/lds").mkdir(parents=True)
    rows.to_parquet(tmp_path / "files/data/lds/per_subset.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"lds": {"fraction": fraction, "seed": 0, "subsets": subsets,
                                                                  "bootstrap": 200, "confidence": 0.95}}))
    return tmp_path


def test_lds_on_the_same_subsets_for_every_estimator(tmp_path):
    rng = np.random.default_rng(1)
    ekfac, exact = series(rng.normal(size=N)), series(rng.normal(size=N))
    folder = lds_folder(tmp_path, ekfac, measured_from=exact)
    run = lds_run(folder, {"ekfac": ekfac, "exact": exact}, np.arange(N))
    assert run["fraction"] == 0.25 and run["subsets"] == 12
    assert run["estimators"]["exact"]["probe"]["lds"] == pytest.approx(1.0)
    assert run["estimators"]["exact"]["target_score"]["lds"] == pytest.approx(-1.0)
    assert run["estimators"]["ekfac"]["probe"]["lds"] < 0.9
    # EK-FAC scores other than the stage's (or another window): the redrawn subsets are refused.
    with pytest.raises(MdaError, match="do not reproduce the stage's EK-FAC predictions"):
        lds_run(folder, {"ekfac": series(rng.normal(size=N))}, np.arange(N))


def test_remove_top_rows_read_each_runs_evaluation(tmp_path):
    ev = {"arms": {"remove-top": {"delay": {"mean": 250.0, "ci_low": 240.0, "ci_high": 260.0}},
                   "remove-random": {"delay": {"mean": 40.0}}},
          "targeted_vs_random": {"remove-top": {"remove-random": {"p_delay": 0.05, "test": "rank", "random_sets": 19}}},
          "edits_before_emergence_share": {"remove-top": 0.31}, "baseline": {"emergence_step": 4300.0}}
    (tmp_path / "evaluate.json").write_text(json.dumps(ev))
    (row,) = arm_rows({"exact": tmp_path / "evaluate.json"})
    assert row["estimator"] == "exact" and row["delay"] == 250.0 and row["random_delay"] == 40.0
    assert row["tests"] == {"remove-random": {"p": 0.05, "test": "rank", "random_sets": 19}}
    assert row["before_emergence_share"] == 0.31


def test_scale_along_the_window_is_each_spans_median_abs_score_over_the_last():
    steps = np.repeat(np.arange(60), 4)  # 60 steps of 4 rows: 6 spans of 10 steps
    rng = np.random.default_rng(2)
    growing = pd.DataFrame({"step": steps, "score": rng.choice([-1.0, 1.0], size=240) * 10.0 ** (5 - steps // 10)})
    flat = pd.DataFrame({"step": steps, "score": rng.normal(size=240)})
    scale = scale_along_window({"growing": growing, "flat": flat})
    assert [r["steps"] for r in scale["growing"]] == [[10 * i, 10 * (i + 1)] for i in range(6)]
    assert [r["over_last"] for r in scale["growing"]] == pytest.approx([1e5, 1e4, 1e3, 1e2, 10, 1])
    last = flat.score[flat.step >= 50].abs().median()
    assert scale["flat"][0]["over_last"] == pytest.approx(flat.score[flat.step < 10].abs().median() / last)
