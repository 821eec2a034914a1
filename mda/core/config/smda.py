"""Sections of the SMDA pipeline (stages `smda-*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from mda.core.config.base import Section


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
    read_position: Literal["last", "end_of_turn"] = "last"
    """Where the features (h) are read in a prompt: `last`, its last token (with the chat template,
    the end of the generation prompt, whose next-token distribution starts the response);
    `end_of_turn`, the end-of-turn token that closes the user's message (the tokenizer's eos, e.g.
    Llama 3's `<|eot_id|>`; needs `chat_template`)."""
    date_string: str = Field("26 Jul 2024", min_length=1)
    """The date the chat template writes into the prompt (Llama 3's `date_string`; templates
    without one ignore it). Pinned so that reruns encode the same prompts: without it Llama's
    template writes today's date. The default is that template's own fallback."""

    @model_validator(mode="after")
    def _hub_repo(self):
        if self.source == "hub" and not self.hub.repo_id:
            raise ValueError("smda.model.hub.repo_id is required when source is 'hub'")
        if self.read_position == "end_of_turn" and not self.chat_template:
            raise ValueError("read_position end_of_turn needs chat_template: true (the end-of-turn token "
                             "comes from the chat template)")
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
    refusal_patterns: list[str] = Field(default_factory=list)
    """Openings that make a greedy generation count as a refusal (the policy's labels, the
    evaluation's greedy metrics): its decoded text starts with one of them, ignoring case, leading
    whitespace and runs of whitespace, with ’ ‘ ʼ read as ', and the match ending at a word boundary
    ("I can't" matches "I CAN’T help", not "I can'tx"). Empty: `refusal_prefixes`."""
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
        if any(not p.strip() for p in self.refusal_patterns):
            raise ValueError("refusal_patterns must not hold an empty pattern")
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
    """Greedy tokens generated per prompt to label it refused (it opens with one of
    `smda.task.refusal_patterns`)."""
    seed: int = Field(0, ge=0)
    """Seed of the train/test split."""


class SmdaInfluence(SmdaSection):
    """Per-example influence on the policy (stage `smda-influence`)."""

    lr: float = Field(1e-3, gt=0.0)
    """Learning rate of the one plain SGD step per pair (loss on its response tokens)."""


RuleName = Literal["median", "oriented", "sign", "within_class", "median_harmful",
                   "sign_loss", "within_class_loss", "sign_dy", "within_class_dy"]
"""Curation rules (`mda.smda.curate`). On the pair's score: `median` (SMDA's published rule),
`oriented` (its direction read from the class medians; chosen after seeing scores: an ablation),
`sign` and `within_class` (declared before any of their results), `median_harmful` (the published
rule's harmful-side flags only, what the authors acted on). Baselines — the same `sign` /
`within_class` rules on another per-pair statistic: `*_loss` on −(the pair's SFT loss under the
instruct model), `*_dy` on the ΔY pathway's score alone."""


class SmdaCurate(SmdaSection):
    """Curation by the influence scores, and random controls (stage `smda-curate`)."""

    rule: RuleName = "median"
    """The rule whose removal the SFT sets `curated` / `random` use (SMDA's `median` by default);
    every rule in `rules` is measured against the ground truth and can be trained as
    `curated-<rule>` / `random-<rule>` (`smda.sft.sets`)."""
    rules: list[RuleName] = Field(default_factory=lambda: ["median", "oriented", "sign", "within_class",
                                                           "median_harmful", "sign_loss", "within_class_loss",
                                                           "sign_dy", "within_class_dy"])
    """Rules the curate stage applies and reports (precision / recall against the truth, random
    controls, the pathways' shares of the removed pairs' scores)."""
    random_draws: int = Field(1000, ge=1)
    """Random removals of the same size per class (seeds 0…n−1) for the precision/recall null;
    the `random` SFT arm of seed s uses draw s."""

    @model_validator(mode="after")
    def _rule_listed(self):
        if self.rule not in self.rules:
            raise ValueError(f"rule {self.rule!r} must be one of rules {self.rules}")
        if len(set(self.rules)) != len(self.rules):
            raise ValueError("rules must not repeat")
        return self


SET_PATTERN = r"^(full|oracle|curated|random)(-(median|oriented|sign|within_class|median_harmful|sign_loss|" \
              r"within_class_loss|sign_dy|within_class_dy))?$"


class SmdaSft(SftRecipe):
    """SFT of the instruct model on the full / curated / random-removed sets (`smda-sft`)."""

    sets: list[str] = Field(default_factory=lambda: ["full", "curated", "random", "oracle"])
    """Which SFT sets to train: `full`; `curated` (`smda.curate.rule`'s removal) or
    `curated-<rule>` (any rule of `smda.curate.rules`); `random` / `random-<rule>` (as many pairs
    per class removed at random); `oracle` (exactly the known mislabelled pairs removed — the
    ceiling for curation; needs a task with ground truth)."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    """One run per set and seed (the seed orders the pairs and picks the random removal)."""

    @model_validator(mode="after")
    def _seeds(self):
        import re

        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be non-empty and must not repeat")
        if not self.sets or len(set(self.sets)) != len(self.sets) or "full" not in self.sets:
            raise ValueError("sets must include full and must not repeat")
        for name in self.sets:
            if not re.match(SET_PATTERN, name) or name in ("full-", "oracle-") or \
                    (name.split("-", 1)[0] in ("full", "oracle") and "-" in name):
                raise ValueError(f"sets: {name!r} is not full, oracle, curated[-<rule>] or random[-<rule>]")
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
    def _sets_have_rules(self):
        for name in self.sft.sets:
            rule = name.split("-", 1)[1] if "-" in name else None
            if rule is not None and rule not in self.curate.rules:
                raise ValueError(f"sft.sets: {name!r} needs rule {rule!r} in curate.rules")
        return self

    @model_validator(mode="after")
    def _instruct_data(self):
        if self.task.source == "files" and not self.task.files.instruct and self.instruct.epochs:
            raise ValueError("smda.instruct.epochs must be 0 without smda.task.files.instruct")
        return self
