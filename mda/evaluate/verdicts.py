"""The report's answers to the hypotheses, by rules fixed in advance (written out in `RULES`).

Each verdict is a state — **supported**, **in the hypothesised direction, not significant**,
**not shown** or **not tested** — and the condition that decided it, with the numbers it was
decided on, so that a reader can check the sentence against the tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mda.evaluate.effects import COMPARISONS, DIRECTION
from mda.evaluate.fmt import in_arm_order, with_ci
from mda.evaluate.stats import ALPHA, RANK_TEST_MIN_SETS

SUPPORTED, NOT_SIGNIFICANT = "supported", "in the hypothesised direction, not significant"
NOT_SHOWN, NOT_TESTED = "not shown", "not tested"
CLAIMS = {
    "remove-top": "Removing the top-k set delays emergence more than removing {control}",
    "augment-top": "Duplicating the top-k set advances emergence more than duplicating {control}",
    "augment-synthetic": "Synthetic motif rows built from the top-k set advance emergence more than "
                         "duplicating {control}",
}
CONTROL_TEXT = {"random": "a random set", "matched": "a random set with the top set's domain mix"}
ICL_CLAIM = "In-context learning moves with the head"
TEST_NAMES = {"rank": "rank test", "t": "prediction-interval t-test"}
GROUP_TEST_NAMES = {"rank": "permutation test", "t": "pooled two-sample t-test"}  # a seeded targeted arm


def claim(arm: str, control: str) -> str:
    """The hypothesis one comparison tests, e.g. "Removing the top-k set delays emergence more than
    removing a random set with the top set's domain mix"."""
    return CLAIMS[arm].format(control=CONTROL_TEXT[control.split("-", 1)[1]])


RULES = [
    "**Targeted arms** (`remove-top` vs `remove-random`: emergence later; `augment-top` and `augment-synthetic` "
    "vs `augment-random`: emergence earlier). **Supported** when (a) the arm's mean emergence delay against "
    "the baseline is in the hypothesised direction, (b) it is beyond the random sets' mean delay in that "
    "direction, and (c) the chosen test's one-sided p ≤ 0.05. (a) and (b) with p > 0.05: **in the "
    "hypothesised direction, not significant**. (a) or (b) failing: **not shown**. **Not tested** when "
    "the arm's or its control's runs are missing, when the arm never reached the emergence threshold (it "
    "has no delay), or when the chosen test gives no p.",
    f"**Which test decides** depends on K, the number of random sets, alone: the rank test when "
    f"K ≥ {RANK_TEST_MIN_SETS} (its smallest p, 1 / (K + 1), then reaches 0.05), the prediction-interval "
    "t-test otherwise. Both are always reported. **Only the rank test at K ≥ 19 is confirmatory**: it was "
    "declared as the test before the K = 19 runs. The t-test rule for K < 19 was added after the K = 3 "
    "rank test had given p = 0.25, so every verdict decided by it is **exploratory** and says so.",
    "**Two controls** per targeted arm, each its own verdict: random sets drawn uniformly from the window "
    "(`*-random`) and random sets with the top set's domain mix (`*-matched`: per domain as many samples "
    "as the top set holds, uniformly within the domain). Beating the first but not the second says the "
    "domain matters, not that the scores found the samples within it.",
    "**Rank test**: the targeted effect's rank among the K random sets' effects, p = (1 + #sets at least as "
    "extreme) / (K + 1) — the random sets are draws from the null (which samples are edited), so it "
    "assumes nothing about their distribution.",
    "**Prediction-interval t-test**: t = (targeted − mean of the random sets) / (sd of the random sets · "
    "√(1 + 1/K)), df = K − 1, one-sided: is the targeted effect a plausible new draw from the random sets' "
    "distribution? It **assumes that distribution is normal**, which K small sets cannot check.",
    "**A seeded targeted arm** (`augment-synthetic`: one model per seed) enters as its m models' effects, "
    "compared as a group: the rank test becomes the exact permutation test of the group's mean over all "
    "C(m + K, m) groupings, the t-test Student's pooled two-sample t (df = m + K − 2, same normality "
    "assumption, equal variances); with m = 1 (an arm trained once, its probe seeds averaged) they are "
    "exactly the two tests above.",
    f"**{ICL_CLAIM}**: Pearson r between Δ target score and ICL gain at the window end over trained "
    "models (one-sided, r > 0). **Supported** when r > 0, every targeted arm present moves both the same "
    "way in ≥ 50 % of its trained models (an arm trained once is one model: its probe seeds averaged), "
    "and p ≤ 0.05; both conditions with p > 0.05: **in the hypothesised "
    "direction, not significant**; r ≤ 0 or a targeted arm below 50 %: **not shown**; fewer than 3 "
    "trained models or no variation: **not tested**.",
]


@dataclass(frozen=True)
class Verdict:
    claim: str
    state: str
    reason: str
    """The condition that decided the state, with its numbers."""
    detail: str = ""
    """The numbers behind it."""
    exploratory: bool = False
    """Decided by a test that was not declared in advance (the t-test at K < 19)."""

    def sentence(self) -> str:
        mark = " (exploratory: K < 19, t-test)" if self.exploratory else ""
        return f"{self.claim}: **{self.state}**{mark} — {self.reason}." + (f" {self.detail}" if self.detail else "")


def finite(x) -> bool:
    return x is not None and bool(np.isfinite(x))


def test_name(test: str, models: int) -> str:
    """What the test is called for one targeted model, or for a group of them (see `RULES`)."""
    return (TEST_NAMES if models <= 1 else GROUP_TEST_NAMES)[test]


def test_choice(k: int, test: str, models: int = 1) -> str:
    return (f"the {test_name(test, models)} (chosen because K = {k} {'≥' if k >= RANK_TEST_MIN_SETS else '<'} "
            f"{RANK_TEST_MIN_SETS})")


def targeted_verdict(arm: str, control: str, tests: pd.DataFrame, per_arm: pd.DataFrame, configured: list[str],
                     missing: list[str], role: dict | None = None) -> Verdict:
    """The fixed rule for one targeted arm against one of its random controls (see `RULES`).
    `role`: the arm's role-moved counts (`runs`, `moved`, `to`), noted next to the verdict, never
    deciding it."""
    claim_text, sign = claim(arm, control), DIRECTION[arm]
    absent = [a for a in (arm, control) if a not in configured]
    if absent:
        return Verdict(claim_text, NOT_TESTED, " and ".join(f"`{a}`" for a in absent)
                       + f" {'is' if len(absent) == 1 else 'are'} not among `retrain.fixed_arms` / `retrain.random_arms`")
    t = tests[(tests.arm == arm) & (tests.control == control) & (tests.effect == "delay")] if len(tests) else tests
    if t.empty:
        gone = [m for m in missing if m.split(" seed ")[0] in (arm, control)]
        return Verdict(claim_text, NOT_TESTED, "the runs it needs are missing" + (f" ({', '.join(gone)})" if gone else ""))
    row = t.iloc[0]

    def verdict(state, reason, detail=""):  # a state the t-test decided (K < 19) is exploratory
        return Verdict(claim_text, state, reason, detail, row.test != "rank" and state in (SUPPORTED, NOT_SIGNIFICANT))

    word = "later" if sign > 0 else "earlier"
    if not finite(row.targeted):
        return verdict(NOT_TESTED, f"`{arm}` never reached the emergence threshold, so it has no delay to "
                                          "compare (see the mean score over the window and the unit-level view)")
    if row.random_sets == 0:
        return verdict(NOT_TESTED, f"no `{control}` run has a delay (none reached the threshold)")
    detail = targeted_detail(arm, control, row, per_arm, tests)
    if role and role["moved"]:
        detail += (f" In {role['moved']} of {role['runs']} `{arm}` runs the role moved to another head "
                   f"({', '.join(role['to'])}; see *The unit, not only the head*).")
    against_base = sign * row.targeted > 0
    beyond_random = sign * (row.targeted - row.random_mean) > 0
    if not (against_base and beyond_random):
        return verdict(NOT_SHOWN, f"the rule needs emergence {word} than the baseline and beyond the random "
                                         f"sets' mean; `{arm}` moved it {row.targeted:+,.0f} steps "
                                         f"({word if against_base else 'not ' + word}) and the random sets "
                                         f"{row.random_mean:+,.0f} on average ({'' if beyond_random else 'not '}beyond)",
                       detail)
    k, test = int(row.random_sets), row.test
    if not finite(row.p_value):
        why = "fewer than 2 random sets or no spread among them" if test == "t" else "no p"
        return verdict(NOT_TESTED, f"{word} than the baseline and beyond the random sets' mean, but "
                                          f"{test_choice(k, test, row.targeted_models)} has no p ({why})", detail)
    if row.p_value <= ALPHA:
        return verdict(SUPPORTED, f"{word} than the baseline ({row.targeted:+,.0f} steps) and beyond the "
                                         f"random sets' mean ({row.random_mean:+,.0f}), and {test_choice(k, test, row.targeted_models)} "
                                         f"gives p = {row.p_value:.3g} ≤ {ALPHA}", detail)
    return verdict(NOT_SIGNIFICANT, f"{word} than the baseline ({row.targeted:+,.0f} steps) and beyond the "
                                           f"random sets' mean ({row.random_mean:+,.0f}), but {test_choice(k, test, row.targeted_models)} "
                                           f"gives p = {row.p_value:.3g} > {ALPHA}", detail)


def targeted_detail(arm: str, control: str, row, per_arm: pd.DataFrame, tests: pd.DataFrame) -> str:
    """The numbers behind a targeted verdict: delay interval, both tests, the window-mean score."""
    d = per_arm[(per_arm.arm == arm) & (per_arm.effect == "delay")]
    d = d.iloc[0] if len(d) else None
    parts = []
    if d is not None:
        what = (f"mean [95 % probe-noise interval: one trained model, {d.seeds} probe draws]" if row.targeted_models == 1
                else f"mean [95 % CI over {row.targeted_models} trained models, one per seed]")
        parts.append(f"`{arm}` shifted emergence by {with_ci(d['mean'], d.ci_low, d.ci_high, 0)} steps "
                     f"({what}; + = later)")
    sd = f"sd {row.random_sd:,.0f}" if finite(row.random_sd) else "no sd"
    parts.append(f"`{row.control}` by {row.random_mean:+,.0f} ({sd} over {row.random_sets} random sets)")
    text = "; ".join(parts) + ". "
    m = row.targeted_models
    t_part = (f"t = {row.t:+.2f}, df = {row.df}, p = {row.t_p:.3g}" if finite(row.t_p)
              else "no p (fewer than 2 random sets or no spread among them)")
    text += (f"{test_name('rank', m).capitalize()} p = {row.rank_p:.3g} (smallest possible: {row.rank_min_p:.3g}); "
             f"{test_name('t', m)} {t_part}.")
    auc = tests[(tests.arm == arm) & (tests.control == control) & (tests.effect == "delta_auc")]
    if len(auc):
        a = auc.iloc[0]
        text += (f" Mean score over the window: Δ {a.targeted:+.3f} vs {a.random_mean:+.3f} for random sets "
                 f"(p = {a.p_value:.3g}, {test_name(a.test, a.targeted_models)}).")
    if d is not None and d.not_emerged:
        text += f" In {d.not_emerged} seed(s) `{arm}` never reached the threshold; those have no delay."
    return text


def icl_verdict(coupling: dict) -> Verdict:
    """The fixed rule for ICL moving with the head (see `RULES`)."""
    r, p = coupling["pearson_r"], coupling["p_value"]
    if not finite(r):
        return Verdict(ICL_CLAIM, NOT_TESTED, "the correlation needs at least 3 trained models with variation in "
                                              f"both effects (have {coupling['models']})")
    agreement, per_arm = coupling["sign_agreement"], coupling.get("models_per_arm", {})
    count = lambda a: f" ({per_arm[a]} model{'s' if per_arm[a] != 1 else ''})" if a in per_arm else ""
    detail = (f"Over {coupling['models']} trained models, Pearson r between Δ target score and ICL gain at the "
              f"window end = {r:+.2f} (one-sided p = {p:.2g}); share of trained models in which both move the "
              "same way: " + ", ".join(f"`{a}` {v:.0%}{count(a)}" for a, v in in_arm_order(agreement).items()) + ".")
    low = {a: v for a, v in agreement.items() if a in DIRECTION and v < 0.5}
    if r <= 0 or low:
        failed = ([f"r = {r:+.2f} ≤ 0"] if r <= 0 else []) + [f"`{a}` had {v:.0%}" for a, v in low.items()]
        return Verdict(ICL_CLAIM, NOT_SHOWN, "the rule needs r > 0 and ≥ 50 % sign agreement in every targeted arm; "
                       + ", ".join(failed), detail)
    if p <= ALPHA:
        return Verdict(ICL_CLAIM, SUPPORTED, f"r = {r:+.2f} > 0, every targeted arm moves both the same way in ≥ 50 % "
                                             f"of its trained models, and one-sided p = {p:.2g} ≤ {ALPHA}", detail)
    return Verdict(ICL_CLAIM, NOT_SIGNIFICANT, f"r = {r:+.2f} > 0 and every targeted arm moves both the same way in "
                                               f"≥ 50 % of its trained models, but one-sided p = {p:.2g} > {ALPHA}", detail)


def verdicts(ev: dict) -> list[Verdict]:
    """Every hypothesis's verdict, from the evaluation's tables."""
    s = ev["summary"]
    configured = list(s["fixed_arms"]) + list(s["random_arms"])
    out = [targeted_verdict(arm, control, ev["tests"], ev["per_arm"], configured, s["missing_runs"],
                            s.get("role_moved", {}).get(arm)) for arm, control, _ in COMPARISONS]
    return out + [icl_verdict(s["icl_coupling"])]
