"""Linear datamodeling score (LDS; Park et al. 2023, kronfluence's evaluation): how well summed
influence scores predict what retraining without a subset of the window does.

- **Subsets.** M random subsets S_m, each `lds.fraction` of the window's samples; subset m
  draws from a generator seeded [lds.seed, m], so it is the same whatever M is.
- **Measured.** Each S_m is removed (loss weight 0: `mda.intervene.edits.removal`, the rule of the
  retrain arms) and the model retrained from the window start to the window end through the
  arms' own loop (`mda.intervene.retrain.train_edit`). At the window end we measure, per target head, the
  influence probe f (`mda.attribute.probes`, on the tokens the scores differentiate) and the
  head's locate metric (the target score, on the arms' seed-0 evaluation probe), each
  minus its value in the unedited run (the checkpoint at the window end, which an unedited
  retrain reproduces bit for bit on CPU).
- **Predicted.** score(z) is (1/η ×) the change of f one gradient step on z makes (sign
  convention of `mda.attribute.scoring`). Removing z undoes its step, so the predicted change
  of f is −Σ_{z∈S} score(z). Spearman is invariant to the unknown positive factor η and to the
  baseline shift, but not to the sign: with this sign, an estimator that predicts well has
  LDS > 0. The same predicted change is compared with the target score, which the probe is a
  proxy for.
- **LDS** = Spearman over the M subsets between predicted and measured change; interval:
  percentile bootstrap over subsets (resampled with replacement).

Resumable: each finished subset is one JSON file in the work directory, written atomically
and recording the identity of what produced it (start checkpoint, stream, removed samples,
training and measurement settings, code); a rerun reuses the files whose identity matches.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mda.core.identity import checkpoint_digest, code_version, describe_mismatch, files_digest, value_digest
from mda.core.config import Params
from mda.data.stream import Stream
from mda.core.errors import MdaError
from mda.model.heads import Head
from mda.attribute.preconditioners import ESTIMATORS, preconditioners
from mda.units.probes import PROBES
from mda.intervene.edits import removal
from mda.core.io import clean_debris_in, read_json, write_json
from mda.units.measure import checkpoint_metrics
from mda.model.neox import load_model, step_dir
from mda.intervene.replay import train_edit
from mda.units.probes import evaluation_probes, influence_probe

OUTPUTS = {"probe": "influence probe f", "target_score": "target head's score"}
"""What is measured per subset at the window end (column `<output>_change` of the table)."""


# ----------------------------------------------------------------------------- subsets and predictions
def subset_ids(sample_ids: np.ndarray, fraction: float, seed: int, index: int) -> np.ndarray:
    """Subset `index`: round(fraction · n) of `sample_ids` drawn without replacement, sorted."""
    rng = np.random.default_rng([seed, index])
    k = int(round(fraction * len(sample_ids)))
    if not 1 <= k < len(sample_ids):
        raise MdaError(f"lds.fraction: {fraction} of the window's {len(sample_ids)} samples is {k} samples; "
                       "a subset needs at least one and must leave at least one")
    return np.sort(rng.choice(np.asarray(sample_ids, dtype=np.int64), size=k, replace=False))


def predicted_change(scores: pd.Series, subsets: dict[int, np.ndarray]) -> pd.Series:
    """Per subset, −Σ_{z∈S} score(z) (`scores` indexed by sample_id): the predicted change of f
    when S is removed, up to the learning rate's positive factor."""
    values = scores.sort_index()
    ids, v = values.index.to_numpy(), values.to_numpy(dtype=np.float64)
    out = {}
    for m, members in subsets.items():
        pos = np.searchsorted(ids, members)
        if (pos >= len(ids)).any() or (ids[np.minimum(pos, len(ids) - 1)] != members).any():
            raise MdaError(f"lds: subset {m} holds samples without a score; rerun the stage")
        out[m] = -v[pos].sum()
    return pd.Series(out, name="predicted_change").rename_axis("subset")


# ----------------------------------------------------------------------------- the score
def _rank_rows(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)  # ties: average ranks, as Spearman's rho takes them


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair of x and y (…, n): Pearson's r of their ranks (NaN where a
    row is constant)."""
    rx, ry = _rank_rows(x), _rank_rows(y)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(-1) / np.sqrt((rx ** 2).sum(-1) * (ry ** 2).sum(-1))


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) subset indices drawn with replacement (seeded)."""
    return np.random.default_rng([seed, 23]).integers(0, n, size=(resamples, n))


def lds(predicted, measured, resamples: int, confidence: float, seed: int = 0) -> dict:
    """Spearman over subsets between predicted and measured change, with the percentile
    bootstrap interval over subsets (resamples where either side is constant are dropped)."""
    x, y = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if len(x) != len(y) or len(x) < 3:
        raise MdaError(f"lds: needs at least 3 subsets with a measurement (have {min(len(x), len(y))})")
    idx = bootstrap_indices(len(x), resamples, seed)
    boot = spearman_rows(x[idx], y[idx])
    boot = boot[np.isfinite(boot)]
    tail = 100 * (1 - confidence) / 2
    low, high = (np.percentile(boot, [tail, 100 - tail]) if len(boot) else (np.nan, np.nan))
    return {"lds": float(spearman_rows(x, y)), "low": float(low), "high": float(high),
            "subsets": int(len(x)), "confidence": confidence, "resamples": int(len(boot))}


# ----------------------------------------------------------------------------- scores per estimator
def estimator_scores(inf, s, stream: Stream, gradients: str | os.PathLike, factors: dict) -> pd.DataFrame:
    """(sample_id, head, ekfac, kfac, identity): every window sample's score under each
    estimator (`mda.attribute.preconditioners`), from the same gradient cache (or streamed)."""
    from mda.attribute.scoring import preconditioned_probe, scores_from_cache, scores_streaming

    out = None
    for name in ESTIMATORS:
        vectors = preconditioned_probe(inf, s, preconditioners(factors, name))
        raw = scores_from_cache(inf, s, stream, gradients, vectors) if inf.mode == "cached" \
            else scores_streaming(inf, s, stream, vectors)
        raw = raw.rename(columns={"score": name})
        out = raw if out is None else out.merge(raw, on=["sample_id", "head"], validate="one_to_one")
    return out.sort_values(["head", "sample_id"], ignore_index=True)


# ----------------------------------------------------------------------------- measurements


@torch.no_grad()
def measure(model, probe: str, probe_ids: torch.Tensor, eval_ids: torch.Tensor, heads: list[Head],
            metric: str, max_sequences: int) -> dict[str, dict[str, float]]:
    """head → {probe: f, target_score: the head's locate metric} of `model`."""
    model.eval()
    device = next(model.parameters()).device
    frame, _ = checkpoint_metrics(model, eval_ids, None, max_sequences, full=False)
    frame = frame.set_index(["layer", "head"])
    return {h.name: {"probe": float(PROBES[probe](model, probe_ids.to(device), h).item()),
                     "target_score": float(frame.loc[(h.layer, h.head), metric])} for h in heads}


# ----------------------------------------------------------------------------- retraining per subset
def run_identity(params: Params, checkpoints, stream: Stream, targets: dict, probe: str, vocab: int | None) -> dict:
    """What every subset's outcome depends on besides its samples: a reused file must match."""
    start, end = int(targets["window"]["start"]), int(targets["window"]["end"])
    inf = params.influence
    return {"window": [start, end], "start_checkpoint": checkpoint_digest(step_dir(checkpoints, start)),
            "stream": files_digest(stream.parts(start, end - 1)),
            "train": value_digest([params.pretrain.model_dump(), params.retrain.fresh_optimizer,
                                   params.compute.model_dump()]),
            "measure": value_digest([probe, inf.probe_sequences, inf.probe_half_len, inf.probe_seed,
                                     params.retrain.probe.model_dump(), params.locate.max_sequences,
                                     [h["name"] for h in targets["heads"]], targets["metric"], vocab]),
            "code": code_version("mda.evaluate.lds")}


def ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def subset_file(work: Path, key: int | str) -> Path:
    """Random subset m → `subset-0000m.json`; a named removal (a top set: `top-ekfac-L2H2`) → `<name>.json`."""
    return Path(work) / (f"subset-{key:05d}.json" if isinstance(key, int) else f"{key}.json")


def finished_subsets(work: Path, identities: dict[int, dict]) -> tuple[dict[int, dict], list[str]]:
    """Outcomes of the subsets whose file records this identity; and why others were not reused."""
    done, why = {}, []
    for m, identity in identities.items():
        path = subset_file(work, m)
        if not path.is_file():
            continue
        try:
            stored = read_json(path, "")
        except MdaError:
            why.append("unreadable")
            continue
        if stored.get("identity") == identity:
            done[m] = stored
        else:
            why.append(describe_mismatch(stored.get("identity"), identity))
    return done, sorted(set(why))


def subset_outcomes(params: Params, checkpoints, corpus_dir, targets: dict, probe: str,
                    subsets: dict[int | str, np.ndarray], work: Path, rt, vocab: int | None,
                    what: str = "subsets") -> tuple[dict, dict, int]:
    """(the unedited run's measurements, {subset: its file's content}, how many were reused) —
    each missing subset retrained and measured, its file written as soon as it is finished (rank 0).
    `subsets`: removed samples by subset index, or by name for the top sets (`proponent_sets`)."""
    stream = Stream(Path(corpus_dir) / "stream")
    start, end = int(targets["window"]["start"]), int(targets["window"]["end"])
    heads = [Head(int(h["layer"]), int(h["head"])) for h in targets["heads"]]
    base = run_identity(params, checkpoints, stream, targets, probe, vocab)
    identities = {m: {**base, "removed": ids_digest(ids), "samples": int(len(ids))} for m, ids in subsets.items()}
    done, why = {}, []
    if rt.is_main:
        Path(work).mkdir(parents=True, exist_ok=True)
        clean_debris_in(work)  # a killed run's half-written file
        done, why = finished_subsets(work, identities)
    done = rt.broadcast_object(done)
    todo = [m for m in subsets if m not in done]
    if rt.is_main:
        print(f"lds: {len(done)} of {len(subsets)} {what} finished earlier and reused; {len(todo)} to retrain"
              + (f" (files from other inputs: {'; '.join(why)} differ)" if why else ""), flush=True)

    unedited, settings = {}, None
    if rt.is_main:  # measurements are made once, on rank 0
        end_model = rt.prepare(load_model(step_dir(checkpoints, end)))
        settings = (probe, influence_probe(params.influence, end_model.config),
                    evaluation_probes(params, end_model.config, vocab, [0])[0],  # the arms' seed-0 evaluation probe
                    heads, targets["metric"], params.locate.max_sequences)
        unedited = measure(end_model, *settings)
        del end_model

    rows = stream.read(start, end - 1, columns=["sample_id", "step", "batch_pos"]).to_pandas()
    for m in tqdm(todo, desc=f"lds: {what}", unit="run", disable=not rt.is_main):
        began = time.perf_counter()
        edit = removal(rows, set(subsets[m].tolist()), stream.batch_size)
        model, fresh = train_edit(params, checkpoints, stream, (start, end), edit, rt, desc=f"lds subset {m}")
        if rt.is_main:
            done[m] = {"identity": identities[m], "measured": measure(model, *settings), "fresh_optimizer": fresh,
                       "masked_rows": edit.summary["masked_rows"], "seconds": round(time.perf_counter() - began, 1)}
            write_json(subset_file(work, m), done[m])
        rt.barrier()
    return unedited, done, len(subsets) - len(todo)


# ----------------------------------------------------------------------------- proponents
def proponent_sets(scores: pd.DataFrame, fraction: float) -> dict[str, np.ndarray]:
    """Per estimator and target head, `top-<estimator>-<head>`: the round(fraction · n) samples with
    the highest scores (ties by sample id) — the samples each estimator says raise f most."""
    out = {}
    for head, g in scores.groupby("head", sort=True):
        k = int(round(fraction * len(g)))
        for name in ESTIMATORS:
            top = g.sort_values([name, "sample_id"], ascending=[False, True]).head(k)
            out[f"top-{name}-{head}"] = np.sort(top.sample_id.to_numpy(dtype=np.int64))
    return out


def proponent_table(table: pd.DataFrame, unedited: dict, outcomes: dict[str, dict], resamples: int,
                    confidence: float, seed: int) -> pd.DataFrame:
    """The proponent ratio per head × estimator × output: the measured change from removing the
    estimator's top set over the mean measured change from removing a random subset of the same
    size (the M LDS subsets), with a percentile bootstrap interval over the random subsets. A ratio
    far above 1 says the top set moves f far more than chance: what a good attribution finds."""
    rows = []
    tail = 100 * (1 - confidence) / 2
    for (head, name), g in table.groupby(["head", "estimator"], sort=True):
        g = g.sort_values("subset")
        idx = bootstrap_indices(len(g), resamples, seed)
        for out in OUTPUTS:
            top = outcomes[f"top-{name}-{head}"]["measured"][head][out] - unedited[head][out]
            random = g[f"{out}_change"].to_numpy(dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                boot = top / random[idx].mean(axis=1)
            boot = boot[np.isfinite(boot)]
            low, high = np.percentile(boot, [tail, 100 - tail]) if len(boot) else (np.nan, np.nan)
            rows.append({"head": head, "estimator": name, "output": out, "top_change": top,
                         "random_mean_change": float(random.mean()), "random_sd_change": float(random.std(ddof=1)),
                         "random_subsets": int(len(random)), "ratio": top / float(random.mean()),
                         "ratio_low": float(low), "ratio_high": float(high),
                         "removed": int(outcomes[f"top-{name}-{head}"]["masked_rows"])})
    return pd.DataFrame(rows)


def proponent_summary(table: pd.DataFrame) -> dict:
    """head → estimator → output → {ratio, low, high, top_change, random_mean_change} (None for NaN)."""
    value = lambda v: float(v) if np.isfinite(v) else None
    out = {}
    for r in table.itertuples():
        out.setdefault(r.head, {}).setdefault(r.estimator, {})[r.output] = {
            "ratio": value(r.ratio), "low": value(r.ratio_low), "high": value(r.ratio_high),
            "top_change": value(r.top_change), "random_mean_change": value(r.random_mean_change)}
    return out


# ----------------------------------------------------------------------------- tables
def subset_table(subsets: dict[int, np.ndarray]) -> pd.DataFrame:
    """(subset, sample_id): the removed samples."""
    return pd.DataFrame({"subset": np.repeat(np.array(list(subsets), dtype=np.int32), [len(v) for v in subsets.values()]),
                         "sample_id": np.concatenate(list(subsets.values())).astype(np.int64)})


def per_subset_table(scores: pd.DataFrame, subsets: dict[int, np.ndarray], unedited: dict,
                     outcomes: dict[int, dict]) -> pd.DataFrame:
    """(subset, head, estimator, predicted_change, probe_change, target_score_change, probe,
    target_score): one row per subset × target head × estimator."""
    parts = []
    for head, group in scores.groupby("head"):
        measured = pd.DataFrame({
            "subset": list(outcomes),
            **{out: [outcomes[m]["measured"][head][out] for m in outcomes] for out in OUTPUTS}})
        for out in OUTPUTS:
            measured[f"{out}_change"] = measured[out] - unedited[head][out]
        for name in ESTIMATORS:
            predicted = predicted_change(group.set_index("sample_id")[name], subsets).reset_index()
            parts.append(predicted.merge(measured, on="subset").assign(head=head, estimator=name))
    cols = ["subset", "head", "estimator", "predicted_change"] + [f"{o}_change" for o in OUTPUTS] + list(OUTPUTS)
    return pd.concat(parts, ignore_index=True)[cols].sort_values(["head", "estimator", "subset"], ignore_index=True)


def summarise(table: pd.DataFrame, resamples: int, confidence: float, seed: int) -> dict:
    """head → estimator → output → {lds, low, high, …}."""
    out = {}
    for (head, name), g in table.groupby(["head", "estimator"], sort=True):
        out.setdefault(head, {})[name] = {o: lds(g.predicted_change, g[f"{o}_change"], resamples, confidence, seed)
                                          for o in OUTPUTS}
    return out


def plot_lds(table: pd.DataFrame, summary: dict, path) -> None:
    """Predicted vs measured change per subset: one row per measured output, one column per estimator."""
    from mda.core import plots

    names = list(ESTIMATORS)
    fig, axes = plots.plt.subplots(len(OUTPUTS), len(names), figsize=(4 * len(names), 3.6 * len(OUTPUTS)),
                                   squeeze=False)
    for i, (out, label) in enumerate(OUTPUTS.items()):
        for j, name in enumerate(names):
            ax = axes[i][j]
            for head, g in table[table.estimator == name].groupby("head"):
                r = summary[head][name][out]
                ax.scatter(g.predicted_change, g[f"{out}_change"], s=14,
                           label=f"{head}: LDS {r['lds']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]")
            ax.set_xlabel(f"predicted Δf = −Σ score ({name})")
            ax.set_ylabel(f"measured Δ {label}")
            ax.set_title(f"{name}: {label}", fontsize=10)
            ax.legend(fontsize=7)
    fig.suptitle("LDS: summed scores of the removed half vs retraining without it (one point per subset)")
    plots.save(fig, path)
