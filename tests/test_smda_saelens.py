"""Our SAELens-format loader (`mda.smda.sae.load_sae`) against SAELens itself.

Each case builds a random SAE with SAELens's own class (sae-lens 6.54.12, installed with
`--no-deps`: requirements-test-nodeps.txt), saves it as SAELens does, loads the folder with our
loader and compares encode and decode with SAELens's on the same inputs:
- `topk` with and without `rescale_acts_by_decoder_norm` (`TopKSAE.save_model`), and a TopK
  training checkpoint (`TopKTrainingSAE.save_model`, rescaled by default);
- `batchtopk` training checkpoints with and without rescaling (`BatchTopKTrainingSAE.save_model`:
  architecture `batchtopk`, a scalar `topk_threshold`). SAELens has no inference class for
  `batchtopk`: its inference SAE is the JumpReLU SAE it writes with `save_inference_model`
  (threshold = topk_threshold, decoder norms folded), and that is the reference;
- `jumprelu` and `standard` (`save_model`).
Decoder rows get norms from 0.3 to 3 so that rescaling changes which latents are active (checked:
a loader that ignored the setting would pick other latents).

Tolerance: SAELens computes in float32, we in float64 from the same float32 weights, so the
difference is SAELens's float32 rounding: a 16-term dot product plus a bias (times a decoder norm),
values up to about 25 here, where float32's spacing is 1.9e-6. rtol = atol = 1e-5 bounds a few
roundings of the largest term (largest difference measured: 3.6e-6, on a value of about 24). The
active sets must be identical.
"""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import (SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, JumpReLUSAE, JumpReLUSAEConfig,
                      StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig)

from mda.core.errors import MdaError
from mda.smda.sae import load_sae

D_IN, D_SAE, K = 16, 48, 5
CASES = [("topk", False), ("topk", True), ("topk-training", True), ("batchtopk", False), ("batchtopk", True),
         ("jumprelu", False), ("standard", False)]


def inputs(seed=3) -> torch.Tensor:
    return torch.randn(64, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def build(kind: str, rescale: bool):
    """A SAELens SAE of `kind` with random weights (float32, CPU)."""
    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale))
    elif kind == "topk-training":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale))
    elif kind == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=float(K),
                                                              rescale_acts_by_decoder_norm=rescale))
    elif kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    g = torch.Generator().manual_seed(len(kind) + 10 * rescale)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / D_IN ** 0.5)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.3)
        rows = torch.randn(D_SAE, D_IN, generator=g)
        norms = 0.3 + 2.7 * torch.rand(D_SAE, 1, generator=g)
        sae.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True) * norms)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.2)
        if kind == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.8)
        if kind == "batchtopk":  # the learned global threshold: here the 80th percentile of active pre-activations
            pre = (inputs() - sae.b_dec) @ sae.W_enc + sae.b_enc
            pre = pre * sae.W_dec.norm(dim=-1) if rescale else pre
            sae.topk_threshold.fill_(float(pre[pre > 0].quantile(0.8)))
    return sae


def saved(kind: str, rescale: bool, tmp_path):
    """(the folder our loader reads, SAELens's inference SAE for it)."""
    sae = build(kind, rescale)
    sae.save_model(tmp_path / "checkpoint")
    if kind == "batchtopk":
        sae.save_inference_model(tmp_path / "inference")
        return tmp_path / "checkpoint", SAE.load_from_disk(tmp_path / "inference")
    if kind == "topk-training":
        return tmp_path / "checkpoint", TopKTrainingSAE.load_from_disk(tmp_path / "checkpoint")
    return tmp_path / "checkpoint", SAE.load_from_disk(tmp_path / "checkpoint")


@pytest.mark.parametrize("kind, rescale", CASES)
def test_encode_and_decode_match_saelens(kind, rescale, tmp_path):
    folder, ref = saved(kind, rescale, tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == kind.removesuffix("-training")
    assert cfg.get("rescale_acts_by_decoder_norm", False) == rescale
    ours = load_sae(folder)
    x = inputs()
    with torch.no_grad():
        z_ref = ref.encode(x)
        out_ref = ref.decode(z_ref)
    z = ours.encode(x.double())
    assert torch.equal(ours.gate(x.double()), z_ref != 0)
    assert 0.02 < float((z_ref != 0).double().mean()) < 0.7  # some latents active, not all
    torch.testing.assert_close(z, z_ref.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.decode(z_ref.double()), out_ref.double(), rtol=1e-5, atol=1e-5)
    if kind == "batchtopk":  # SAELens's own JumpReLU file of the same SAE loads to the same encoder
        torch.testing.assert_close(load_sae(tmp_path / "inference").encode(x.double()), z, rtol=1e-5, atol=1e-5)
    if rescale:  # the setting matters here: ignoring it picks other latents
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": False}))
        (tmp_path / "plain" / "sae_weights.safetensors").write_bytes((folder / "sae_weights.safetensors").read_bytes())
        assert not torch.equal(load_sae(tmp_path / "plain").gate(x.double()), ours.gate(x.double()))


def test_rescaling_where_saelens_has_none_and_a_batchtopk_without_threshold_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = saved("jumprelu", False, tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": True}))
    with pytest.raises(MdaError, match=r"cfg.json: rescale_acts_by_decoder_norm is true, but SAELens's jumprelu "
                                       r"SAEs have no such setting"):
        load_sae(folder)
    folder, _ = saved("batchtopk", True, tmp_path / "b")
    weights = load_file(folder / "sae_weights.safetensors")
    save_file({k: v for k, v in weights.items() if k != "topk_threshold"}, folder / "sae_weights.safetensors")
    with pytest.raises(MdaError, match=r"sae_weights.safetensors: missing tensor\(s\) topk_threshold"):
        load_sae(folder)
