"""Cross-library check: mda's head-restricted EK-FAC influence scores against EleutherAI's bergson 2.5.0.

What. For the first target head h of a finished run, at its influence checkpoint, both libraries
score N window samples, score(z) = −⟨∇θₕ L(z), (F + λ)⁻¹ ∇θₕ f⟩ over h's blocks qk, v, o
(`mda.model.heads`), with EK-FAC fitted on the same factor rows (`factor_subset`), the true Fisher, damping
λ = α·mean(Λ) per block (bergson: InversionConfig("damped_inverse", α); its mean runs over the
module's eigenvalue grid, hessians/preconditioner.py FactoredPreconditioner._scale) and L(z) the
summed next-token CE (IndexConfig(loss_reduction="sum")). mda's side is recomputed in-process with
its own functions (fit_ekfac, preconditioned_probe, stored_gradients). Out: Spearman, Pearson, top-10 %
overlap, and per block where a gap starts (probe gradient, training gradients, preconditioned probe).

Why the layer is rewritten. bergson's per-head option (IndexConfig.attention, AttentionConfig;
collector/collector.py HookCollectorBase.split_attention_heads) only narrows the backward hook's
gradient to contiguous output rows. Its factor collectors (hessians/kfac.py CovarianceCollector,
hessians/eigenvectors.py LambdaCollector) fit one Kronecker pair per whole module, and nothing selects
input columns, which `o` (h's d_head columns of attention.dense) needs. So the head's layer gets one
nn.Linear per block, same function: query_key_value → qk (h's q,k rows), v (its v rows), rest (other
rows, biased) + h's bias, rows put back in fused order; dense → o(x[..., h's columns]) + rest(x[...,
other columns]). bergson's per-module EK-FAC on {qk, v, o} is then mda's per-block EK-FAC; the logits
are checked to match.

Labels. bergson samples Fisher labels with torch.multinomial, anew in each of its two passes
(collector.py fwd_bwd_hessian_factory); mda by inverse CDF from a seeded generator, the same draws in
both passes (mda.model.losses.sampled_sequence_losses). So bergson runs `native` (its own draws; read it against
`mda_vs_mda_other_label_seed`, mda with label_seed + 1, the sampling-noise floor) and `shared_labels`
(mda's draws, recorded during its fit, given to bergson as dataset labels), where only the two
implementations can differ.

    pip install --no-deps bergson==2.5.0 simple_parsing docstring_parser petname ml_dtypes peft natsort
    python benchmarks/bergson_check.py --run CLONE --samples 256 --json benchmarks/results/bergson_check.json
    python benchmarks/bergson_check.py --selftest      # tiny random GPT-NeoX, no run directory
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

INSTALL = "pip install --no-deps bergson==2.5.0 simple_parsing docstring_parser petname ml_dtypes peft natsort"


def fail(message: str):
    raise SystemExit(f"bergson_check: {message}")


def bergson_version() -> str:
    try:
        import bergson
        from bergson.hessians.hessian_approximations import fit_factored_hessians  # noqa: F401
    except ImportError as err:
        fail(f"bergson is not importable ({err}); install it with: {INSTALL}")
    import logging
    for handler in logging.getLogger().handlers:  # bergson's import logs to stdout; keep stdout for the JSON
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    return bergson.__version__


# ----------------------------------------------------------------------------- the rewritten layer
def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class SplitQKV(nn.Module):
    """query_key_value as Linear `qk` and `v` (the head's rows, no bias) and `rest` (other rows, biased)."""

    def __init__(self, fused: nn.Linear, qk_rows: torch.Tensor, v_rows: torch.Tensor):
        super().__init__()
        w, b = fused.weight.detach(), None if fused.bias is None else fused.bias.detach()
        head = torch.cat([qk_rows, v_rows])
        rest = torch.tensor(sorted(set(range(fused.out_features)) - set(head.tolist())), dtype=torch.long)
        self.qk, self.v = _linear(w[qk_rows], None), _linear(w[v_rows], None)
        self.rest = _linear(w[rest], None if b is None else b[rest])
        self.head_bias = None if b is None else nn.Parameter(b[head].clone())
        self.register_buffer("order", torch.argsort(torch.cat([head, rest])).to(w.device))  # back to fused rows

    def forward(self, x):
        head = torch.cat([self.qk(x), self.v(x)], -1)
        if self.head_bias is not None:
            head = head + self.head_bias
        return torch.cat([head, self.rest(x)], -1)[..., self.order]


class SplitDense(nn.Module):
    """attention.dense as o(x[..., head columns]) + rest(x[..., other columns]), the bias in `rest`."""

    def __init__(self, fused: nn.Linear, cols: torch.Tensor):
        super().__init__()
        w, b = fused.weight.detach(), None if fused.bias is None else fused.bias.detach()
        other = torch.tensor(sorted(set(range(fused.in_features)) - set(cols.tolist())), dtype=torch.long)
        self.o, self.rest = _linear(w[:, cols], None), _linear(w[:, other], b)
        self.register_buffer("cols", cols.to(w.device))
        self.register_buffer("other", other.to(w.device))

    def forward(self, x):
        return self.o(x[..., self.cols]) + self.rest(x[..., self.other])


def split_model(model, head, blocks: list[str]):
    """A copy of `model` with one Linear per block in the head's layer; block → its name under base_model."""
    from mda.model.heads import block_rows

    split = copy.deepcopy(model)
    att, cfg = split.gpt_neox.layers[head.layer].attention, split.config
    att.query_key_value = SplitQKV(att.query_key_value, block_rows(cfg, head.head, "qk"),
                                   block_rows(cfg, head.head, "v"))
    att.dense = SplitDense(att.dense, block_rows(cfg, head.head, "o"))
    where = {"qk": "query_key_value.qk", "v": "query_key_value.v", "o": "dense.o"}
    return split, {b: f"layers.{head.layer}.attention.{where[b]}" for b in blocks}


# ----------------------------------------------------------------------------- the two sides
def mda_side(inf, s, factor_source, train_rows: torch.Tensor) -> dict:
    """mda's scores from its own functions; also its label draws (for `shared_labels`) and pieces."""
    import mda.model.losses
    from mda.attribute.ekfac import fit_ekfac
    from mda.attribute.scoring import preconditioned_probe, stored_gradients

    began, draws, sample = time.perf_counter(), [], mda.model.losses._sample

    def recording(logits, generator):
        out = sample(logits, generator)
        draws.append(out.cpu())
        return out

    mda.model.losses._sample = recording  # sampled_sequence_losses looks `_sample` up in mda.model.losses
    try:
        factors = fit_ekfac(s.model, factor_source, s.all_blocks, fisher=inf.fisher, alpha=inf.damping,
                            seed=inf.label_seed, where=s.where, rt=s.rt)
    finally:
        mda.model.losses._sample = sample
    vectors = preconditioned_probe(inf, s, factors)
    parts = [stored_gradients(inf, s, ids) for ids in train_rows.split(inf.batch_size)]
    grads = {b.name: np.concatenate([p[b.name] for p in parts]) for b in s.all_blocks}
    scores = -sum(grads[n] @ vectors[n].reshape(-1).numpy() for n in grads)
    labels = None
    if draws:  # two passes, the same draws in each
        half = len(draws) // 2
        labels = torch.cat(draws[:half])
        assert torch.equal(labels, torch.cat(draws[half:])), "mda's two passes drew different labels"
    return {"scores": scores, "vectors": vectors, "grads": grads, "labels": labels,
            "seconds": time.perf_counter() - began}


def batched(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def bergson_side(model, head, blocks, probe, probe_tokens, factor_rows, train_rows, *, alpha: float,
                 batch_size: int, labels: torch.Tensor | None, seed: int, workdir: Path) -> dict:
    """bergson's EK-FAC on the rewritten layer: fit, precondition the probe gradient, per-sample grads."""
    from datasets import Dataset

    from bergson import CollectorComputer, GradientProcessor, IndexConfig, InMemoryCollector, PreprocessConfig
    from bergson.config import HessianConfig, InversionConfig
    from bergson.hessians.hessian_approximations import fit_factored_hessians
    from bergson.hessians.preconditioner import FactoredPreconditioner
    from mda.units.probes import PROBES

    began = time.perf_counter()
    split, names = split_model(model, head, blocks)
    cfg = IndexConfig(run_path=str(workdir / "index"), loss_fn="ce", loss_reduction="sum")
    cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
    columns = {"input_ids": factor_rows.tolist()}
    if labels is not None:  # bergson's targets are labels[:, 1:]; the first entry is never one
        columns["labels"] = torch.cat([factor_rows[:, :1], labels.view(len(factor_rows), -1)], 1).tolist()
    hessian = HessianConfig(method="kfac", ev_correction=True, hessian_dtype="fp64",
                            use_dataset_labels=labels is not None)
    torch.manual_seed(seed)  # bergson's multinomial label draws (native)
    fit_factored_hessians(split, Dataset.from_dict(columns), cfg, hessian, target_modules=set(names.values()),
                          attention_cfgs={}, batches=batched(len(factor_rows), batch_size),
                          path=str(cfg.partial_run_path), do_eigendecomposition=True)
    precond = FactoredPreconditioner.from_path(
        cfg.partial_run_path, ev_correction=True,
        inversion_cfg=InversionConfig(inversion="damped_inverse", damping_factor=alpha))
    weights = [split.base_model.get_submodule(names[b]).weight for b in blocks]
    grads = torch.autograd.grad(PROBES[probe](split, probe_tokens, head), weights, allow_unused=True)
    query = {names[b]: (torch.zeros_like(w) if g is None else g).reshape(1, -1)
             for b, w, g in zip(blocks, weights, grads)}
    pre = precond.apply(query)
    train = Dataset.from_dict({"input_ids": train_rows.tolist()})
    collector = InMemoryCollector(model=split.base_model, data=train, cfg=cfg, target_modules=set(names.values()),
                                  processor=GradientProcessor(include_bias=False), preprocess_cfg=PreprocessConfig())
    CollectorComputer(split, train, collector=collector, batches=batched(len(train_rows), batch_size),
                      cfg=cfg).run_with_collector_hooks(desc="bergson training gradients")
    train_grads = {b: collector.gradients[names[b]].double().numpy() for b in blocks}
    scores = -sum(train_grads[b] @ pre[names[b]][0].double().numpy() for b in blocks)
    return {"scores": scores, "query": {b: query[names[b]][0] for b in blocks},
            "preconditioned": {b: pre[names[b]][0].double() for b in blocks}, "grads": train_grads,
            "seconds": time.perf_counter() - began}


# ----------------------------------------------------------------------------- comparison
def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-300))


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    rank = lambda x: np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)
    k = max(1, round(0.1 * len(a)))
    top = lambda x: set(np.argsort(-x, kind="stable")[:k].tolist())
    return {"spearman": round(float(np.corrcoef(rank(a), rank(b))[0, 1]), 6),
            "pearson": round(float(np.corrcoef(a, b)[0, 1]), 6),
            "top10pct_overlap": round(len(top(a) & top(b)) / k, 4), "top_k": k}


def compare(inf, s, factor_source, factor_rows, train_rows, modes: list[str], workdir: Path) -> dict:
    from mda.attribute.probe_gradient import probe_gradient
    from mda.units.probes import influence_probe

    head, blocks = s.heads[0], [b.name.split("/")[1] for b in s.all_blocks]
    tokens = influence_probe(inf, s.model.config).to(s.rt.device)
    split, _ = split_model(s.model, head, blocks)
    with torch.no_grad():
        logit_diff = (split(input_ids=train_rows[:8].to(s.rt.device)).logits
                      - s.model(input_ids=train_rows[:8].to(s.rt.device)).logits).abs().max().item()
    if not logit_diff <= 1e-5:
        fail(f"the rewritten layer changes the logits by {logit_diff:.2e} (> 1e-5)")
    mine = mda_side(inf, s, factor_source, train_rows)
    mda_query = probe_gradient(s.model, s.probe, tokens, head, s.all_blocks)
    out = {"logits_max_abs_diff": logit_diff, "seconds": {"mda": round(mine["seconds"], 2)}, "agreement": {},
           "diagnostics": {}}
    for mode in modes:
        labels = None if inf.fisher == "true" and mode == "native" else mine["labels"]
        if inf.fisher == "empirical":  # dataset labels on both sides: the two modes are the same
            labels = factor_rows[:, 1:]
        theirs = bergson_side(s.model, head, blocks, s.probe, tokens, factor_rows, train_rows, alpha=inf.damping,
                              batch_size=inf.batch_size, labels=labels, seed=inf.label_seed, workdir=workdir / mode)
        out["seconds"][f"bergson_{mode}"] = round(theirs["seconds"], 2)
        out["agreement"][mode] = agreement(mine["scores"], theirs["scores"])
        out["diagnostics"][mode] = {
            f"{b}_rel_diff": {"probe_gradient": rel(mda_query[n].cpu(), theirs["query"][b].cpu()),
                              "training_gradients": rel(mine["grads"][n], theirs["grads"][b]),
                              "preconditioned_probe": rel(mine["vectors"][n], theirs["preconditioned"][b].cpu())}
            for b, n in zip(blocks, (x.name for x in s.all_blocks))}
    if "native" in modes and inf.fisher == "true":  # the label-sampling noise floor: mda against itself
        other = mda_side(inf.model_copy(update={"label_seed": inf.label_seed + 1}), s, factor_source, train_rows)
        out["agreement"]["mda_vs_mda_other_label_seed"] = agreement(mine["scores"], other["scores"])
    out["mda_scores"] = mine["scores"]
    return out


MATCHED = ["head blocks qk (q,k rows, one joint block), v (v rows), o (d_head columns of dense), biases excluded",
           "factor rows (mda's factor_subset, in order) and training rows", "true Fisher, sampled labels",
           "damping alpha * mean(corrected eigenvalues) per block", "summed next-token CE (loss_reduction=sum)",
           "covariances averaged over tokens, eigenvalue correction over sequences", "probe f and its tokens",
           "float32 model, float64 factor accumulation"]
NOT_MATCHED = ["label draws in `native` (bergson: torch.multinomial, new draws per pass; mda: inverse CDF, "
               "seeded, same draws in both passes): sampling noise, compare `native` with "
               "`mda_vs_mda_other_label_seed`; removed in `shared_labels`",
               "bergson applies the preconditioner in float32, mda in float64"]


def report(res: dict, extra: dict, path: str | None) -> dict:
    out = {"check": "mda head-restricted EK-FAC scores vs bergson EK-FAC on the rewritten layer",
           **extra, "bergson_version": bergson_version(), "torch": torch.__version__,
           **{k: v for k, v in res.items() if k != "mda_scores"}, "matched": MATCHED, "not_matched": NOT_MATCHED}
    text = json.dumps(out, indent=1)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)
    return out


# ----------------------------------------------------------------------------- entry points
def selftest(args) -> dict:
    """Both sides on a tiny random GPT-NeoX (no run directory)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from mda.core.compute import Runtime
    from mda.core.config import Influence
    from mda.model.heads import Head, head_blocks
    from mda.attribute.ekfac import TensorBatches
    from mda.attribute.window import Setup

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False)
    config._attn_implementation = "eager"  # as mda.model.neox.load_model
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # peaked attention rather than near-uniform init
        for layer in model.gpt_neox.layers:
            layer.attention.query_key_value.weight.add_(0.3 * torch.randn_like(layer.attention.query_key_value.weight))
    head = Head(1, 0)
    inf = Influence(probe_sequences=8, probe_half_len=8, batch_size=16, factor_samples=32)
    rt = Runtime(device=torch.device("cpu"), dtype=torch.float32, micro_batch=None, threads=args.threads)
    s = Setup(model, 0, [head], {head.name: head_blocks(config, head, inf.blocks)}, (0, 0), None, "induction",
              "selftest", rt)
    gen = torch.Generator().manual_seed(1)
    factor_rows = torch.randint(0, 64, (32, 17), generator=gen)
    train_rows = torch.randint(0, 64, (args.samples or 64, 17), generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        res = compare(inf, s, TensorBatches(factor_rows.split(inf.batch_size)), factor_rows, train_rows,
                      args.labels, Path(tmp))
    return report(res, {"mode": "selftest (tiny random GPT-NeoX: vocab 64, hidden 32, 2 layers x 2 heads)",
                        "head": head.name, "samples": len(train_rows), "factor_samples": len(factor_rows),
                        "mda_side": "in-process (fit_ekfac, preconditioned_probe, stored_gradients)"}, args.json)


def window_rows(stream, first: int, last: int, n: int) -> tuple[np.ndarray, torch.Tensor]:
    """N window samples evenly spread over the window: (sample ids, input_ids)."""
    ids = stream.read(first, last, columns=["sample_id"]).column("sample_id").to_numpy()
    chosen = set(ids[np.unique(np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(int))].tolist())
    sample_ids, rows = [], []
    for _, step_ids, table in stream.batches(first, last):
        keep = np.flatnonzero(np.isin(table.column("sample_id").to_numpy(), list(chosen)))
        sample_ids.extend(table.column("sample_id").to_numpy()[keep].tolist())
        rows.extend(step_ids[keep])
    return np.array(sample_ids), torch.from_numpy(np.stack(rows))


def run_check(args) -> dict:
    from mda.core.compute import Runtime
    from mda.core.config import load_params
    from mda.data.stream import Stream
    from mda.core.errors import MdaError
    from mda.attribute.factors import WindowSource, factor_subset
    from mda.attribute.window import setup
    from mda.core.io import read_targets

    run = Path(args.run)
    for rel_path in ("params.yaml", "data/checkpoints", "data/corpus/stream", "data/locate/targets.json"):
        if not (run / rel_path).exists():
            fail(f"{run / rel_path}: missing (not a finished mda run?)")
    try:
        params = load_params(run / "params.yaml")
        inf = params.influence
        if args.factor_samples is not None:
            inf = inf.model_copy(update={"factor_samples": args.factor_samples})
        if inf.projection:
            fail("influence.projection is set; bergson's EK-FAC (ev_correction) has no projection, set it to 0")
        targets = read_targets(run / "data/locate/targets.json")
        targets = {**targets, "heads": targets["heads"][:1]}
        torch.set_num_threads(args.threads or params.compute.threads)
        rt = Runtime(device=torch.device(args.device), dtype=torch.float32, micro_batch=None, threads=0)
        s = setup(inf, run / "data/checkpoints", targets, rt)
        stream = Stream(run / "data/corpus/stream")
        source = WindowSource(factor_subset(inf, s, stream), stream)
        factor_rows = torch.cat([ids for _, ids in source.read(range(len(source)))])
        sample_ids, train_rows = window_rows(stream, *s.window, args.samples)
        with tempfile.TemporaryDirectory() as tmp:
            res = compare(inf, s, source, factor_rows, train_rows, args.labels, Path(tmp))
    except MdaError as err:
        fail(str(err))
    extra = {"run": run.resolve().name, "head": s.heads[0].name, "checkpoint_step": s.step,
             "window": list(s.window), "samples": len(sample_ids), "factor_samples": len(factor_rows),
             "mda_side": "in-process (fit_ekfac on factor_subset, preconditioned_probe, stored_gradients)"}
    scores_path = run / "data/scores/scores.parquet"
    if scores_path.is_file() and inf.estimator == "ekfac":  # does the in-process recompute match the stage?
        import pandas as pd
        stage = pd.read_parquet(scores_path, columns=["sample_id", "head", "score"])
        stage = stage[stage["head"] == s.heads[0].name].set_index("sample_id").score.reindex(sample_ids)
        if stage.notna().all():
            extra["mda_in_process_vs_scores_parquet"] = agreement(res["mda_scores"], stage.to_numpy())
    return report(res, extra, args.json)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a finished mda run (clone with params.yaml and data/)")
    ap.add_argument("--samples", type=int, default=None, help="window samples to score (run: 256, selftest: 64)")
    ap.add_argument("--factor-samples", type=int, default=None, help="override influence.factor_samples (both sides)")
    ap.add_argument("--labels", nargs="+", choices=["native", "shared_labels"], default=["native", "shared_labels"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--selftest", action="store_true", help="tiny random model, no run directory")
    args = ap.parse_args(argv)
    bergson_version()
    if args.selftest:
        args.threads = args.threads or 1
        torch.set_num_threads(args.threads)
        selftest(args)
    elif args.run:
        args.samples = args.samples or 256
        run_check(args)
    else:
        ap.error("give --run DIR (or --selftest)")


if __name__ == "__main__":
    main()
