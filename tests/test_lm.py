"""Chunked-vocabulary losses (`mda.model.losses`) against the full-logits computation: the same per-token
losses and the same gradients of every parameter, for true and sampled labels; and the
sampler draws the labels a single draw over the batch would."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mda.model.losses import sampled_sequence_losses, token_losses

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def model_on(device, dtype=torch.float64, vocab=97):
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return GPTNeoXForCausalLM(config).to(device=device, dtype=dtype)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_token_losses_and_gradients_equal_the_full_logits(device):
    model = model_on(device)
    ids = torch.randint(0, 97, (3, 21), generator=torch.Generator().manual_seed(1)).to(device)
    weights = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64, device=device)
    results = []
    for budget in (10 ** 9, 97 * 7):  # everything at once; 7 positions per chunk
        model.zero_grad()
        losses = token_losses(model, ids, budget=budget)
        (losses * weights[:, None]).sum().backward()
        results.append((losses.detach(), grads(model)))
    (full, g_full), (chunked, g_chunked) = results
    reference = F.cross_entropy(model(input_ids=ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten(),
                                reduction="none").view(3, -1)
    torch.testing.assert_close(full, reference.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-10)
    head = next(n for n, p in model.named_parameters() if p is model.get_output_embeddings().weight)
    assert g_full.keys() == g_chunked.keys() and head in g_chunked
    for name in g_full:
        torch.testing.assert_close(g_chunked[name], g_full[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_sampling_draws_the_same_labels(device):
    """The true-Fisher labels come from one uniform per position in order, chunked or not."""
    model = model_on(device)
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(2)).to(device)
    out = []
    for budget in (10 ** 9, 97 * 5):
        model.zero_grad()
        losses = sampled_sequence_losses(model, ids, torch.Generator().manual_seed(3), budget=budget)
        losses.sum().backward()
        out.append((losses.detach(), grads(model)))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-10, atol=1e-10)
    for name in out[0][1]:
        torch.testing.assert_close(out[1][1][name], out[0][1][name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_chunked_losses_track_float32(device):
    """Under bf16 autocast the chunked path computes in bf16 like the full one: losses agree to
    bf16 precision and both are close to float32."""
    model = model_on(device, torch.float32)
    ids = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(4)).to(device)
    with torch.no_grad():
        exact = token_losses(model, ids)
        with torch.autocast(device, dtype=torch.bfloat16):
            full = token_losses(model, ids)
            chunked = token_losses(model, ids, budget=97 * 9)
    torch.testing.assert_close(chunked, full, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(full, exact, rtol=3e-2, atol=3e-2)
