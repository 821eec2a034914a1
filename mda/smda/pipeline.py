"""What each `smda-*` stage computes: read its inputs, call the rooms, return tables and
summaries for the stage to write. The stage scripts (`stages/smda_*.py`) own the paths,
atomic writes and MLflow; everything here is a function of params and input folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import load_file as load_arrays

from mda.core.compute import runtime
from mda.core.config import Params
from mda.core.errors import MdaError
from mda.core.io import read_json, read_table
from mda.smda import curate as curation
from mda.smda import evaluate as ev
from mda.smda import lm as lms
from mda.smda import policy as pol
from mda.smda.influence import influence_scores
from mda.smda.sae import (Sae, check_fits, fetch_hub_sae, heldout_split, load_sae, quality, save_sae,
                          train_topk)
from mda.smda.sft import fine_tune
from mda.smda.task import build_task, check_classes, read_task, read_truth


def setup(params: Params):
    """The runtime, deterministic kernels on CPU (same bytes on rerun)."""
    rt = runtime(params.compute)
    if rt.device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    return rt


def load_lm(params: Params, instruct_dir) -> lms.LM:
    return lms.load_analysed(instruct_dir, params.smda.model, setup(params))


def prefixes(params: Params, lm: lms.LM) -> list[list[int]]:
    return lms.refusal_prefix_ids(lm.tokenizer, params.smda.task.refusal_prefixes)


def load_checked_sae(params: Params, lm: lms.LM, sae_dir) -> Sae:
    sae = load_sae(sae_dir)
    check_fits(sae, lm.hidden_size, params.smda.sae.layer, sae_dir)
    return sae


def encode_prompts(lm: lms.LM, prompts: pd.DataFrame) -> list[list[int]]:
    return [lms.encode_prompt(lm, p) for p in prompts.prompt]


# ----------------------------------------------------------------------------- smda-task
def run_task(params: Params, corpus_tokenizer) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """The task's tables; the refusal prefixes are checked against the model's tokenizer first."""
    tokenizer = lms.load_tokenizer(params.smda.model, corpus_tokenizer)
    ids = lms.refusal_prefix_ids(tokenizer, params.smda.task.refusal_prefixes)
    pairs, truth, prompts, meta = build_task(params.smda.task)
    meta["refusal_prefix_ids"] = ids
    return pairs, truth, prompts, meta


# ----------------------------------------------------------------------------- smda-instruct
def run_instruct(params: Params, checkpoints, corpus_tokenizer, task_dir, out: Path, on_step=None) -> tuple[list, dict]:
    """Fine-tune the studied model on the clean instruct pairs and write it to `out`."""
    rt = setup(params)
    smda = params.smda
    model = lms.load_base_model(smda.model, checkpoints)
    tokenizer = lms.load_tokenizer(smda.model, corpus_tokenizer)
    lm = lms.LM(model.to(rt.device), tokenizer, smda.model.chat_template, smda.model.batch_size, rt,
                smda.model.read_position, smda.model.date_string)
    pairs, _ = read_task(task_dir)
    chosen = pairs[pairs.set == "instruct"]
    if smda.instruct.epochs and chosen.empty:
        raise MdaError(f"{task_dir}/pairs.parquet: no instruct pairs, but smda.instruct.epochs is "
                       f"{smda.instruct.epochs}")
    log = fine_tune(lm, lms.pair_tokens(lm, chosen.prompt, chosen.response), smda.instruct,
                    smda.instruct.seed, desc="instruct", on_step=on_step) if smda.instruct.epochs else []
    where = lms.save_analysed(out, lm.model.cpu(), tokenizer, smda.model, trained=bool(log))
    meta = {"pairs": len(chosen), "steps": len(log), "final_loss": log[-1]["loss"] if log else None,
            "model": where}
    return log, meta


# ----------------------------------------------------------------------------- smda-sae
def run_sae(params: Params, instruct_dir, task_dir, out: Path, on_log=None) -> dict:
    """Train (or fetch) the SAE into `out`; measure it on held-out activations."""
    s = params.smda.sae
    lm = load_lm(params, instruct_dir)
    _, prompts = read_task(task_dir)
    ids = encode_prompts(lm, prompts[prompts.split == "sae"])
    if s.source == "hub":
        source = fetch_hub_sae(s, out)
        measure = ids
    else:
        train_rows, heldout_rows = heldout_split(len(ids), s.heldout, s.seed)
        every, _ = lms.residual_stream(lm, [ids[i] for i in train_rows], s.layer)
        sae, log = train_topk(every, s)
        for row in log:
            if on_log:
                on_log(row)
        save_sae(sae, out, s.layer, model_name="smda-instruct")
        source = {"trained_on_vectors": int(len(every)), "steps": s.steps}
        measure = [ids[i] for i in heldout_rows]
    sae = load_sae(out)  # the stored weights, through the one loader every later stage uses
    check_fits(sae, lm.hidden_size, s.layer, out if s.source == "train" else
               f"{s.hub.repo_id}/{s.hub_path}".rstrip("/"))
    every, last = lms.residual_stream(lm, measure, s.layer)
    metrics = {"source": s.source, **source, "architecture": sae.architecture, "d_in": sae.d_in,
               "d_sae": sae.d_sae, "k": sae.k, "layer": s.layer,
               "heldout_every_position": quality(sae, every), "heldout_last_token": quality(sae, last)}
    return metrics


# ----------------------------------------------------------------------------- smda-policy
def run_policy(params: Params, instruct_dir, sae_dir, task_dir) -> dict:
    """Features, the ridge policy and its accuracy on the policy prompts (tables + arrays)."""
    p = params.smda.policy
    lm = load_lm(params, instruct_dir)
    sae = load_checked_sae(params, lm, sae_dir)
    _, prompts = read_task(task_dir)
    prompts = prompts[prompts.split == "policy"].reset_index(drop=True)
    ids = encode_prompts(lm, prompts)
    pre = prefixes(params, lm)
    H, Y = lms.hidden_and_logprob(lm, ids, pre, params.smda.sae.layer)
    generations = lms.generate(lm, ids, p.generate_tokens)
    patterns = lms.refusal_texts(params.smda.task)
    refused = np.array([lms.refused(lm.tokenizer, g, patterns) for g in generations])
    harmful = prompts.harmful.to_numpy(bool)
    test = pol.stratified_split(refused, p.test_fraction, p.seed)
    Z = sae.encode(H).numpy()
    diff = pol.mean_difference(Z[~test], harmful[~test])
    kept = pol.select_features(diff, p.feature_threshold)
    X, Yn = Z[:, kept], Y.numpy()
    W = pol.ridge(X[~test], Yn[~test], p.ridge)
    score = X @ W
    threshold, train_acc = pol.best_threshold(score[~test], refused[~test])
    weights = np.full(len(diff), np.nan)
    weights[kept] = W
    features = pd.DataFrame({"latent": np.arange(len(diff)), "mean_harmful": Z[~test][harmful[~test]].mean(0),
                             "mean_harmless": Z[~test][~harmful[~test]].mean(0), "difference": diff,
                             "kept": np.isin(np.arange(len(diff)), kept), "weight": weights})
    table = pd.DataFrame({"prompt_id": prompts.prompt_id, "split": np.where(test, "test", "train"),
                          "harmful": harmful, "refused": refused, "y": Yn, "policy_score": score,
                          "predicted": score > threshold,
                          "generation": [lms.decode(lm.tokenizer, g) for g in generations]})
    summary = {
        "ridge": p.ridge, "feature_threshold": p.feature_threshold, "threshold": threshold,
        "features": [int(k) for k in kept], "weights": [float(w) for w in W],
        "train_accuracy": train_acc, "test_accuracy": pol.accuracy(score[test], refused[test], threshold),
        "majority_baseline": pol.majority_baseline(refused[~test], refused[test]),
        "train_prompts": int((~test).sum()), "test_prompts": int(test.sum()),
        "refusal_rate": {"harmful": float(refused[harmful].mean()), "harmless": float(refused[~harmful].mean())},
        "sae_at_read_position": quality(sae, H),
    }
    arrays = {"X_train": X[~test], "Y_train": Yn[~test], "W": W, "features": kept.astype(np.int64),
              "train_prompt_ids": prompts.prompt_id.to_numpy()[~test].astype(np.int64)}
    return {"features": features, "prompts": table, "summary": summary, "arrays": arrays}


def read_policy(policy_dir) -> tuple[dict, dict]:
    policy_dir = Path(policy_dir)
    try:
        arrays = load_arrays(policy_dir / "arrays.safetensors")
    except FileNotFoundError:
        raise MdaError(f"{policy_dir / 'arrays.safetensors'}: missing; run the smda-policy stage") from None
    return arrays, read_json(policy_dir / "policy.json", "run the smda-policy stage")


# ----------------------------------------------------------------------------- smda-influence
def run_influence(params: Params, instruct_dir, sae_dir, policy_dir, task_dir) -> dict:
    """Every SFT pair's score, per pathway and per feature."""
    lm = load_lm(params, instruct_dir)
    sae = load_checked_sae(params, lm, sae_dir)
    arrays, summary = read_policy(policy_dir)
    pairs, prompts = read_task(task_dir)
    sft = pairs[pairs.set == "sft"].reset_index(drop=True)
    check_classes(sft, f"{Path(task_dir) / 'pairs.parquet'}: the SFT set")
    by_id = prompts.set_index("prompt_id")
    probe = [lms.encode_prompt(lm, by_id.prompt[i]) for i in arrays["train_prompt_ids"]]
    results, checks = influence_scores(
        lm, sae, arrays["features"], arrays["X_train"], arrays["Y_train"], arrays["W"], summary["ridge"],
        probe, prefixes(params, lm), params.smda.sae.layer,
        lms.pair_tokens(lm, sft.prompt, sft.response), params.smda.influence.lr)
    harmful_probe = by_id.harmful.loc[arrays["train_prompt_ids"]].to_numpy(bool)
    scores = pd.DataFrame({
        "pair_id": sft.pair_id, "harmful": sft.harmful,
        "score": [r.score for r in results], "score_x": [r.score_x for r in results],
        "score_y": [r.score_y for r in results], "loss": [r.loss for r in results],
        "delta_y_harmful": [r.delta_y[harmful_probe].mean() for r in results],
        "delta_y_harmless": [r.delta_y[~harmful_probe].mean() for r in results]})
    features = arrays["features"]
    per_feature = pd.DataFrame({
        "pair_id": np.repeat(sft.pair_id.to_numpy(), len(features)),
        "latent": np.tile(features, len(sft)),
        "x": np.concatenate([r.per_feature_x for r in results]),
        "y": np.concatenate([r.per_feature_y for r in results])})
    meta = {**checks, "lr": params.smda.influence.lr, "pairs": len(sft), "probe_prompts": len(probe),
            "features": int(len(features))}
    return {"scores": scores, "per_feature": per_feature, "meta": meta}


# ----------------------------------------------------------------------------- smda-curate
def run_curate(params: Params, influence_dir, task_dir) -> dict:
    """Every rule's removal (`smda.curate.rules`), the random controls the SFT runs use (same size
    per class as each rule's), the pathways' shares of the removed pairs' scores, and — where the
    task has a ground truth — every rule's precision/recall against it and the scores' ranking of
    the mislabelled pairs within each class (AUC)."""
    c = params.smda.curate
    scores = read_table(Path(influence_dir) / "scores.parquet", "smda-influence")
    harmful = scores.harmful.to_numpy(bool)
    by_rule = {rule: curation.removal_rule(scores, rule) for rule in c.rules}
    sets = []
    for rule, removed in by_rule.items():
        sets.append(pd.DataFrame({"set": f"curated-{rule}", "seed": -1, "pair_id": scores.pair_id[removed]}))
        counts = curation.class_counts(harmful, removed)
        for seed in params.smda.sft.seeds:
            rand = curation.random_removal(harmful, counts, seed)
            sets.append(pd.DataFrame({"set": f"random-{rule}", "seed": seed, "pair_id": scores.pair_id[rand]}))
    truth = read_truth(task_dir).set_index("pair_id").mislabelled.reindex(scores.pair_id)
    has_truth = bool(truth.notna().all()) and bool(len(truth))
    if has_truth:
        sets.append(pd.DataFrame({"set": "oracle", "seed": -1, "pair_id": scores.pair_id[truth.to_numpy(bool)]}))
    removed_table = pd.concat(sets, ignore_index=True).astype({"seed": "int64", "pair_id": "int64"})
    table = scores[["pair_id", "harmful", "score"]].assign(**{f"removed_{r}": v for r, v in by_rule.items()})
    chosen = by_rule[c.rule]
    counts = curation.class_counts(harmful, chosen)
    summary = {"rule": c.rule, "rules": list(c.rules), "declared_in_advance": [r for r in c.rules
                                                                             if r in curation.DECLARED_IN_ADVANCE],
               "removed": int(chosen.sum()), "removed_harmful": counts[True], "removed_harmless": counts[False],
               "kept": int((~chosen).sum()),
               "per_rule": {r: {"removed": int(v.sum()), **{f"removed_{'harmful' if k else 'harmless'}": n
                                                           for k, n in curation.class_counts(harmful, v).items()},
                                "pathways": curation.pathway_shares(scores, v)} for r, v in by_rule.items()},
               "median_score": {"harmful": float(np.median(scores.score[harmful])),
                                "harmless": float(np.median(scores.score[~harmful]))}}
    summary["has_truth"] = has_truth
    if has_truth:
        mislabelled = truth.to_numpy(bool)
        table["mislabelled"] = mislabelled
        summary["truth"] = {rule: curation.against_truth(harmful, r, mislabelled, c.random_draws)
                            for rule, r in by_rule.items()}
        s = scores.score.to_numpy(float)
        summary["auc_mislabelled"] = {name: curation.auc(s[harmful == cls], mislabelled[harmful == cls])
                                      for cls, name in ((True, "harmful"), (False, "harmless"))}
        summary["pathways_mislabelled"] = curation.pathway_shares(scores, mislabelled)
    return {"removed": removed_table, "curation": table, "summary": summary}


def curate_metrics(summary: dict) -> dict:
    """What `dvc metrics show` lists: the configured rule's removal (and, with a ground truth, its
    precision / recall against random removals), and every rule's under `rules`."""
    fields = ("precision", "recall", "random_precision_mean", "random_recall_mean", "p_precision", "p_recall")
    out = {k: summary[k] for k in ("rule", "removed", "removed_harmful", "removed_harmless")}
    if summary["has_truth"]:
        out.update({k: summary["truth"][summary["rule"]][k] for k in fields})
        out["auc_mislabelled"] = summary["auc_mislabelled"]
    out["rules"] = {r: {"removed": v["removed"], "x_share_removed": v["pathways"]["removed"]["x_share"],
                        **({k: summary["truth"][r][k] for k in fields} if summary["has_truth"] else {})}
                    for r, v in summary["per_rule"].items()}
    return out


def resolved_set(set_name: str, rule: str) -> str:
    """`curated` / `random` are the configured rule's sets; other names are themselves."""
    return f"{set_name}-{rule}" if set_name in ("curated", "random") else set_name


def removed_pairs(curate_dir, set_name: str, seed: int) -> set[int]:
    path = Path(curate_dir) / "removed.parquet"
    removed = read_table(path, "smda-curate")
    if set_name == "full":
        return set()
    summary = read_json(path.with_name("summary.json"), "rerun smda-curate")
    if set_name == "oracle" and not summary["has_truth"]:
        raise MdaError(f"{path}: no oracle set — the task has no ground truth; drop oracle from smda.sft.sets")
    name = resolved_set(set_name, summary["rule"])
    if name not in set(removed.set):
        raise MdaError(f"{path}: no set {name!r} (the curate stage applied rules {', '.join(summary['rules'])}); "
                       "add its rule to smda.curate.rules")
    rows = removed[(removed.set == name) & (removed.seed == (seed if name.startswith("random") else -1))]
    return set(rows.pair_id.tolist())


# ----------------------------------------------------------------------------- smda-sft
def eval_outputs(params: Params, lm: lms.LM, task_dir) -> pd.DataFrame:
    """The model on the held-out evaluation prompts: Y, the greedy generation, refused or not."""
    _, prompts = read_task(task_dir)
    prompts = prompts[prompts.split == "eval"].reset_index(drop=True)
    ids = encode_prompts(lm, prompts)
    pre = prefixes(params, lm)
    _, Y = lms.hidden_and_logprob(lm, ids, pre, layer=None)
    generations = lms.generate(lm, ids, params.smda.evaluate.generate_tokens)
    patterns = lms.refusal_texts(params.smda.task)
    return pd.DataFrame({"prompt_id": prompts.prompt_id, "harmful": prompts.harmful, "y": Y.numpy(),
                         "refused": [lms.refused(lm.tokenizer, g, patterns) for g in generations],
                         "generation": [lms.decode(lm.tokenizer, g) for g in generations]})


def run_sft(params: Params, set_name: str, seed: int, instruct_dir, task_dir, curate_dir, on_step=None) -> dict:
    """Fine-tune the instruct model on one set (full / curated / random-removed) and evaluate it."""
    lm = load_lm(params, instruct_dir)
    pairs, _ = read_task(task_dir)
    sft = pairs[pairs.set == "sft"]
    removed = removed_pairs(curate_dir, set_name, seed)
    kept = sft[~sft.pair_id.isin(removed)]
    check_classes(kept, f"{Path(curate_dir) / 'removed.parquet'}: the {set_name} set (seed {seed})")
    log = fine_tune(lm, lms.pair_tokens(lm, kept.prompt, kept.response), params.smda.sft, seed,
                    desc=f"sft {set_name}-{seed}", on_step=on_step)
    outputs = eval_outputs(params, lm, task_dir)
    meta = {"set": set_name, "seed": seed, "pairs": len(kept), "removed": len(removed), "steps": len(log),
            "final_loss": log[-1]["loss"] if log else None,
            "harmful_pairs": int(kept.harmful.sum()), "harmless_pairs": int((~kept.harmful).sum()),
            "metrics": ev.run_metrics(outputs)}
    return {"outputs": outputs, "log": pd.DataFrame(log), "meta": meta}


# ----------------------------------------------------------------------------- smda-evaluate
def run_evaluate(params: Params, instruct_dir, task_dir, sft_dir) -> dict:
    """Every SFT run's metrics, the instruct model's, per-set summaries and the hypothesis test."""
    lm = load_lm(params, instruct_dir)
    before = ev.run_metrics(eval_outputs(params, lm, task_dir))
    rows, missing = [], []
    for set_name in params.smda.sft.sets:
        for seed in params.smda.sft.seeds:
            path = Path(sft_dir) / f"{set_name}-{seed}" / "eval.parquet"
            if not path.is_file():
                missing.append(f"{set_name}-{seed}")
                continue
            meta = read_json(path.with_name("meta.json"), "rerun smda-sft")
            rows.append({"set": set_name, "seed": seed, "pairs": meta["pairs"],
                         **ev.run_metrics(pd.read_parquet(path))})
    if not rows:
        raise MdaError(f"{sft_dir}: no SFT runs; run the smda-sft stages")
    runs = pd.DataFrame(rows)
    conf = params.smda.evaluate.confidence
    return {"runs": runs, "per_set": ev.per_set(runs, conf), "hypothesis": ev.hypothesis(runs, conf),
            "summary": {"instruct": before, "missing_runs": missing, "confidence": conf,
                        "seeds": list(params.smda.sft.seeds)}}
