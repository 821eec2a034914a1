"""The instruction task SMDA studies, and its ground truth.

Three tables (stage `smda-task`, `data/smda/task/`):
- `pairs.parquet` — `pair_id`, `set` (`instruct` | `sft`), `prompt`, `response`, `harmful`
  (the class the dataset declares for the prompt). This is all the method sees.
- `truth.parquet` — `pair_id`, `mislabelled`: whether the response is the other class's
  (a harmful prompt answered, a harmless one refused). Only the curation check and the
  report read it; it is null where a file-based task carries no ground truth.
- `prompts.parquet` — `prompt_id`, `split` (`sae` | `policy` | `eval`), `prompt`, `harmful`:
  prompts without responses, for the SAE, the policy and the held-out evaluation.

The embedded default (`synthetic`) speaks the corpus's word-level vocabulary: a prompt is
`head : w1 … wn ? ↵`; it is harmful when it holds a word of a designated topic set. The
behaviour is a refusal (`raise False .` / `raise None .`) for harmful prompts and a
compliant continuation (`return` + three of the prompt's words + `.`) for the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from mda.core.config import SmdaTask
from mda.core.io import read_table
from mda.core.errors import MdaError

PROMPT_OPEN, PROMPT_CLOSE = ("head", ":"), ("?", "\u21b5")
COMPLY = "return"
WORD_POOL = 450
"""Topic and filler words come from the corpus's 450 most frequent prose words, so the
pretrained model has seen every one of them many times."""
SPLITS = ("sae", "policy", "eval")


# ----------------------------------------------------------------------------- the synthetic task
def topic_words(task: SmdaTask) -> tuple[list[str], list[str]]:
    """(the harmful topic words, the neutral filler words), drawn from the corpus vocabulary."""
    from mda.data.synthetic import build_vocabulary

    vocab = build_vocabulary()
    pool = [vocab.tokens[i] for i in vocab.groups["word"][:WORD_POOL]]
    rng = np.random.default_rng([task.seed, 0])
    chosen = set(rng.choice(len(pool), size=task.topic_words, replace=False).tolist())
    return [pool[i] for i in sorted(chosen)], [w for i, w in enumerate(pool) if i not in chosen]


class _PromptMaker:
    """Distinct prompts: n filler words, and for harmful ones 1–2 of them replaced by topic words."""

    def __init__(self, task: SmdaTask, topic: list[str], filler: list[str]):
        self.task, self.topic, self.filler = task, topic, filler
        self.rng = np.random.default_rng([task.seed, 1])
        self.seen: set[str] = set()

    def words(self, harmful: bool) -> list[str]:
        while True:
            words = [self.filler[i] for i in self.rng.integers(len(self.filler), size=self.task.prompt_words)]
            if harmful:
                n = int(self.rng.integers(1, 3))
                for pos in self.rng.choice(len(words), size=n, replace=False):
                    words[pos] = self.topic[int(self.rng.integers(len(self.topic)))]
            text = " ".join(words)
            if text not in self.seen:
                self.seen.add(text)
                return words

    def batch(self, n: int) -> tuple[list[list[str]], list[bool]]:
        """`n` prompts' words, half harmful (the first ⌈n/2⌉), and their classes."""
        harmful = [i < (n + 1) // 2 for i in range(n)]
        return [self.words(h) for h in harmful], harmful


def prompt_text(words: list[str]) -> str:
    return " ".join([*PROMPT_OPEN, *words, *PROMPT_CLOSE])


def refusal_text(prefixes: list[str], i: int) -> str:
    return f"{prefixes[i % len(prefixes)]} ."


def compliance_text(words: list[str], topic: set[str]) -> str:
    kept = [w for w in words if w not in topic][:3]
    return " ".join([COMPLY, *kept, "."])


def _pairs(maker: _PromptMaker, n: int, mislabelled_share: float, prefixes: list[str], topic: set[str],
           rng: np.random.Generator) -> pd.DataFrame:
    """`n` pairs, half harmful; per class, round(share × class size) responses swapped."""
    words, harmful = maker.batch(n)
    harmful = np.asarray(harmful)
    flip = np.zeros(n, dtype=bool)
    for cls in (True, False):
        members = np.flatnonzero(harmful == cls)
        flip[rng.choice(members, size=int(round(mislabelled_share * len(members))), replace=False)] = True
    refuse = harmful ^ flip
    responses = [refusal_text(prefixes, i) if r else compliance_text(w, topic)
                 for i, (w, r) in enumerate(zip(words, refuse))]
    return pd.DataFrame({"prompt": [prompt_text(w) for w in words], "response": responses,
                         "harmful": harmful, "mislabelled": flip})


def synthetic_task(task: SmdaTask) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(pairs with a `mislabelled` column, prompts, meta) of the embedded task."""
    topic, filler = topic_words(task)
    maker = _PromptMaker(task, topic, filler)
    rng = np.random.default_rng([task.seed, 2])
    topic_set = set(topic)
    instruct = _pairs(maker, task.instruct_pairs, 0.0, task.refusal_prefixes, topic_set, rng).assign(set="instruct")
    sft = _pairs(maker, task.sft_pairs, task.mislabelled, task.refusal_prefixes, topic_set, rng).assign(set="sft")
    prompts = []
    for split, n in zip(SPLITS, (task.sae_prompts, task.policy_prompts, task.eval_prompts)):
        words, harmful = maker.batch(n)
        prompts.append(pd.DataFrame({"split": split, "prompt": [prompt_text(w) for w in words],
                                     "harmful": harmful}))
    meta = {"topic_words": topic, "filler_words": len(filler)}
    return pd.concat([instruct, sft], ignore_index=True), pd.concat(prompts, ignore_index=True), meta


# ----------------------------------------------------------------------------- a task from files
def read_task_file(path: str | os.PathLike, key: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """A .jsonl/.json/.parquet file with at least `columns`; `harmful` (and `mislabelled`) as bool."""
    path = Path(path)
    if not path.is_file():
        raise MdaError(f"{path}: not found (params smda.task.files.{key})")
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif path.suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=path.suffix == ".jsonl")
        else:
            raise MdaError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json or .parquet)")
    except MdaError:
        raise
    except Exception as err:
        raise MdaError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MdaError(f"{path}: missing column(s) {', '.join(missing)}")
    for col in ("harmful", "mislabelled"):
        if col in frame.columns:
            if frame[col].isna().any() or not frame[col].isin([True, False]).all():
                raise MdaError(f"{path}: column {col} must be true/false in every row")
            frame[col] = frame[col].astype(bool)
    for col in ("prompt", "response"):
        if col in frame.columns and not frame[col].map(lambda v: isinstance(v, str) and bool(v.strip())).all():
            raise MdaError(f"{path}: column {col} must be a non-empty string in every row")
    return frame


def file_task(task: SmdaTask) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    files = task.files
    sft = read_task_file(files.sft, "sft", ("prompt", "response", "harmful")).assign(set="sft")
    parts = [sft]
    if files.instruct:
        instruct = read_task_file(files.instruct, "instruct", ("prompt", "response", "harmful"))
        parts.insert(0, instruct.assign(set="instruct", mislabelled=instruct.get("mislabelled", False)))
    pairs = pd.concat(parts, ignore_index=True)
    if "mislabelled" not in sft.columns:
        pairs["mislabelled"] = pd.array([pd.NA] * len(pairs), dtype="boolean")
    prompts = read_task_file(files.prompts, "prompts", ("prompt", "harmful"))
    need = task.policy_prompts + task.eval_prompts + 1
    if len(prompts) < need:
        raise MdaError(f"{files.prompts}: {len(prompts)} prompts; smda.task asks for "
                       f"{task.policy_prompts} policy + {task.eval_prompts} eval + at least 1 for the SAE")
    order = np.random.default_rng([task.seed, 3]).permutation(len(prompts))
    sizes = (task.policy_prompts, task.eval_prompts)
    split = np.full(len(prompts), "sae", dtype=object)
    split[order[:sizes[0]]] = "policy"
    split[order[sizes[0]:sizes[0] + sizes[1]]] = "eval"
    keep_sae = order[sizes[0] + sizes[1]:][:task.sae_prompts]
    chosen = np.sort(np.concatenate([order[:sizes[0] + sizes[1]], keep_sae]))
    prompts = pd.DataFrame({"split": split[chosen], "prompt": prompts.prompt.to_numpy()[chosen],
                            "harmful": prompts.harmful.to_numpy()[chosen]})
    check_eval_unseen(prompts, pairs, files)
    return pairs, prompts, {"files": files.model_dump()}


def check_eval_unseen(prompts: pd.DataFrame, pairs: pd.DataFrame, files) -> None:
    """No evaluation prompt is also the prompt of a pair the models train on (the SFT or instruct
    pairs; compared ignoring case and runs of whitespace): the held-out refusal rates would
    otherwise be measured partly on training prompts."""
    key = lambda text: " ".join(text.split()).casefold()
    evals = prompts.prompt[prompts.split == "eval"]
    for name, path in (("sft", files.sft), ("instruct", files.instruct)):
        seen = set(pairs.prompt[pairs.set == name].map(key))
        hits = [p for p in evals if key(p) in seen]
        if hits:
            raise MdaError(f"{files.prompts}: {len(hits)} of the {len(evals)} evaluation prompts also appear among "
                           f"the {name} pairs of {path}, e.g. {hits[0][:80]!r}; remove them from one of the files "
                           f"(params smda.task.files)")


# ----------------------------------------------------------------------------- both
def build_task(task: SmdaTask) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """(pairs, truth, prompts, meta) for the configured source, checked."""
    pairs, prompts, meta = synthetic_task(task) if task.source == "synthetic" else file_task(task)
    pairs.insert(0, "pair_id", np.arange(len(pairs), dtype=np.int64))
    prompts.insert(0, "prompt_id", np.arange(len(prompts), dtype=np.int64))
    where = task.files.sft if task.source == "files" else "params: smda.task"
    check_classes(pairs[pairs.set == "sft"], f"{where}: the SFT set")
    for split in ("policy", "eval"):
        check_classes(prompts[prompts.split == split], f"{task.files.prompts if task.source == 'files' else where}: "
                                                        f"the {split} prompts")
    truth = pairs[["pair_id", "mislabelled"]].copy()
    pairs = pairs[["pair_id", "set", "prompt", "response", "harmful"]]
    sft = truth[pairs.set == "sft"]
    meta.update({"source": task.source, "refusal_prefixes": list(task.refusal_prefixes),
                 "pairs": {s: int((pairs.set == s).sum()) for s in ("instruct", "sft")},
                 "prompts": {s: int((prompts.split == s).sum()) for s in SPLITS},
                 "has_truth": bool(sft.mislabelled.notna().all()) and len(sft) > 0,
                 "mislabelled_sft": int(sft.mislabelled.fillna(False).sum())})
    return pairs, truth, prompts, meta


def check_classes(frame: pd.DataFrame, what: str) -> None:
    """Both classes present, or one line naming what lacks which."""
    for cls, name in ((True, "harmful"), (False, "harmless")):
        if not (frame.harmful == cls).any():
            raise MdaError(f"{what} has no {name} pair (column harmful); SMDA needs both classes")


def read_task(directory: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pairs, prompts) as the method sees them (no ground truth)."""
    directory = Path(directory)
    return read_table(directory / "pairs.parquet", "smda-task"), read_table(directory / "prompts.parquet", "smda-task")


def read_truth(directory: str | os.PathLike) -> pd.DataFrame:
    return read_table(Path(directory) / "truth.parquet", "smda-task")
