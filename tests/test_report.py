"""The report: verdicts follow the numbers, missing runs are named, the HTML stands alone, and
report.md links its PNGs under figures/ by relative paths."""

import re

import numpy as np
import pandas as pd
import pytest

from mda.core.config import Evaluate
from mda.evaluate.catalysts import domain_enrichment
from mda.evaluate.effects import arm_summary, icl_coupling, run_effects, targeted_vs_random, transfer, transfer_summary
from mda.evaluate.runs import target_trajectories
from mda.evaluate.unit_level import role_summary, unit_level
from mda.report.build import FIGURES, write_report
from mda.evaluate.verdicts import verdicts
from tests.test_evaluate import TARGETS, WINDOW, curve, head_runs

EV = Evaluate(bootstrap=200)


def runs_from_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Every head's trajectory: the target L1H0 follows the curve; L1H1 sits at 0.1, L0H0 at 0.05."""
    parts = [curves.assign(layer=1, head=0, prefix_matching=curves.target_score)]
    for (layer, head), level in {(1, 1): 0.1, (0, 0): 0.05}.items():
        parts.append(curves.assign(layer=layer, head=head, prefix_matching=level))
    return pd.concat(parts, ignore_index=True).drop(columns="target_score")


def evaluation(remove_top_onset: int, icl_end: float = -1.8, missing=()):
    rows = [curve("baseline", s, 1200) for s in range(3)]
    rows += [curve("remove-top", s, remove_top_onset, top=0.7, icl_end=icl_end) for s in range(3)]
    rows += [curve("remove-random", s, 1200 + 20 * s) for s in range(3)]
    runs = runs_from_curves(pd.concat(rows, ignore_index=True))
    curves = target_trajectories(runs, TARGETS)
    trained_once = {"baseline", "remove-top"}
    effects = run_effects(curves, WINDOW, EV, trained_once)
    unit = unit_level(runs, TARGETS, WINDOW, EV, trained_once)
    heads = transfer(head_runs({(1, 0): -0.3, (1, 1): -0.2, (0, 0): 0.0, (0, 1): 0.01},
                               {(1, 0): 0.8, (1, 1): 0.5, (0, 0): 0.05, (0, 1): 0.1}), TARGETS, WINDOW, EV)
    window = pd.Series(["junk"] * 300 + ["prose"] * 700)
    top = pd.Series(["junk"] * 80 + ["prose"] * 20)
    summary = {"target": "L1H0", "unit": "induction", "metric": "prefix_matching", "heads": ["L1H0"],
               "window": list(WINDOW), "k": 100, "window_samples": 1000, "threshold": 0.5, "confidence": 0.95,
               "eval_every": 100, "seeds": [0, 1, 2], "fixed_arms": ["baseline", "remove-top"],
               "random_arms": ["remove-random"], "missing_runs": list(missing),
               "icl_coupling": icl_coupling(effects), "transfer": transfer_summary(heads),
               "edits_before_step": 1250.0, "copies": 1, "augment_placement": "in_place",
               "rank_test_min_sets": 19, "role_margin": 0.1, "role_moved": role_summary(unit["role_moves"])}
    return {"curves": curves, "effects": effects, "per_arm": arm_summary(effects, 0.95),
            "tests": targeted_vs_random(effects), "transfer": heads, "enrichment": domain_enrichment(window, top, EV),
            "top_samples": pd.DataFrame({"rank": [1], "sample_id": [7], "step": [1003], "domain": ["junk"],
                                         "score": [2.5], "text": ["ZAP ZAP `x` ZAP"]}),
            "edit_timing": pd.DataFrame({"arm": ["remove-top"] + ["remove-random"] * 3, "seed": [0, 0, 1, 2],
                                         "placement": "—", "edited_rows": [100] * 4, "dropped": 0,
                                         "before_emergence": [30, 50, 40, 60],
                                         "median_step": [1400.0, 1300.0, 1320.0, 1280.0]}),
            **unit, "summary": summary}


def scores():
    rng = np.random.default_rng(0)
    return pd.DataFrame({"sample_id": np.arange(1000), "head": "L1H0", "score": rng.normal(size=1000),
                         "domain": ["junk"] * 300 + ["prose"] * 700})


def answer(ev) -> str:
    return " ".join(v.sentence() for v in verdicts(ev))


def test_verdicts_follow_the_numbers():
    delayed = answer(evaluation(remove_top_onset=1500))
    # remove-top reaches 0.4 at 1500 + 500 · 0.4/0.7: delay 335.7 vs random 0, 20, 40:
    # t = 315.7 / (20 · √(4/3)) = 13.67, df = 2 → p = 0.00265
    assert "Removing the top-k set delays emergence more than removing a random set: **supported** (exploratory: " \
           "K < 19, t-test) — later than the baseline (+336 steps) and beyond the random sets' mean (+20), and the prediction-interval t-test " \
           "(chosen because K = 3 < 19) gives p = 0.00265 ≤ 0.05." in delayed
    assert "Rank test p = 0.25 (smallest possible: 0.25)" in delayed
    assert "Duplicating the top-k set advances emergence more than duplicating a random set: **not tested** — " \
           "`augment-top` and `augment-random` are not among" in delayed
    assert "removing a random set with the top set's domain mix: **not tested** — `remove-matched` is not among" \
        in delayed
    assert "Over 4 trained models, Pearson r between Δ target score and ICL gain at the window end = +1.00" in delayed
    opposite = answer(evaluation(remove_top_onset=1500, icl_end=-2.2))
    assert "In-context learning moves with the head: **not shown** — the rule needs r > 0 and ≥ 50 % sign " \
           "agreement in every targeted arm; r = -1.00 ≤ 0, `remove-top` had 0%" in opposite
    advanced = answer(evaluation(remove_top_onset=1100))
    assert "removing a random set: **not shown** — the rule needs emergence later than the baseline" in advanced


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
    (line,) = [v.sentence() for v in verdicts(ev) if v.sentence().startswith("In-context learning moves with the head")]
    assert line.startswith(f"In-context learning moves with the head: **{state}**")


def test_report_names_missing_runs_and_embeds_every_image(tmp_path):
    ev = evaluation(1500, missing=["remove-random seed 3"])
    (tmp_path / "smda").mkdir()
    (tmp_path / "smda" / "keep.md").write_text("another stage's output")
    write_report(ev, scores(), "evaluate:\n  threshold: 0.5\n", "abc123", tmp_path, "test")
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert (tmp_path / "smda" / "keep.md").read_text() == "another stage's output"  # left alone
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
        ["figures", "report.html", "report.md", "smda"]
    assert "Missing runs (not evaluated, not filled in): remove-random seed 3" in md
    pngs = sorted(p.name for p in (tmp_path / FIGURES).glob("*.png"))
    assert pngs == ["effects.png", "enrichment.png", "icl_vs_induction.png", "influence.png", "trajectories.png",
                    "transfer.png", "unit_levels.png"]
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == [f"figures/{name}" for name in pngs]
    assert all((tmp_path / link).is_file() for link in links)  # relative to report.md
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(srcs) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "threshold: 0.5" in page and "abc123" in page
    # two headline tables: probe noise of one model vs spread between models, never in one column
    assert "| arm | probe draws | emergence step |" in md and "| arm | models | emergence step |" in md
    assert "| remove-top | 3 |" in md and "| remove-random | 3 |" in md
    assert "**probe noise only**" in md and "**between trained models**" in md
    assert "These rules were fixed before any result was seen" not in md
    assert "The rank test at K ≥ 19 is the confirmatory test" in md
    assert "ZAP ZAP 'x' ZAP" in md  # decoded text, backticks neutralised inside the code span
    # when the edits happen: per arm, and the targeted arm's share in the caveats
    assert "| remove-random | 3 | — | 100 | 0 | 50 (50%) | 1,300 |" in md
    assert "before the baseline's emergence (step 1,250): `remove-top` 30%." in md
    # placement, both tests and the rule that picks one, the unit-level view
    assert "Augmentation placement `retrain.augment_placement: in_place`" in md
    assert "## Targeted vs random: both tests" in md and "| remove-top | remove-random | delay | targeted later | 336 (1) | 20 ± 20 (3) | 0.25 (0.25) | 13.67 (2) | **0.0027** |" in md
    assert "The verdict uses" not in md and "the rank test when K ≥ 19" in md and "**assumes that distribution is normal**" in md
    assert "## The unit, not only the head" in md and "The role did not move to another head in any run." in md
    # head, layer and model levels alike: the target is the best head of its layer and of the model
    assert "| remove-top | +336 [+336, +336] | +336 [+336, +336] | +336 [+336, +336] | L1H0 (3) | 0 of 3 |" in md


def test_report_says_when_the_role_moved(tmp_path):
    ev = evaluation(5000)  # remove-top never forms …
    runs = runs_from_curves(ev["curves"])
    moved = runs.copy()
    rival = (moved.arm == "remove-top") & (moved.layer == 1) & (moved["head"] == 1)
    moved.loc[rival, "prefix_matching"] = 0.7  # … and L1H1 holds the role instead
    ev.update(unit_level(moved, TARGETS, WINDOW, EV, {"baseline", "remove-top"}))
    ev["summary"]["role_moved"] = role_summary(ev["role_moves"])
    write_report(ev, scores(), "", "abc123", tmp_path, "test")
    md = (tmp_path / "report.md").read_text()
    assert "**The role moved to another head** in `remove-top`: 3 of 3 runs (to L1H1)." in md
    assert "| remove-top | 0 | L1H0 | 0.000 (0.400) | L1H1 | 0.700 (0.100) | L1H1 |" in md
    assert "`remove-top` never reached the emergence threshold, so it has no delay to compare" in md
