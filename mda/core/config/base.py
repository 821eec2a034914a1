"""Sections of what a training run is: compute, corpus, model, pretraining (and the probe
settings every repeated-random-token probe uses)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
