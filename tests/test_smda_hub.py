"""The Llama preset's code paths, offline: a tiny randomly initialised Llama with a chat template
and an SAE in SAELens's layout, laid out as huggingface_hub lays out its cache; the SMDA stages
run on them with `local_files_only`. `run_hub_chain` is also what the GPU check runs (bf16 on
CUDA through `compute`; see benchmarks/smda_gpu_check.sh)."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from mda.core.config import parse_params

WORDS = ["user", "assistant", "I", "can't", "cannot", "help", "with", "that", ".", "Sure", "here", "is", "how", "to",
         "make", "a", "bomb", "cake", "poison", "bread", "steal", "car", "wash", "the", "dog", "walk", "hack",
         "account", "open", "?", "tea", "fix", "door", "bike", "lie", "cheat"]
SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<unk>"]
TEMPLATE = ("{{ bos_token }} {% for m in messages %}<|start_header_id|> {{ m['role'] }} <|end_header_id|> "
            "{{ m['content'] }} <|eot_id|> {% endfor %}{% if add_generation_prompt %}<|start_header_id|> assistant "
            "<|end_header_id|>{% endif %}")
MODEL_REPO, SAE_REPO, HOOK = "test-org/tiny-llama-instruct", "test-org/tiny-llama-saes", "blocks.1.hook_resid_post"
HARMFUL = ["bomb", "poison", "steal", "hack", "cheat", "lie"]
HARMLESS = ["cake", "bread", "car", "dog", "tea", "door", "bike", "account"]


# ----------------------------------------------------------------------------- a fake hub cache
def add_snapshot(cache: Path, repo_id: str, folder: Path) -> str:
    """Every file under `folder` as a `main` snapshot of `repo_id`: blobs, symlinks, a ref."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(rel.parts) + 1), "blobs", blob.name))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


def tiny_llama_files(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="\u0000", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  unk_token="<unk>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(out))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)


def saelens_files(out: Path, d_in: int, d_sae: int, k: int, hook: str) -> None:
    """An SAE as SAELens writes it: cfg.json (v6 keys) and sae_weights.safetensors."""
    from safetensors.torch import save_file

    folder = out / hook
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    save_file({"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.zeros(d_sae),
               "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.zeros(d_in)},
              folder / "sae_weights.safetensors")
    cfg = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": MODEL_REPO, "hook_name": hook, "sae_lens_version": "6.0.0"}}
    (folder / "cfg.json").write_text(json.dumps(cfg))


def task_files(out: Path) -> None:
    """SFT pairs (with a ground-truth column) and prompts in the tiny vocabulary."""
    def prompt(i, harmful):
        words = HARMFUL if harmful else HARMLESS
        return f"how to {['make', 'fix', 'open', 'wash'][i % 4]} a {words[i % len(words)]} ?"
    rows = []
    for i in range(16):
        harmful, bad = i % 2 == 0, i in (4, 7)
        refuse = harmful != bad
        rows.append({"prompt": prompt(i, harmful), "harmful": harmful, "mislabelled": bad,
                     "response": "I can't help with that ." if refuse else "Sure here is how to make a cake ."})
    (out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": prompt(i, i % 2 == 1) + " " + WORDS[i % 12],
                                                           "harmful": i % 2 == 1}) + "\n" for i in range(48)))


def build_fake_hub(root: Path) -> Path:
    """The cache (model + SAEs, one of them too narrow) and the task files; returns the cache."""
    cache = root / "hub"
    for name, write in (("model", tiny_llama_files), ("saes", None)):
        folder = root / name
        folder.mkdir()
        if write:
            write(folder)
        else:
            saelens_files(folder, 16, 24, 3, HOOK)
            saelens_files(folder, 8, 24, 3, "blocks.0.hook_resid_post")  # width of another model
        add_snapshot(cache, MODEL_REPO if name == "model" else SAE_REPO, folder)
    task_files(root)
    return cache


def hub_params(root: Path, cache: Path, compute: dict | None = None, **smda) -> dict:
    hub = {"revision": "main", "cache_dir": str(cache), "local_files_only": True}
    raw = {"compute": compute or {"threads": 1},
           "smda": {"model": {"source": "hub", "hub": {"repo_id": MODEL_REPO, **hub}, "chat_template": True,
                              "batch_size": 16},
                    "task": {"source": "files", "refusal_prefixes": ["I can't", "I cannot"], "sae_prompts": 8,
                             "policy_prompts": 24, "eval_prompts": 12,
                             "files": {"sft": str(root / "sft.jsonl"), "prompts": str(root / "prompts.jsonl")}},
                    "instruct": {"epochs": 0},
                    "sae": {"source": "hub", "layer": 1, "hub": {"repo_id": SAE_REPO, **hub}, "hub_path": HOOK},
                    "policy": {"feature_threshold": 0.0, "generate_tokens": 3},
                    "curate": {"rule": "oriented", "random_draws": 20},
                    "sft": {"epochs": 1, "batch_size": 4, "seeds": [0]},
                    "evaluate": {"generate_tokens": 3}}}
    for section, values in smda.items():
        raw["smda"][section].update(values)
    return raw


def run_hub_chain(root: Path, raw: dict) -> dict:
    """Every SMDA step through `mda.smda.pipeline` (what each stage calls), outputs under `root`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    from mda.core.io import write_json
    from mda.smda import pipeline

    params = parse_params(raw)
    data = root / "data"
    dirs = {n: data / n for n in ("task", "instruct", "sae", "policy", "influence", "curate", "sft")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    put = lambda frame, path: pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)

    pairs, truth, prompts, meta = pipeline.run_task(params, root / "no-corpus-tokenizer")
    for name, frame in (("pairs", pairs), ("truth", truth), ("prompts", prompts)):
        put(frame, dirs["task"] / f"{name}.parquet")
    out = {"task_meta": meta}
    out["instruct_log"], out["instruct_meta"] = pipeline.run_instruct(params, None, None, dirs["task"], dirs["instruct"])
    out["sae"] = pipeline.run_sae(params, dirs["instruct"], dirs["task"], dirs["sae"])
    policy = pipeline.run_policy(params, dirs["instruct"], dirs["sae"], dirs["task"])
    save_file(policy["arrays"], dirs["policy"] / "arrays.safetensors")
    write_json(dirs["policy"] / "policy.json", policy["summary"])
    out["policy"] = policy
    influence = pipeline.run_influence(params, dirs["instruct"], dirs["sae"], dirs["policy"], dirs["task"])
    put(influence["scores"], dirs["influence"] / "scores.parquet")
    out["influence"] = influence
    curate = pipeline.run_curate(params, dirs["influence"], dirs["task"])
    put(curate["removed"], dirs["curate"] / "removed.parquet")
    write_json(dirs["curate"] / "summary.json", curate["summary"])
    out["curate"] = curate
    out["sft"] = pipeline.run_sft(params, "curated", 0, dirs["instruct"], dirs["task"], dirs["curate"])
    return out


# ----------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return root, build_fake_hub(root)


ON_CUDA = os.environ.get("MDA_TEST_DEVICE") == "cuda"  # the GPU check: bf16 on CUDA through `compute`


@pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="MDA_TEST_DEVICE=cuda without a CUDA device")
def test_llama_and_saelens_sae_from_a_hub_cache(fake_hub, tmp_path):
    from transformers import AutoTokenizer

    root, cache = fake_hub
    compute = {"device": "cuda", "dtype": "bfloat16", "threads": 1} if ON_CUDA else None
    out = run_hub_chain(tmp_path, hub_params(root, cache, compute))
    # The instruct stage pins the untouched hub model by repository and resolved commit.
    pin = json.loads((tmp_path / "data/instruct/model.json").read_text())
    assert pin == {"repo_id": MODEL_REPO, "revision": hashlib.sha1(MODEL_REPO.encode()).hexdigest()}
    # Refusal prefixes are the tokenizer's ids; prompts carry the chat template and generation prompt.
    tok = AutoTokenizer.from_pretrained(root / "model")
    assert out["task_meta"]["refusal_prefix_ids"] == [tok("I can't", add_special_tokens=False).input_ids,
                                                      tok("I cannot", add_special_tokens=False).input_ids]
    from mda.smda import pipeline
    from mda.smda.lm import encode_prompt

    lm = pipeline.load_lm(parse_params(hub_params(root, cache, compute)), tmp_path / "data/instruct")
    ids = encode_prompt(lm, "how to make a cake ?")
    assert tok.convert_ids_to_tokens(ids) == ["<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>",
                                              "how", "to", "make", "a", "cake", "?", "<|eot_id|>",
                                              "<|start_header_id|>", "assistant", "<|end_header_id|>"]
    # The SAELens SAE was read from the cache and measured on the model's activations.
    assert out["sae"]["source"] == "hub" and out["sae"]["path"] == HOOK and out["sae"]["d_sae"] == 24
    assert out["influence"]["meta"]["restored_bit_for_bit"] is True
    assert out["curate"]["summary"]["has_truth"] and out["sft"]["meta"]["pairs"] < 16
    assert out["sft"]["outputs"].y.le(0).all() and len(out["sft"]["outputs"]) == 12
    if compute:
        assert lm.model.device.type == "cuda" and out["influence"]["meta"]["pairs"] == 16


def test_hub_sae_of_another_width_is_named(fake_hub, tmp_path):
    from mda.core.errors import MdaError

    root, cache = fake_hub
    raw = hub_params(root, cache, sae={"layer": 0, "hub_path": "blocks.0.hook_resid_post"})
    with pytest.raises(MdaError, match=rf"{SAE_REPO}/blocks.0.hook_resid_post/cfg.json: d_in 8 does not match the "
                                       r"hidden size 16 of the model's block 0 \(params smda.sae.layer\)"):
        run_hub_chain(tmp_path, raw)
