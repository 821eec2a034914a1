"""Our head-detection metrics agree with TransformerLens's `detect_head`.

`mda.units.metrics.detection_score(..., target_rows_only=False)` with `previous_token_detection`,
`duplicate_token_detection` and `induction_detection` is meant to be exactly TransformerLens's
`transformer_lens.head_detector.detect_head(model, seqs, name, error_measure="mul")`. This
test checks that, within 5e-7 (the README's claim; largest difference measured: 2.5e-7, float32
rounding of two forwards done in different orders), on a small seeded GPT-NeoX model (the project's own
`neox_config` / `new_model`, query/key/value weights perturbed so the attention is far from
uniform), for all three head types, `exclude_bos` and `exclude_current_token` on and off,
and two batches: repeated random tokens and random tokens from a small alphabet (many
natural duplicates, including adjacent repeats).

How the TransformerLens side is built (fully offline; the fixture sets HF_HUB_OFFLINE and
refuses every socket connection):
- TransformerLens 3.9.0, the last release with `HookedTransformer` (4.x removed it in favour
  of `TransformerBridge`, which runs the HF modules themselves and so would not be an
  independent forward). Its `head_detector.py` is the same as 4.3.0's apart from the model's
  type annotation. CI installs it with `--no-deps` (requirements-test-nodeps.txt) so it cannot pull a torch.
- A `HookedTransformerConfig` written by hand from the HF config, as TransformerLens's own
  loader derives it for `GPTNeoXForCausalLM`: LayerNorm, gelu, rotary with
  rotary_dim = partial_rotary_factor · d_head in NeoX's half-split layout
  (`rotary_adjacent_pairs=False`), parallel attention + MLP, untied unembedding.
- Weights converted by TransformerLens's own `convert_neox_weights` and loaded with every
  processing step off (no LayerNorm folding, no centring, no value-bias folding), so logits
  and attention patterns are the HF model's. That is asserted first, to 5e-5 (measured:
  about 1e-5, float32 rounding of LayerNorm/attention done in another order; a wrong rotary
  layout or width, or a sequential residual, is off by ~1).
- `detect_head` takes strings, not token ids, so the model gets a word-level tokenizer
  whose word "t<i>" is token i (and "<|endoftext|>" token 0), without a BOS prepended:
  TransformerLens tokenizes each string back to exactly our ids (asserted).

TransformerLens semantics this pins down (and `detection_score` reproduces):
- A list of strings is scored one sequence at a time (a separate forward each) and the
  per-sequence scores are averaged with equal weight: `stack(scores).mean(0)`.
- `mul`: score = Σ(A·D) / ΣA summed over *every* query row of the (q, k) pattern A,
  including rows where the detection pattern D has no target (which only dilute it).
- `exclude_bos` zeroes attention to key position 0 — whatever token is there; nothing checks
  that it is a BOS — in numerator *and* denominator (so query 0 drops out entirely);
  `exclude_current_token` zeroes the diagonal likewise.
- Detection patterns: previous-token is the sub-diagonal; duplicate-token is "same token at
  an earlier position" (diagonal excluded); induction is duplicate shifted one key to the
  right, then `tril` — so after an adjacent repeat (x, x) the induction target of the second
  x includes its own position.
"""

from __future__ import annotations

import socket

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import head_detector
from transformer_lens.head_detector import detect_head
from transformer_lens.pretrained.weight_conversions.neox import convert_neox_weights

from mda.core.config import Model
from mda.model.neox import neox_config, new_model
from mda.units.metrics import (
    attention_patterns,
    detection_score,
    duplicate_token_detection,
    induction_detection,
    previous_token_detection,
)
from mda.units.probes import repeated_random_tokens

VOCAB = 60
HEADS = 4
ATOL_FORWARD = 5e-5  # logits are O(2); float32; measured ≈1e-5
ATOL_SCORE = 5e-7  # scores are O(0.1–1); measured ≤ 2.5e-7 over every case below; README says < 5e-7

DETECTIONS = {
    "previous_token_head": previous_token_detection,
    "duplicate_token_head": duplicate_token_detection,
    "induction_head": induction_detection,
}


def _refuse_connection(*args, **kwargs):
    raise OSError("network access attempted in an offline test")


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub, no network: HF offline mode on, and any socket connection raises.
    Also one torch thread: these tensors are tiny, and thread start-up would dominate."""
    import huggingface_hub.constants

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(socket.socket, "connect", _refuse_connection)
        mp.setattr(socket.socket, "connect_ex", _refuse_connection)
        mp.setattr(socket, "create_connection", _refuse_connection)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: "<|endoftext|>" is id 0, "t<i>" is id i; no BOS added."""
    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def _text(row: torch.Tensor) -> str:
    return " ".join(f"t{i}" for i in row.tolist())


def _hooked_from_neox(hf, tokenizer) -> HookedTransformer:
    """A HookedTransformer computing the same function as `hf`, built without the hub."""
    c = hf.config
    d_head = c.hidden_size // c.num_attention_heads
    rope = c.rope_parameters
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings,
        d_vocab=c.vocab_size, act_fn=c.hidden_act, eps=c.layer_norm_eps,
        normalization_type="LN", attn_only=False, use_attn_scale=True,
        positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=round(rope["partial_rotary_factor"] * d_head), rotary_base=rope["rope_theta"],
        parallel_attn_mlp=c.use_parallel_residual,
        original_architecture="GPTNeoXForCausalLM", default_prepend_bos=False,
        device="cpu", dtype=torch.float32, seed=0,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(
        convert_neox_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False)
    return model.eval()


@pytest.fixture(scope="module")
def models_(offline):
    config = neox_config(Model(layers=2, hidden_size=64, heads=HEADS, intermediate_size=128,
                               rotary_pct=0.25, max_position_embeddings=64), VOCAB)
    assert not config.tie_word_embeddings and config.use_parallel_residual
    hf = new_model(config, seed=0).eval()
    assert hf.config._attn_implementation == "eager"
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # sharper, head-specific attention than the init gives
        for layer in hf.gpt_neox.layers:
            w = layer.attention.query_key_value.weight
            w.add_(0.5 * torch.randn(w.shape, generator=gen))
    tl = _hooked_from_neox(hf, _tokenizer())
    assert tl.cfg.rotary_dim == 4  # of d_head 16: half-split vs adjacent pairs matters
    return hf, tl


def _repeated() -> torch.Tensor:
    return repeated_random_tokens(VOCAB, sequences=4, half_len=12, seed=3, exclude=(0,))


def _natural() -> torch.Tensor:
    """Random tokens from an 11-token alphabet: plenty of duplicates and adjacent repeats."""
    tokens = torch.randint(1, 12, (4, 30), generator=torch.Generator().manual_seed(4))
    assert (tokens[:, 1:] == tokens[:, :-1]).any(), "want an adjacent repeat (induction diagonal)"
    return tokens


TOKENS = {"repeated": _repeated, "natural": _natural}


@pytest.mark.parametrize("kind", TOKENS)
def test_hooked_transformer_matches_hf(models_, kind):
    hf, tl = models_
    tokens = TOKENS[kind]()
    for row in tokens:  # what detect_head will see from the strings is exactly our ids
        assert torch.equal(tl.to_tokens(_text(row)).squeeze(0), row)
    with torch.no_grad():
        tl_logits, cache = tl.run_with_cache(tokens)
        hf_logits = hf(input_ids=tokens).logits
    ours = attention_patterns(hf, tokens)
    tl_patterns = torch.stack([cache["pattern", layer, "attn"] for layer in range(tl.cfg.n_layers)])
    assert tl_patterns.shape == ours.shape == (2, len(tokens), HEADS, tokens.shape[1], tokens.shape[1])
    assert (tl_logits - hf_logits).abs().max() < ATOL_FORWARD
    assert (tl_patterns - ours).abs().max() < ATOL_FORWARD
    # Not near-uniform, so the scores below discriminate between heads.
    assert ours.amax(dim=-1)[..., 1:].mean() > 0.5


@pytest.mark.parametrize("kind", TOKENS)
def test_detection_patterns_match_tl(kind):
    tokens = TOKENS[kind]()
    for name, ours in DETECTIONS.items():
        tl_fn = getattr(head_detector, f"get_{name}_detection_pattern")
        expected = torch.stack([tl_fn(row[None]) for row in tokens]).float()
        assert torch.equal(ours(tokens).float(), expected), name


@pytest.mark.parametrize("exclude_current_token", [False, True])
@pytest.mark.parametrize("exclude_bos", [False, True])
@pytest.mark.parametrize("kind", TOKENS)
@pytest.mark.parametrize("name", DETECTIONS)
def test_detection_score_matches_detect_head(models_, name, kind, exclude_bos,
                                             exclude_current_token):
    hf, tl = models_
    tokens = TOKENS[kind]()
    expected = detect_head(tl, [_text(row) for row in tokens], name, exclude_bos=exclude_bos,
                           exclude_current_token=exclude_current_token, error_measure="mul")
    ours = detection_score(attention_patterns(hf, tokens), DETECTIONS[name](tokens),
                           exclude_bos=exclude_bos, exclude_current_token=exclude_current_token)
    assert ours.shape == expected.shape == (2, HEADS)
    assert (expected >= 0).all()  # -1 would mean a head TransformerLens skipped
    assert (ours - expected).abs().max() < ATOL_SCORE
