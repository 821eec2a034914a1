"""`Params`, the whole file: every section, the checks across sections, and the one way stages
read it (`load_params`); `RecordedParams`, a view that records which keys a stage read."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from mda.core.config.base import Compute, Corpus, Model, Pretrain, Section
from mda.core.config.experiment import Evaluate, Influence, Lds, Locate, Retrain, Select
from mda.core.config.smda import Smda
from mda.core.errors import ConfigError


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
