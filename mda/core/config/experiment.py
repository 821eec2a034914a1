"""Sections of the MDA experiment, in pipeline order: locate, influence, select, retrain,
evaluate, lds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mda.core.config.base import ProbeSettings, Section


# ----------------------------------------------------------------------------- locate
class Locate(Section):
    """Which heads to study and over which steps (stage `locate`)."""

    unit: Literal["induction", "previous_token"] = "induction"
    """Unit type; its score is `prefix_matching` or `previous_token` (mda.units.metrics)."""
    heads: Literal["auto"] | list[tuple[int, int]] = "auto"
    """`auto` (the `auto_count` heads whose score rose most) or explicit [[layer, head], ...]."""
    auto_count: int = Field(1, ge=1)
    window: Literal["auto"] | tuple[int, int] = "auto"
    """Formation window [start, end] in saved steps, or `auto` from the target trajectory."""
    window_low: float = Field(0.1, gt=0.0, lt=1.0)
    """`auto` window: starts at the last checkpoint before the score passes this share of its rise…"""
    window_high: float = Field(0.9, gt=0.0, le=1.0)
    """…and ends at the first checkpoint at or above this share."""
    influence_step: Literal["start", "end"] | int = "end"
    """Checkpoint at which influence is computed: window start, end, or an explicit saved step."""
    probe: ProbeSettings = ProbeSettings(seed=1)
    """Repeated random-token sequences for the attention metrics (a different seed from
    pretraining's progress probe, so target choice is not fit to the logged curve)."""
    heldout_rows: int = Field(256, ge=1)
    """Held-out rows (at most `corpus.heldout_rows`) for loss and the ICL score."""
    max_sequences: int = Field(1024, ge=1)
    """Largest batch of sequences in one forward (bounds memory on big models)."""

    @model_validator(mode="after")
    def _window_order(self):
        if self.window != "auto" and self.window[0] >= self.window[1]:
            raise ValueError(f"window start {self.window[0]} must be before its end {self.window[1]}")
        if self.window_low >= self.window_high:
            raise ValueError("window_low must be below window_high")
        return self


# ----------------------------------------------------------------------------- influence
class Influence(Section):
    """Head-restricted EK-FAC influence (stages `factors`, `gradients`, `scores`)."""

    blocks: Literal["qk", "qkvo"] = "qkvo"
    """A head's parameter blocks: W_QK only, or W_QK, W_V and W_O (biases never; see mda.model.heads)."""
    probe: Literal["auto", "induction", "prev_token"] = "auto"
    """What the score measures; `auto` follows `locate.unit`."""
    probe_sequences: int = Field(400, ge=1)
    probe_half_len: int = Field(32, ge=2)
    probe_seed: int = Field(2, ge=0)
    """Repeated random-token sequences of the probe (a seed unlike locate's and pretraining's).
    400: the fewest (of 32, 64, 128, 200, 400, 800, 1600) at which every pair of six draws kept
    ≥ 95 % of the top-k set on the default model (benchmarks/results/probe_overlap.json)."""
    overlap_seeds: list[int] = Field(default_factory=lambda: [3, 4, 5])
    """Other probe draws (seeds) the scores stage also scores the window with, to report how much
    of the top-k set depends on the draw (metrics/scores.json, the report); [] = none."""
    token_samples: int = Field(200, ge=0)
    """Per target, the top samples (and as many random window samples) whose score the scores stage
    splits over their token positions (data/scores/tokens.parquet); 0 = none."""
    fisher: Literal["true", "empirical"] = "true"
    """Curvature labels: sampled from the model (true Fisher) or the data's (empirical Fisher)."""
    damping: float = Field(0.1, gt=0.0)
    """α: damping λ = α · mean(Λ) per block."""
    factor_samples: int = Field(2048, ge=0)
    """Window samples the factors are fitted on, spread evenly over the window (0 = all)."""
    label_seed: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=1)
    """Sequences per forward/backward."""
    dtype: Literal["float32", "float16"] = "float32"
    """Storage type of cached gradients (computation is float32)."""
    projection: int = Field(0, ge=0)
    """LoGra-style factored projection rank for both sides of each block (0 = none)."""
    projection_seed: int = Field(0, ge=0)
    shard_samples: int = Field(4096, ge=1)
    """Samples per gradient shard; a rerun skips complete shards."""
    mode: Literal["cached", "streaming"] = "cached"
    """`cached`: scores read the gradient shards; `streaming`: recompute gradients, no cache."""
    estimator: Literal["ekfac", "trajectory", "exact"] = "ekfac"
    """What the scores stage writes to `scores.parquet` (select, retrain, lds and the report read
    any of them): `ekfac` — EK-FAC at the influence checkpoint (the paper's); `trajectory` — each
    sample with the EK-FAC factors, probe gradient and its own gradient at the window checkpoint at
    or before its step (`mda.attribute.trajectory`); `exact` — the metagradient d f(θ_end) / d w_z
    through the replayed window (`mda.attribute.metagradient`). The probe draws' overlap and the
    token split are EK-FAC's and are made with `ekfac` only."""
    exact_segment: int = Field(50, ge=1)
    """`exact`: steps per recomputed segment of the reverse pass (memory: one segment's AdamW
    states, never the trajectory's activations)."""


# ----------------------------------------------------------------------------- select / retrain
ArmName = Literal["baseline", "remove-top", "remove-random", "remove-matched", "remove-bottom",
                  "augment-top", "augment-random", "augment-matched", "augment-synthetic"]


class Select(Section):
    """Which samples the interventions remove or add (stage `select`)."""

    fraction: float = Field(0.1, gt=0.0, le=1.0)
    """k as a share of the window's samples…"""
    count: int | None = Field(None, ge=1)
    """…or as a number of samples (overrides `fraction`)."""
    union: bool = True
    """With several target heads, also select on their union (mean of per-head scores / std)."""
    target: str = "auto"
    """Whose sets the retrain arms use: `auto` (the union with several targets, else the one
    target head), `union`, or a head name like `L2H2`."""


class Retrain(Section):
    """Counterfactual training runs from the window start (stage `retrain`)."""

    fixed_arms: list[ArmName] = Field(default_factory=lambda: ["baseline", "remove-top", "augment-top"])
    """Arms whose data does not depend on a seed: trained once, evaluated with every seed's
    probe (`remove-bottom` is opt-in, for the time budget)."""
    random_arms: list[ArmName] = Field(default_factory=lambda: ["remove-random", "remove-matched", "augment-random",
                                                                "augment-matched", "augment-synthetic"])
    """Arms trained once per seed (a new random set, or new synthetic rows, per seed): the
    controls `*-random` (drawn uniformly from the window) and `*-matched` (drawn with the top
    set's domain mix), and `augment-synthetic`, a targeted arm whose data depend on the seed."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    """Random arms: one set (and one run) per seed, so K = len(seeds) random sets per control;
    every arm: the evaluation probe seed. K ≥ 19 lets the rank test reach p = 0.05."""
    probe: ProbeSettings = ProbeSettings(seed=1000)
    """The evaluation probe every arm is scored on every `eval_every` steps: run seed s draws with
    seed `probe.seed + s`. Its own namespace, checked: no evaluation seed may be a probe seed that
    chose the head and window (`locate.probe`), scored the samples (`influence.probe_seed`,
    `influence.overlap_seeds`) or logged pretraining (`pretrain.probe`)."""
    tail_steps: int = Field(0, ge=0)
    """Steps trained after the window end (no interventions there)."""
    eval_every: int = Field(100, ge=1)
    copies: int = Field(1, ge=1)
    """Augment arms: copies of each selected sample (placed by `augment_placement`)."""
    augment_placement: Literal["in_place", "upweight", "later"] = "in_place"
    """Where augment copies go: `in_place` — each replaces a random non-selected row of its
    original's own step (removal's mirror image); `upweight` — the selected row's loss weight
    becomes 1 + `copies`, nothing else changes (`augment-synthetic`'s new rows go `in_place`);
    `later` — each replaces a non-selected row of a uniformly drawn later step of the window."""
    fresh_optimizer: bool = False
    """Allow a window start without trainer state (hub checkpoints): fresh AdamW moments at the
    schedule's learning rate for that step (exact at step 0, where Pythia's optimizer starts too)."""

    @model_validator(mode="after")
    def _arm_kinds(self):
        seeded = {"remove-random", "remove-matched", "augment-random", "augment-matched", "augment-synthetic"}
        for arm in self.fixed_arms:
            if arm in seeded:
                raise ValueError(f"fixed_arms: {arm} depends on the seed; list it in random_arms")
        for arm in self.random_arms:
            if arm not in seeded:
                raise ValueError(f"random_arms: {arm} does not depend on the seed; list it in fixed_arms")
        arms = self.fixed_arms + self.random_arms
        if len(set(arms)) != len(arms) or len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError("arms and seeds must be non-empty and must not repeat")
        return self


class Evaluate(Section):
    """Statistics over the counterfactual runs (stage `evaluate`)."""

    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """Emergence = the first step (interpolated between evaluations) at which the target score
    reaches this fraction of the baseline's score at the window end, per probe seed."""
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    """Level of the t-intervals over seeds and of the bootstrap intervals."""
    same_kind_score: float = Field(0.2, gt=0.0, le=1.0)
    """Transfer: a non-target head counts as the unit's kind (e.g. another induction head) when
    its score at the window end in the baseline run reaches this."""
    role_margin: float = Field(0.1, gt=0.0, le=1.0)
    """Unit-level view: the role moved from the target head to another head H of its layer when
    the target's window-end score is below the emergence level, H's is at or above it, and H's
    exceeds H's own baseline window-end score (same probe seed) by more than this."""
    bootstrap: int = Field(2000, ge=100)
    """Bootstrap resamples for the domain-enrichment intervals."""
    seed: int = Field(0, ge=0)
    top_samples: int = Field(10, ge=0)
    """Top-influence samples decoded to text for the report."""


# ----------------------------------------------------------------------------- lds
class Lds(Section):
    """Linear datamodeling score of the influence scores (stage `lds`, `mda.evaluate.lds`): retrain
    without random subsets of the window and rank-correlate predicted with measured changes."""

    enabled: bool = False
    """Off on the default (M retraining runs of the window: about 70 minutes on 2 CPU cores);
    `presets/lds.yaml` turns it on. Off, the stage only records that it did not run."""
    subsets: int = Field(32, ge=3)
    """M: random subsets, each removed and retrained once (subset m is the same whatever M, so
    raising M reuses the finished ones)."""
    fraction: float = Field(0.5, gt=0.0, lt=1.0)
    """Share of the window's samples each subset removes (loss weight 0, the retrain arms' rule)."""
    seed: int = Field(0, ge=0)
    """Seed of the subsets (subset m draws from the generator seeded [seed, m])."""
    bootstrap: int = Field(2000, ge=100)
    """Resamples of the subsets for the LDS interval."""
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    """Level of the bootstrap percentile interval."""
