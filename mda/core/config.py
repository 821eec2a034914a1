"""The typed schema of `params.yaml`: one model per section, unknown keys rejected.

`load_params()` is the only way stages read parameters. Any problem becomes a
`ConfigError` naming the dotted key and what was expected (exit code 2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mda.core.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- compute
class Compute(Section):
    """Where and how every model-running stage computes (mda.core.compute)."""

    device: Literal["auto", "cpu", "cuda"] = "cpu"
    """`cpu`, `cuda` (one GPU per process: `cuda:<LOCAL_RANK>`), or `auto` (cuda when available)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Forward/backward precision: `bfloat16` runs them under autocast; weights, optimizer state,
    EK-FAC covariances, eigendecompositions and score sums stay float32/float64."""
    micro_batch: int | None = Field(None, ge=1)
    """Rows per forward in training; an optimizer step still covers `corpus.batch_size` rows
    (gradient accumulation, one loss normaliser). `null`: all of a rank's rows at once."""
    procs: int = Field(1, ge=1)
    """Data-parallel processes (torchrun ranks) per stage; each needs its own GPU on cuda."""
    threads: int = Field(2, ge=1)
    """torch CPU threads per process. CPU results are bit-exact only for the same thread count
    (the retraining baseline reproduces pretraining only with the same value)."""


# ----------------------------------------------------------------------------- corpus
class SyntheticCorpus(Section):
    """The embedded, offline mini-Pile (see `mda.data.synthetic`)."""

    mix: dict[Literal["prose", "code", "markup", "latex", "table", "junk"],
              float] = Field(default_factory=lambda: {
                  "prose": 0.25, "code": 0.10, "markup": 0.10, "latex": 0.10,
                  "table": 0.15, "junk": 0.30})
    """Domain proportions (normalised)."""
    repeat_rate: float = Field(0.1, ge=0.0, le=1.0)
    """Chance, at each phrase/line, of copying a verbatim span from earlier in the document."""

    @model_validator(mode="after")
    def _mix_positive(self):
        if not self.mix or any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError("mix needs non-negative weights with a positive sum")
        return self


class PythiaCorpus(Section):
    """The pre-shuffled Pile as Megatron `.bin/.idx` (uint16 tokens, rows of seq_len + 1)."""

    path: str | None = None
    """Path prefix of the `.bin`/`.idx` pair (without extension)."""
    tokenizer: str | None = None
    """Local directory of the GPT-NeoX tokenizer (saved next to the stream for decoding)."""


class HfCorpus(Section):
    """A 🤗 `datasets` dataset or local text/jsonl/parquet files, tokenized and packed."""

    dataset: str | None = None
    """Dataset name (or local dataset directory) for `datasets.load_dataset`."""
    dataset_config: str | None = None
    split: str = "train"
    files: list[str] = Field(default_factory=list)
    """Local files; used instead of `dataset` when given (.txt, .jsonl/.json, .parquet)."""
    text_field: str = "text"
    tokenizer: str | None = None
    """Tokenizer name or local directory for `AutoTokenizer.from_pretrained`."""
    domain_field: str | None = None
    """Optional column holding each document's domain label (e.g. the Pile's `pile_set_name`)."""


class Corpus(Section):
    source: Literal["synthetic", "pythia", "hf"] = "synthetic"
    seed: int = Field(0, ge=0)
    seq_len: int = Field(64, ge=2)
    """Tokens the model sees per row; rows store seq_len + 1 tokens (inputs and shifted targets)."""
    batch_size: int = Field(16, ge=1)
    """Rows per optimizer step."""
    start_step: int = Field(0, ge=0)
    """First optimizer step of the stream to materialise."""
    steps: int = Field(9000, ge=1)
    """Number of optimizer steps of the stream to materialise."""
    heldout_rows: int = Field(256, ge=1)
    """Rows never trained on (`heldout.parquet`), for held-out loss and the ICL score."""
    synthetic: SyntheticCorpus = SyntheticCorpus()
    pythia: PythiaCorpus = PythiaCorpus()
    hf: HfCorpus = HfCorpus()

    @model_validator(mode="after")
    def _source_inputs(self):
        if self.source == "pythia" and not self.pythia.path:
            raise ValueError("corpus.pythia.path is required when source is 'pythia'")
        if self.source == "hf" and not (self.hf.dataset or self.hf.files):
            raise ValueError("corpus.hf.dataset or corpus.hf.files is required when source is 'hf'")
        if self.source == "hf" and not self.hf.tokenizer:
            raise ValueError("corpus.hf.tokenizer is required when source is 'hf'")
        return self


# ----------------------------------------------------------------------------- model
PythiaSize = Literal["14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"]
"""The sizes EleutherAI published (`EleutherAI/pythia-<size>`)."""


class HubModel(Section):
    """Pythia checkpoints from the Hugging Face hub (no optimizer state is published)."""

    size: PythiaSize = "14m"
    """Pythia size: 14m, 31m, 70m, 160m, 410m, 1b, 1.4b, 2.8b, 6.9b, 12b."""
    deduped: bool = False
    revisions: list[int] = Field(default_factory=lambda: [0, 1, 2, 4, 8, 16, 32, 64, 128,
                                                          256, 512, 1000, 2000])
    """Training steps to fetch, as `step<N>` revisions."""
    cache_dir: str | None = None
    """Hub cache directory (default: the huggingface_hub default)."""
    local_files_only: bool = False
    """Never touch the network; read only from `cache_dir`."""

    @property
    def repo_id(self) -> str:
        return f"EleutherAI/pythia-{self.size}{'-deduped' if self.deduped else ''}"


class Model(Section):
    source: Literal["pretrain", "hub"] = "pretrain"
    layers: int = Field(3, ge=1)
    hidden_size: int = Field(64, ge=8)
    heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=1)
    rotary_pct: float = Field(0.25, gt=0.0, le=1.0)
    max_position_embeddings: int = Field(256, ge=2)
    vocab_size: int | None = Field(None, ge=2)
    """Embedding rows; `null`: the corpus tokenizer's vocabulary (Pythia pads its 50,277 ids to 50,304)."""
    init_seed: int = Field(0, ge=0)
    hub: HubModel = HubModel()

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        return self


# ----------------------------------------------------------------------------- pretrain
class ProbeSettings(Section):
    """Repeated random-token sequences used to score induction heads."""

    sequences: int = Field(32, ge=1)
    half_len: int = Field(32, ge=2)
    """Length of the random half; each sequence is that half repeated once."""
    seed: int = Field(0, ge=0)


class Pretrain(Section):
    """Pythia's optimizer recipe, scaled down."""

    lr: float = Field(3e-3, gt=0.0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Cosine decay ends at this fraction of the peak learning rate."""
    weight_decay: float = Field(0.1, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    total_steps: int | None = Field(None, ge=1)
    """Length of the LR schedule (warm-up + cosine); `null`: the stream's length. Pythia: 143,000."""
    init: Literal["scratch", "hub"] = "scratch"
    """Initial weights: `scratch` (`model.init_seed`, GPT-NeoX's init) or `hub` (the `step0` revision
    of `model.hub`, Pythia's own initialisation; the model section must match its shape)."""
    save_every: int = Field(500, ge=1)
    """Checkpoint spacing after step 512 (before it: 0, 1, 2, 4, ..., 512 as Pythia)."""
    log_every: int = Field(10, ge=1)
    probe: ProbeSettings = ProbeSettings()


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


# ----------------------------------------------------------------------------- smda
class SmdaSection(Section):
    """A section of `smda`; its fields' docstrings become their descriptions (tested: every field has one)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class SmdaHub(SmdaSection):
    """A repository on the Hugging Face hub, read through the local hub cache."""

    repo_id: str | None = None
    """Repository id, e.g. `meta-llama/Llama-3.2-3B-Instruct`."""
    revision: str = "main"
    """Branch, tag or commit to read."""
    cache_dir: str | None = None
    """Hub cache directory (default: the huggingface_hub default)."""
    local_files_only: bool = False
    """Never touch the network; read only from the cache."""


class SmdaModel(SmdaSection):
    """The language model SMDA studies, before the instruct stage (mda.smda.lm)."""

    source: Literal["checkpoints", "hub"] = "checkpoints"
    """`checkpoints`: the last pretrained checkpoint in `data/checkpoints` with the corpus
    tokenizer (the embedded default); `hub`: a causal LM and its tokenizer from the hub."""
    hub: SmdaHub = SmdaHub()
    """The model's repository when `source` is `hub`."""
    chat_template: bool = False
    """Wrap each prompt as a user turn with the tokenizer's chat template (and its generation
    prompt); off for the synthetic task, whose prompts carry their own markers."""
    batch_size: int = Field(512, ge=1)
    """Sequences per forward pass when scoring prompts (bounds memory on big models)."""

    @model_validator(mode="after")
    def _hub_repo(self):
        if self.source == "hub" and not self.hub.repo_id:
            raise ValueError("smda.model.hub.repo_id is required when source is 'hub'")
        return self


class SmdaTaskFiles(SmdaSection):
    """A task given as local files (.jsonl, .json or .parquet) instead of the synthetic one."""

    sft: str | None = None
    """SFT pairs under study: columns `prompt`, `response`, `harmful` (bool, the class the
    dataset declares), optionally `mislabelled` (bool ground truth, never shown to the method)."""
    instruct: str | None = None
    """Optional pairs for the instruct stage (same columns); none: `smda.instruct.epochs` must be 0."""
    prompts: str | None = None
    """Prompts without responses: columns `prompt`, `harmful`; split at random into the
    SAE / policy / evaluation sets in the sizes `smda.task` gives."""


class SmdaTask(SmdaSection):
    """The instruction task and its ground truth (stage `smda-task`, mda.smda.task)."""

    source: Literal["synthetic", "files"] = "synthetic"
    """`synthetic`: prompts in the corpus vocabulary, harmful when they contain a word of a
    designated topic set, with a known share of mislabelled SFT pairs; `files`: `smda.task.files`."""
    seed: int = Field(0, ge=0)
    """Seed of everything the task draws (topic words, prompts, mislabelled pairs, splits)."""
    refusal_prefixes: list[str] = Field(default_factory=lambda: ["raise False", "raise None"])
    """The refusal's response prefixes; Y = log Σ over them of p(prefix | prompt) (as the
    paper's "I can't" / "I cannot"). Each must be encodable by the model's tokenizer."""
    topic_words: int = Field(16, ge=1)
    """Synthetic: size of the designated "harmful" topic set, drawn from the corpus's words."""
    prompt_words: int = Field(6, ge=2)
    """Synthetic: words per prompt (a harmful prompt holds 1–2 topic words among them)."""
    instruct_pairs: int = Field(1024, ge=0)
    """Synthetic: clean pairs the instruct stage trains on (half harmful)."""
    sft_pairs: int = Field(200, ge=2)
    """Synthetic: pairs of the SFT set under study (half harmful)."""
    mislabelled: float = Field(0.2, ge=0.0, lt=0.5)
    """Synthetic: share of SFT pairs per class whose response is the other class's (harmful
    prompts answered, harmless prompts refused): the ground truth curation is checked against."""
    sae_prompts: int = Field(2048, ge=1)
    """Prompts whose activations (every position) train the SAE (synthetic) or measure it."""
    policy_prompts: int = Field(160, ge=4)
    """Prompts the features and the policy are fitted on (split train/test by `smda.policy`)."""
    eval_prompts: int = Field(256, ge=2)
    """Held-out prompts the fine-tuned models are evaluated on (half harmful)."""
    files: SmdaTaskFiles = SmdaTaskFiles()
    """Files: the task's inputs when `source` is `files`."""

    @model_validator(mode="after")
    def _task_inputs(self):
        if not self.refusal_prefixes or any(not p.strip() for p in self.refusal_prefixes):
            raise ValueError("refusal_prefixes needs at least one non-empty prefix")
        if self.source == "files" and not (self.files.sft and self.files.prompts):
            raise ValueError("smda.task.files.sft and smda.task.files.prompts are required when source is 'files'")
        return self


class SftRecipe(SmdaSection):
    """Supervised fine-tuning through `mda.train.loop.Trainer` (AdamW with the pretraining recipe's
    betas and eps, warm-up then cosine decay); the loss is on the response tokens only."""

    epochs: int = Field(3, ge=0)
    """Passes over the pairs (0: no fine-tuning)."""
    batch_size: int = Field(16, ge=1)
    """Pairs per optimizer step."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak learning rate."""
    warmup_steps: int = Field(5, ge=0)
    """Steps of linear warm-up to the peak learning rate."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Cosine decay ends at this fraction of the peak learning rate."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay on matrices (biases and LayerNorms never)."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Gradient-norm clipping."""


class SmdaInstruct(SftRecipe):
    """The instruct stage: fine-tune the pretrained model into the refusal policy on the
    task's clean instruct pairs (`smda-instruct`). `epochs: 0` keeps the model as it is
    (e.g. an instruct model from the hub)."""

    seed: int = Field(0, ge=0)
    """Order of the pairs."""


class SmdaSae(SmdaSection):
    """The sparse autoencoder on the residual stream after block `layer` (stage `smda-sae`)."""

    source: Literal["train", "hub"] = "train"
    """`train`: a TopK SAE trained here on the model's activations; `hub`: an SAE in SAELens's
    format (`cfg.json` + `sae_weights.safetensors`) from `smda.sae.hub`."""
    layer: int = Field(1, ge=0)
    """Block (0-based) whose output residual stream the SAE reads, at the last prompt token."""
    width: int = Field(256, ge=2)
    """Train: latents (d_sae)."""
    k: int = Field(8, ge=1)
    """Train: active latents per input (TopK)."""
    steps: int = Field(1500, ge=1)
    """Train: optimizer steps."""
    batch_size: int = Field(512, ge=1)
    """Train: activation vectors per step."""
    lr: float = Field(1e-3, gt=0.0)
    """Train: Adam learning rate."""
    aux_k: int = Field(32, ge=0)
    """Train: latents in the auxiliary loss that revives dead latents (Gao et al.; 0 = off)."""
    heldout: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of the SAE prompts held out for explained variance and the dead-latent share."""
    seed: int = Field(0, ge=0)
    """Train: initialisation, batches and the held-out split."""
    hub: SmdaHub = SmdaHub()
    """The SAE's repository when `source` is `hub`."""
    hub_path: str = ""
    """Folder of the SAE inside the hub repository (SAELens's `sae_id`), e.g.
    `blocks.10.hook_resid_post`; empty: the repository root."""

    @model_validator(mode="after")
    def _sizes(self):
        if self.k > self.width:
            raise ValueError(f"k {self.k} exceeds width {self.width}")
        if self.source == "hub" and not self.hub.repo_id:
            raise ValueError("smda.sae.hub.repo_id is required when source is 'hub'")
        return self


class SmdaPolicy(SmdaSection):
    """Features and the symbolic policy over them (stage `smda-policy`)."""

    feature_threshold: float = Field(0.1, ge=0.0)
    """Keep latents whose mean activation on harmful minus harmless (training) prompts
    exceeds this in absolute value (paper: 0.1)."""
    ridge: float = Field(5.0, gt=0.0)
    """λ of the closed-form ridge W = (XᵀX + λI)⁻¹XᵀY, no intercept (paper: 5)."""
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of the policy prompts held out for test accuracy (stratified by label)."""
    generate_tokens: int = Field(4, ge=1)
    """Greedy tokens generated per prompt to label it refused (starts with a refusal prefix)."""
    seed: int = Field(0, ge=0)
    """Seed of the train/test split."""


class SmdaInfluence(SmdaSection):
    """Per-example influence on the policy (stage `smda-influence`)."""

    lr: float = Field(1e-3, gt=0.0)
    """Learning rate of the one plain SGD step per pair (loss on its response tokens)."""


class SmdaCurate(SmdaSection):
    """Curation by the influence scores, and random controls (stage `smda-curate`)."""

    rule: Literal["median", "oriented"] = "median"
    """`median`: SMDA's rule — drop harmful pairs scoring below the harmless pairs' median and
    harmless pairs above the harmful pairs' median; `oriented`: the same medians with the
    direction read from which class scores higher (mda.smda.curate). Both are reported."""
    random_draws: int = Field(1000, ge=1)
    """Random removals of the same size per class (seeds 0…n−1) for the precision/recall null;
    the `random` SFT arm of seed s uses draw s."""


class SmdaSft(SftRecipe):
    """SFT of the instruct model on the full / curated / random-removed sets (`smda-sft`)."""

    sets: list[Literal["full", "curated", "random", "oracle"]] = Field(
        default_factory=lambda: ["full", "curated", "random", "oracle"])
    """Which SFT sets to train: `full`; `curated` (the rule's removal); `random` (as many pairs
    per class removed at random); `oracle` (exactly the known mislabelled pairs removed — the
    ceiling for curation; needs a task with ground truth)."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    """One run per set and seed (the seed orders the pairs and picks the random removal)."""

    @model_validator(mode="after")
    def _seeds(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be non-empty and must not repeat")
        if not self.sets or len(set(self.sets)) != len(self.sets) or "full" not in self.sets:
            raise ValueError("sets must include full and must not repeat")
        return self


class SmdaEvaluate(SmdaSection):
    """Refusal on held-out prompts before and after SFT (stage `smda-evaluate`)."""

    generate_tokens: int = Field(8, ge=1)
    """Greedy tokens generated per prompt (a generation refuses if it starts with a prefix)."""
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    """Level of the t-intervals over seeds."""


class Smda(SmdaSection):
    """The second pipeline: Symbolic Mechanistic Data Attribution (`mda.smda`, stages `smda-*`)."""

    model: SmdaModel = SmdaModel()
    """The studied model."""
    task: SmdaTask = SmdaTask()
    """The instruction task and its ground truth (`smda-task`)."""
    instruct: SmdaInstruct = SmdaInstruct()
    """The instruct stage's fine-tuning (`smda-instruct`)."""
    sae: SmdaSae = SmdaSae()
    """The sparse autoencoder (`smda-sae`)."""
    policy: SmdaPolicy = SmdaPolicy()
    """Features and the ridge policy (`smda-policy`)."""
    influence: SmdaInfluence = SmdaInfluence()
    """Per-pair influence (`smda-influence`)."""
    curate: SmdaCurate = SmdaCurate()
    """Curation and its controls (`smda-curate`)."""
    sft: SmdaSft = SmdaSft()
    """Fine-tuning on the full / curated / random / oracle sets (`smda-sft`)."""
    evaluate: SmdaEvaluate = SmdaEvaluate()
    """Held-out refusal metrics (`smda-evaluate`)."""

    @model_validator(mode="after")
    def _instruct_data(self):
        if self.task.source == "files" and not self.task.files.instruct and self.instruct.epochs:
            raise ValueError("smda.instruct.epochs must be 0 without smda.task.files.instruct")
        return self


class Params(Section):
    compute: Compute = Compute()
    corpus: Corpus = Corpus()
    model: Model = Model()
    pretrain: Pretrain = Pretrain()
    locate: Locate = Locate()
    influence: Influence = Influence()
    select: Select = Select()
    retrain: Retrain = Retrain()
    evaluate: Evaluate = Evaluate()
    lds: Lds = Lds()
    smda: Smda = Smda()
    """The second pipeline, SMDA (stages `smda-*`)."""

    @model_validator(mode="after")
    def _fits_model(self):
        if self.model.source == "pretrain" and self.corpus.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"corpus.seq_len {self.corpus.seq_len} exceeds "
                             f"model.max_position_embeddings {self.model.max_position_embeddings}")
        return self

    @model_validator(mode="after")
    def _evaluation_probes_are_their_own(self):
        # torch's CPU generator keeps only a seed's low 32 bits, so seeds are compared modulo 2**32.
        used = {"locate.probe.seed": [self.locate.probe.seed], "influence.probe_seed": [self.influence.probe_seed],
                "influence.overlap_seeds": self.influence.overlap_seeds, "pretrain.probe.seed": [self.pretrain.probe.seed]}
        base = self.retrain.probe.seed
        for run_seed in self.retrain.seeds:
            for key, seeds in used.items():
                if any((base + run_seed - seed) % 2 ** 32 == 0 for seed in seeds):
                    raise ValueError(f"retrain.probe.seed: the evaluation probe of run seed {run_seed} "
                                     f"({base} + {run_seed}) is also a probe seed in {key}; evaluation needs probes "
                                     "that neither chose the head and window nor scored the samples")
        return self


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and first["type"] not in ("value_error", "assertion_error"):
        msg = f"{msg} (got {first['input']!r})"
    msg = msg.removeprefix("Value error, ")
    return f"{key}: {msg}" if key else msg


def parse_params(raw: dict) -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(f"params: {_describe(err)}") from None


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if raw is None or raw == {}:  # empty, only comments, or `{}`: never run silently on defaults
        raise ConfigError(f"{path}: empty (no sections); every stage reads its settings from this file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {_describe(err)}") from None


# ----------------------------------------------------------------------------- which keys a stage reads
class RecordedParams:
    """A read-only view of `Params` (or a section) that records the dotted key of every value
    read through it, so a test can check that `dvc.yaml` lists every param a stage reads.
    Nested sections come back as views too; a property (e.g. `hub.repo_id`) counts as reading
    its whole section, and `model_dump()` as reading every key below it."""

    def __init__(self, target: BaseModel, prefix: str, sink: set[str]):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_sink", sink)

    def _key(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name

    def __getattr__(self, name: str):
        target, fields = self._target, type(self._target).model_fields
        value = getattr(target, name)
        if name in fields:
            if isinstance(value, BaseModel):
                return RecordedParams(value, self._key(name), self._sink)
            self._sink.add(self._key(name))
            return value
        if name == "model_dump":
            def dump(*args, **kwargs):
                self._sink.add(self._prefix or "*")
                return value(*args, **kwargs)
            return dump
        if isinstance(getattr(type(target), name, None), property):
            self._sink.add(self._prefix or "*")
        return value

    def __setattr__(self, name, value):
        raise AttributeError("params are read-only")


def unwrap(section):
    """The plain pydantic object behind a `RecordedParams` view (for logging, which is no read)."""
    return section._target if isinstance(section, RecordedParams) else section
