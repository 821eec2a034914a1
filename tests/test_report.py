"""The report: verdicts follow the numbers, missing runs are named, the HTML stands alone."""

import re

import numpy as np
import pandas as pd
import pytest

from mda.config import Evaluate
from mda.evaluate import (arm_summary, domain_enrichment, icl_coupling, run_effects, targeted_vs_random,
                          transfer, transfer_summary)
from mda.report import build_report, verdicts, write_report
from tests.test_evaluate import TARGETS, WINDOW, curve, head_runs

EV = Evaluate(bootstrap=200)


def evaluation(remove_top_onset: int, icl_end: float = -1.8, missing=()):
    rows = [curve("baseline", s, 1200) for s in range(3)]
    rows += [curve("remove-top", s, remove_top_onset, top=0.7, icl_end=icl_end) for s in range(3)]
    rows += [curve("remove-random", s, 1200 + 20 * s) for s in range(3)]
    curves = pd.concat(rows, ignore_index=True)
    effects = run_effects(curves, WINDOW, EV, {"baseline", "remove-top"})
    heads = transfer(head_runs({(1, 0): -0.3, (1, 1): -0.2, (0, 0): 0.0, (0, 1): 0.01},
                               {(1, 0): 0.8, (1, 1): 0.5, (0, 0): 0.05, (0, 1): 0.1}), TARGETS, WINDOW, EV)
    window = pd.Series(["junk"] * 300 + ["prose"] * 700)
    top = pd.Series(["junk"] * 80 + ["prose"] * 20)
    summary = {"target": "L1H0", "unit": "induction", "metric": "prefix_matching", "heads": ["L1H0"],
               "window": list(WINDOW), "k": 100, "window_samples": 1000, "threshold": 0.5, "confidence": 0.95,
               "eval_every": 100, "seeds": [0, 1, 2], "fixed_arms": ["baseline", "remove-top"],
               "random_arms": ["remove-random"], "missing_runs": list(missing),
               "icl_coupling": icl_coupling(effects), "transfer": transfer_summary(heads),
               "edits_before_step": 1250.0}
    return {"curves": curves, "effects": effects, "per_arm": arm_summary(effects, 0.95),
            "tests": targeted_vs_random(effects), "transfer": heads, "enrichment": domain_enrichment(window, top, EV),
            "top_samples": pd.DataFrame({"rank": [1], "sample_id": [7], "step": [1003], "domain": ["junk"],
                                         "score": [2.5], "text": ["ZAP ZAP `x` ZAP"]}),
            "edit_timing": pd.DataFrame({"arm": ["remove-top"] + ["remove-random"] * 3, "seed": [0, 0, 1, 2],
                                         "edited_rows": [100] * 4, "before_emergence": [30, 50, 40, 60],
                                         "median_step": [1400.0, 1300.0, 1320.0, 1280.0]}),
            "summary": summary}


def scores():
    rng = np.random.default_rng(0)
    return pd.DataFrame({"sample_id": np.arange(1000), "head": "L1H0", "score": rng.normal(size=1000),
                         "domain": ["junk"] * 300 + ["prose"] * 700})


def icl_verdict(ev: dict) -> str:
    (line,) = [v for v in verdicts(ev) if v.startswith("In-context learning moves with the head")]
    return line


def test_verdicts_follow_the_numbers():
    delayed = " ".join(verdicts(evaluation(remove_top_onset=1500)))
    assert "Removing the top-k set delays emergence more than removing a random set: **in the hypothesised " \
           "direction, not significant**" in delayed
    assert "p = 0.25 (the smallest possible with 3 random sets: 0.25)" in delayed
    assert "Duplicating the top-k set advances emergence more than duplicating a random set: **not tested**" in delayed
    advanced = " ".join(verdicts(evaluation(remove_top_onset=1100)))
    assert "removing a random set: **not shown**" in advanced
    # Weaker head, less ICL: remove-top (trained once) and the 3 remove-random models, which end
    # level with the baseline (Δ score 0, ICL gain 0): r = +1 over 4 models, p = 0 — supported.
    assert icl_verdict(evaluation(remove_top_onset=1500)).startswith(
        "In-context learning moves with the head: **supported**. Over 4 trained models, Pearson r between "
        "Δ target score and ICL gain at the window end = +1.00 (one-sided p = 0); both move the same way in "
        "100% of `remove-top`, 100% of `remove-random` seeds.")
    # Weaker head, *more* ICL: r = −1.
    assert icl_verdict(evaluation(remove_top_onset=1500, icl_end=-2.2)).startswith(
        "In-context learning moves with the head: **not shown**. Over 4 trained models, Pearson r between "
        "Δ target score and ICL gain at the window end = -1.00 (one-sided p = 1); both move the same way in "
        "0% of `remove-top`")


@pytest.mark.parametrize("r, p, agreement, state", [
    (0.3, 0.05, {"remove-top": 0.5, "remove-random": 0.0}, "supported"),  # p ≤ 0.05; untargeted arms don't count
    (0.3, 0.0501, {"remove-top": 1.0}, "in the hypothesised direction, not significant"),
    (0.3, 0.01, {"remove-top": 1.0, "augment-top": 0.4}, "not shown"),  # a targeted arm disagrees
    (0.0, 0.01, {"remove-top": 1.0}, "not shown"),                       # r must be > 0
    (-0.3, 0.01, {"remove-top": 1.0}, "not shown"),
    (float("nan"), float("nan"), {"remove-top": 1.0}, "not tested"),
])
def test_icl_verdict_rule_on_both_sides_of_each_threshold(r, p, agreement, state):
    """The rule: supported ⇔ r > 0, every targeted arm's sign agreement ≥ ½ and p ≤ 0.05; in the
    hypothesised direction ⇔ the same without p; not tested without a finite r."""
    ev = evaluation(remove_top_onset=1500)
    ev["summary"]["icl_coupling"] = {"pearson_r": r, "p_value": p, "models": 9, "sign_agreement": agreement}
    assert icl_verdict(ev).startswith(f"In-context learning moves with the head: **{state}**")


def test_report_names_missing_runs_and_embeds_every_image(tmp_path):
    ev = evaluation(1500, missing=["remove-random seed 3"])
    doc = build_report(ev, scores(), "evaluate:\n  threshold: 0.5\n", "abc123", tmp_path)
    write_report(doc, tmp_path, "test")
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert "Missing runs (not evaluated, not filled in): remove-random seed 3" in md
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["effects.png", "enrichment.png", "icl_vs_induction.png", "influence.png", "trajectories.png",
                    "transfer.png"]
    assert all(f"]({name})" in md for name in pngs)
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(srcs) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "threshold: 0.5" in page and "abc123" in page
    assert "| remove-top | 3 |" in md  # the headline table, one row per arm
    assert "ZAP ZAP 'x' ZAP" in md  # decoded text, backticks neutralised inside the code span
    # when the edits happen: per arm, and the targeted arm's share in the caveats
    assert "| remove-random | 3 | 100 | 50 (50%) | 1,300 |" in md
    assert "before the baseline's emergence (step 1,250): `remove-top` 30%." in md
