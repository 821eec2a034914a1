"""Head metrics against hand-built attention patterns and independent references."""

import copy

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mda.model.heads import Head, block_rows, block_weight, qkv_rows
from mda.units.metrics import (attention_patterns, copying_score, detection_score, duplicate_token_detection,
                       duplicate_token_score, head_ablation_logprobs, icl_positions, icl_score,
                       induction_detection, induction_target_logprob, induction_targets,
                       prefix_matching_score, previous_token_score, uniform_baseline)
from mda.units.probes import repeated_random_tokens


def patterns_from(rows):
    """(1 layer, batch, 1 head, n, n) attention from a (batch, n, n) or (n, n) tensor."""
    rows = torch.as_tensor(rows, dtype=torch.float32)
    if rows.dim() == 2:
        rows = rows[None]
    return rows[None, :, None]


def one_hot_attention(n, key_of):
    """Row t attends fully to key_of(t) (clamped into the causal prefix)."""
    a = torch.zeros(n, n)
    for t in range(n):
        a[t, min(max(key_of(t), 0), t)] = 1.0
    return a


def tiny_neox(vocab=40, layers=2, heads=4, hidden=32, seed=0):
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=2 * hidden, rotary_pct=0.25,
                           max_position_embeddings=64, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(config)
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # sharper, head-specific attention than at init
        for block in model.gpt_neox.layers:
            block.attention.query_key_value.weight.add_(0.5 * torch.randn_like(block.attention.query_key_value.weight))
    return model.eval()


# ----------------------------------------------------------------------------- attention scores
def test_previous_token_head_scores_one():
    tokens = torch.randint(0, 50, (2, 12))
    perfect = patterns_from(one_hot_attention(12, lambda t: t - 1).expand(2, 12, 12))
    assert previous_token_score(perfect, tokens).item() == pytest.approx(1.0)
    self_attention = patterns_from(torch.eye(12).expand(2, 12, 12))
    assert previous_token_score(self_attention, tokens).item() == 0.0


def test_uniform_attention_scores_the_documented_baseline():
    tokens = repeated_random_tokens(100, 3, 8, seed=0)
    n = 16
    uniform = patterns_from((torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]).expand(3, n, n))
    prev = sum(1 / (t + 1) for t in range(1, n)) / (n - 1)
    induction = sum(1 / (8 + i + 1) for i in range(8)) / 8
    assert previous_token_score(uniform, tokens).item() == pytest.approx(prev, abs=1e-6)
    assert uniform_baseline("previous_token", tokens) == pytest.approx(prev, abs=1e-6)
    assert prefix_matching_score(uniform, tokens).item() == pytest.approx(induction, abs=1e-6)
    assert uniform_baseline("prefix_matching", tokens) == pytest.approx(induction, abs=1e-6)


def test_induction_head_on_repeated_tokens():
    tokens = repeated_random_tokens(100, 2, 6, seed=1)
    # Second half: query 6+i attends to key i+1; first half: attend to self (no target there).
    perfect = one_hot_attention(12, lambda t: t - 6 + 1 if t >= 6 else t)
    assert prefix_matching_score(patterns_from(perfect.expand(2, 12, 12)), tokens).item() == pytest.approx(1.0)
    # Attending to the earlier copy itself is duplicate-token behaviour, not induction.
    duplicate = one_hot_attention(12, lambda t: t - 6 if t >= 6 else t)
    assert prefix_matching_score(patterns_from(duplicate.expand(2, 12, 12)), tokens).item() == 0.0
    assert duplicate_token_score(patterns_from(duplicate.expand(2, 12, 12)), tokens).item() == pytest.approx(1.0)


def test_detection_patterns_match_a_loop():
    tokens = torch.tensor([[3, 5, 3, 7, 5, 3]])
    n = tokens.shape[1]
    dup, ind = torch.zeros(n, n), torch.zeros(n, n)
    for q in range(n):
        for k in range(q):
            if tokens[0, q] == tokens[0, k]:
                dup[q, k] = 1
                if k + 1 <= q:
                    ind[q, k + 1] = 1
    assert torch.equal(duplicate_token_detection(tokens)[0], dup)
    assert torch.equal(induction_detection(tokens)[0], ind)
    mask, targets = induction_targets(tokens)
    assert mask[0].tolist() == [False, False, True, False, True, True]
    # Token 5 at position 4 followed by 3 at its earlier occurrence; token 3 at position 5
    # occurred at 0 and 2: the latest occurrence's successor (7) is the target.
    assert targets[0, 2].item() == 5 and targets[0, 4].item() == 3 and targets[0, 5].item() == 7


def test_target_rows_only_is_the_transformerlens_ratio_on_those_rows():
    torch.manual_seed(0)
    tokens = repeated_random_tokens(100, 3, 5, seed=2)
    logits = torch.randn(3, 2, 10, 10)
    attn = torch.softmax(logits.masked_fill(torch.triu(torch.ones(10, 10), 1).bool(), -1e9), -1)[None]
    det = induction_detection(tokens)
    by_hand = torch.stack([torch.stack([(attn[0, b, h, 5:] * det[b, 5:]).sum() / attn[0, b, h, 5:].sum()
                                        for h in range(2)]) for b in range(3)]).mean(0)
    assert torch.allclose(prefix_matching_score(attn, tokens)[0], by_hand)
    all_rows = torch.stack([torch.stack([(attn[0, b, h] * det[b]).sum() / attn[0, b, h].sum()
                                         for h in range(2)]) for b in range(3)]).mean(0)
    assert torch.allclose(detection_score(attn, det)[0], all_rows)


# ----------------------------------------------------------------------------- heads and weights
def test_head_rows_match_transformers_fused_reshape():
    model = tiny_neox()
    config = model.config
    attention = model.gpt_neox.layers[1].attention
    x = torch.randn(2, 5, config.hidden_size)
    hs = config.hidden_size // config.num_attention_heads
    # transformers' own split: view (…, heads, 3·hs), then chunk q, k, v.
    q, k, v = attention.query_key_value(x).view(2, 5, config.num_attention_heads, 3 * hs).chunk(3, dim=-1)
    for h in range(config.num_attention_heads):
        rows = qkv_rows(config, h)
        w, b = attention.query_key_value.weight, attention.query_key_value.bias
        for part, expected in zip("qkv", (q, k, v)):
            ours = x @ w[rows[part]].T + b[rows[part]]
            assert torch.allclose(ours, expected[:, :, h], atol=1e-6), (h, part)
        assert torch.equal(block_weight(model, Head(1, h), "qk"), w[torch.cat([rows["q"], rows["k"]])])
    # The head's columns of dense read exactly its slice of the merged attention output.
    z = torch.zeros(1, config.hidden_size)
    z[0, block_rows(config, 2, "o")] = torch.randn(hs)
    assert torch.allclose(attention.dense(z) - attention.dense.bias,
                          z[:, block_rows(config, 2, "o")] @ block_weight(model, Head(1, 2), "o").T, atol=1e-6)


def test_copying_score_against_the_full_vocabulary_circuit():
    model = tiny_neox(vocab=30, layers=1, heads=2, hidden=16, seed=3)
    inner = model.gpt_neox
    with torch.no_grad():
        inner.layers[0].input_layernorm.weight.uniform_(0.5, 1.5)
        inner.final_layer_norm.weight.uniform_(0.5, 1.5)
    scores = copying_score(model)
    embed = inner.embed_in.weight.double()
    unembed = model.get_output_embeddings().weight.double()
    for h in range(2):
        w_v = block_weight(model, Head(0, h), "v").double()
        w_o = block_weight(model, Head(0, h), "o").double()
        full = (unembed * inner.final_layer_norm.weight.double()) @ w_o @ w_v \
            @ (embed * inner.layers[0].input_layernorm.weight.double()).T  # (vocab, vocab)
        eig = np.linalg.eigvals(full.detach().numpy())
        assert scores[0, h].item() == pytest.approx(eig.sum().real / np.abs(eig).sum(), abs=1e-5)


def test_copying_score_signs_of_hand_built_circuits():
    model = tiny_neox(vocab=30, layers=1, heads=2, hidden=16, seed=4)
    inner, config = model.gpt_neox, model.config
    with torch.no_grad():
        model.get_output_embeddings().weight.copy_(inner.embed_in.weight)  # W_U = W_E
        qkv, dense = inner.layers[0].attention.query_key_value, inner.layers[0].attention.dense
        p = torch.randn(8, 16)
        qkv.weight[block_rows(config, 0, "v")] = p
        dense.weight[:, block_rows(config, 0, "o")] = p.T     # OV = pᵀp: positive semidefinite
        qkv.weight[block_rows(config, 1, "v")] = p
        dense.weight[:, block_rows(config, 1, "o")] = -p.T    # the negation: an anti-copying head
        inner.layers[0].input_layernorm.weight.fill_(1)
        inner.final_layer_norm.weight.fill_(1)
    scores = copying_score(model)
    assert scores[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert scores[0, 1].item() == pytest.approx(-1.0, abs=1e-5)


def test_head_ablation_in_one_forward_matches_zeroing_each_head():
    model = tiny_neox(seed=5)
    tokens = repeated_random_tokens(40, 3, 6, seed=0, exclude=(0,))
    clean, ablated = head_ablation_logprobs(model, tokens, max_sequences=7)  # forces chunking
    assert clean == pytest.approx(induction_target_logprob(model(input_ids=tokens).logits, tokens).mean().item(),
                                  abs=1e-6)
    hs = model.config.hidden_size // model.config.num_attention_heads
    for layer in range(2):
        for h in range(4):
            reference = copy.deepcopy(model)
            reference.gpt_neox.layers[layer].attention.dense.weight.data[:, h * hs:(h + 1) * hs] = 0
            expected = induction_target_logprob(reference(input_ids=tokens).logits, tokens).mean().item()
            assert ablated[layer, h].item() == pytest.approx(expected, abs=1e-5), (layer, h)


def eager_attention(model, tokens: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """(batch, q, k) attention of one head, recomputed from its weights: the layer's input (the
    residual stream HF reports), its LayerNorm, the head's q and k rows of the fused
    `query_key_value` (GPT-NeoX interleaves [q, k, v] per head), rotary on the first
    `rotary_pct` of each head's dimensions (NeoX's half-split layout), scaled dot product,
    causal softmax."""
    config, block = model.config, model.gpt_neox.layers[layer]
    hs = config.hidden_size // config.num_attention_heads
    rope = config.rope_parameters
    rotary = int(hs * rope["partial_rotary_factor"])
    with torch.no_grad():
        x = model(input_ids=tokens, output_hidden_states=True).hidden_states[layer]
        qkv = block.attention.query_key_value(block.input_layernorm(x))
        rows = qkv[..., head * 3 * hs:(head + 1) * 3 * hs]
        q, k = rows[..., :hs], rows[..., hs:2 * hs]
        n = tokens.shape[1]
        inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, rotary, 2).double() / rotary)
        angles = torch.arange(n).double()[:, None] * inv_freq[None]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

        def rotate(v):
            v = v.double()
            r, rest = v[..., :rotary], v[..., rotary:]
            half = torch.cat([-r[..., rotary // 2:], r[..., :rotary // 2]], -1)
            return torch.cat([r * cos + half * sin, rest], -1)

        scores = rotate(q) @ rotate(k).transpose(-1, -2) / hs ** 0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1).float()


def test_attention_patterns_are_one_forward_of_every_head():
    model = tiny_neox()
    tokens = torch.randint(1, 40, (3, 10), generator=torch.Generator().manual_seed(0))
    patterns = attention_patterns(model, tokens)
    assert patterns.shape == (2, 3, 4, 10, 10)
    reference = {(layer, head): eager_attention(model, tokens, layer, head) for layer in range(2) for head in range(4)}
    for (layer, head), expected in reference.items():
        torch.testing.assert_close(patterns[layer, :, head], expected, rtol=0, atol=1e-5, msg=f"L{layer}H{head}")
    # The heads differ from each other, so a swapped layer or head order could not pass.
    values = list(reference.values())
    assert min((a - b).abs().max() for i, a in enumerate(values) for b in values[i + 1:]) > 0.05


# ----------------------------------------------------------------------------- ICL
def test_icl_positions_scale_with_short_contexts():
    assert icl_positions(2048) == (500, 50)
    assert icl_positions(501) == (500, 50)
    assert icl_positions(64) == (63, 6)
    assert icl_positions(10) == (9, 1)
    assert icl_positions(2) == (1, 0)


def test_icl_score_is_late_minus_early_position_as_olsson_defines_it():
    """Olsson et al.: loss of the 500th token minus loss of the 50th — single positions, not a mean
    over the first 50 tokens (a hand-built loss table where the two differ)."""
    losses = torch.arange(64, dtype=torch.float32).expand(4, 64)
    assert icl_score(losses) == pytest.approx(63 - 6)
    long = torch.zeros(2, 600)
    long[:, 500] = -1.0
    long[:, :50] = 5.0   # a mean over the first 50 tokens would give −6
    long[:, 50] = 2.0
    assert icl_score(long) == pytest.approx(-3.0)
