"""Sparse autoencoders on the residual stream: a small TopK SAE trained here, and one loader
for it and for SAEs from the hub in SAELens's format.

The format (SAELens): a folder with `cfg.json` (`architecture`, `d_in`, `d_sae`, `k` for
TopK, `apply_b_dec_to_input`, `normalize_activations`, `rescale_acts_by_decoder_norm` for TopK /
BatchTopK, the hook in `hook_name` or `metadata.hook_name`) and `sae_weights.safetensors` with
`W_enc` (d_in, d_sae), `b_enc` (d_sae), `W_dec` (d_sae, d_in), `b_dec` (d_in) (and `threshold`
(d_sae) for JumpReLU, `topk_threshold` (a scalar) for BatchTopK).

Encoder, with pre = (h − b_dec·apply_b_dec_to_input)·W_enc + b_enc:
- `topk`: keep the k largest pre-activations, then ReLU (SAELens's TopK order);
- `standard`: ReLU(pre);  `jumprelu`: ReLU(pre) where pre > threshold;
- `batchtopk` (a SAELens training checkpoint): at inference SAELens turns it into a JumpReLU SAE
  at the learned global `topk_threshold` (`BatchTopKTrainingSAE.process_state_dict_for_saving_inference`),
  and so do we — never the top k·n over a batch, which would make one prompt's features depend
  on the other prompts in its batch.
`rescale_acts_by_decoder_norm` (topk, batchtopk): SAELens multiplies pre by ‖W_dec row‖ before
choosing the active latents and divides the latents by it before decoding. We fold that into the
weights on loading, as SAELens does when it saves an inference SAE (`_fold_norm_topk`):
W_enc·‖W_dec‖, b_enc·‖W_dec‖, W_dec/‖W_dec‖ (BatchTopK's threshold is already in those units), so
encode / decode give SAELens's values and the encoder below stays pre-then-gate.
The **gate** is the encoder's own active set at h — the latents it lets through (in the
top k and positive; positive; above the threshold). The encoder is linear in h on that
set, so its first-order change is gate ⊙ (Δh·W_enc): SMDA's ΔX, with the same encoder the
SAE was trained with (b_dec cancels in the difference).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mda.core.config import SmdaSae
from mda.core.errors import MdaError

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
ARCHITECTURES = ("topk", "batchtopk", "standard", "jumprelu")
RESCALED = ("topk", "batchtopk")  # SAELens's architectures with rescale_acts_by_decoder_norm


@dataclass
class Sae:
    """An SAE's weights and encoder rule (any of `ARCHITECTURES`)."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    architecture: str = "topk"
    k: int | None = None
    threshold: torch.Tensor | None = None
    apply_b_dec_to_input: bool = True
    cfg: dict = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def to(self, dtype: torch.dtype) -> "Sae":
        cast = lambda t: None if t is None else t.to(dtype)
        return Sae(cast(self.W_enc), cast(self.b_enc), cast(self.W_dec), cast(self.b_dec), self.architecture,
                   self.k, cast(self.threshold), self.apply_b_dec_to_input, self.cfg)

    def pre(self, h: torch.Tensor) -> torch.Tensor:
        centred = h - self.b_dec * float(self.apply_b_dec_to_input)
        return centred @ self.W_enc + self.b_enc

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """Boolean (…, d_sae): the latents the encoder lets through at h."""
        return active_set(self.pre(h), self.architecture, self.k, self.threshold)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        pre = self.pre(h)
        return torch.where(active_set(pre, self.architecture, self.k, self.threshold), pre, torch.zeros_like(pre))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec


def active_set(pre: torch.Tensor, architecture: str, k: int | None, threshold: torch.Tensor | None) -> torch.Tensor:
    positive = pre > 0
    if architecture == "standard":
        return positive
    if architecture in ("jumprelu", "batchtopk"):
        return positive & (pre > threshold)
    top = torch.zeros_like(positive)
    top.scatter_(-1, pre.topk(k, dim=-1).indices, True)
    return top & positive


# ----------------------------------------------------------------------------- load / save
def save_sae(sae: Sae, out: Path, hook_layer: int, model_name: str) -> None:
    """Write `cfg.json` + `sae_weights.safetensors` as SAELens does (so SAELens can load it too)."""
    cfg = {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": sae.apply_b_dec_to_input,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": model_name, "hook_name": f"blocks.{hook_layer}.hook_resid_post",
                        "hook_layer": hook_layer}}
    (out / CFG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}, out / WEIGHTS)


def load_sae(directory: str | os.PathLike, dtype: torch.dtype = torch.float64) -> Sae:
    """An SAE in SAELens's format, or one MdaError line naming the file and key at fault."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CFG, directory / WEIGHTS
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise MdaError(f"{cfg_path}: missing; run the smda-sae stage") from None
    except json.JSONDecodeError as err:
        raise MdaError(f"{cfg_path}: corrupt JSON ({err})") from None
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise MdaError(f"{cfg_path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise MdaError(f"{cfg_path}: normalize_activations {cfg['normalize_activations']!r} is not supported "
                       "(fold the scaling into the weights: SAELens fold_activation_norm_scaling_factor)")
    try:
        weights = load_file(weights_path)
    except FileNotFoundError:
        raise MdaError(f"{weights_path}: missing") from None
    except Exception as err:
        raise MdaError(f"{weights_path}: unreadable ({str(err).splitlines()[0]})") from None
    need = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    if arch == "batchtopk":  # a SAELens checkpoint holds the scalar topk_threshold, a converted one threshold
        need.append("threshold" if "threshold" in weights else "topk_threshold")
    missing = [n for n in need if n not in weights]
    if missing:
        raise MdaError(f"{weights_path}: missing tensor(s) {', '.join(missing)} (SAELens key names)")
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
              "threshold": (d_sae,), "topk_threshold": ()}
    for name in need:
        if tuple(weights[name].shape) != shapes[name]:
            raise MdaError(f"{weights_path}: {name} has shape {tuple(weights[name].shape)}, cfg.json says "
                           f"{shapes[name]} (d_in {d_in}, d_sae {d_sae})")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch == "topk" and not (isinstance(k, int) and 0 < k <= d_sae):
        raise MdaError(f"{cfg_path}: k {k!r} must be an integer in 1…d_sae for a topk SAE")
    # Only the top-level key: SAELens also copies a training run's setting into metadata, where it
    # describes weights it has already folded.
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    if not isinstance(rescale, bool):
        raise MdaError(f"{cfg_path}: rescale_acts_by_decoder_norm {rescale!r} must be true or false")
    if rescale and arch not in RESCALED:
        raise MdaError(f"{cfg_path}: rescale_acts_by_decoder_norm is true, but SAELens's {arch} SAEs have no such "
                       "setting (it would ignore it); fold the decoder norms into the weights and drop the key")
    get = lambda n: weights[n].to(dtype) if n in weights else None
    threshold = get("threshold")
    if arch == "batchtopk" and threshold is None:
        threshold = get("topk_threshold").expand(d_sae).clone()
    sae = Sae(get("W_enc"), get("b_enc"), get("W_dec"), get("b_dec"), arch, k if arch == "topk" else None,
              threshold, bool(cfg.get("apply_b_dec_to_input", True)), cfg)
    return fold_decoder_norm(sae) if rescale else sae


def fold_decoder_norm(sae: Sae) -> Sae:
    """`rescale_acts_by_decoder_norm` folded into the weights (SAELens's `_fold_norm_topk`): the
    pre-activations come out multiplied by each latent's decoder norm and the decoder rows are unit
    norm, so the gate is chosen on the rescaled values and decode divides them back."""
    norm = sae.W_dec.norm(dim=1).clamp(min=1e-8)  # SAELens's clamp (get_W_dec_norm)
    return replace(sae, W_enc=sae.W_enc * norm, b_enc=sae.b_enc * norm, W_dec=sae.W_dec / norm[:, None])


def hook_layer(cfg: dict) -> int | None:
    """The block an SAE was trained on, from its `hook_name` (`blocks.<L>.hook_resid_post`)."""
    name = cfg.get("hook_name") or (cfg.get("metadata") or cfg.get("meta") or {}).get("hook_name")
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", name or "")
    return int(match.group(1)) if match else None


def check_fits(sae: Sae, hidden_size: int, layer: int, directory: str | os.PathLike) -> None:
    """The SAE reads the hooked layer: same width, and (when it names one) the same block."""
    cfg_path = Path(directory) / CFG
    if sae.d_in != hidden_size:
        raise MdaError(f"{cfg_path}: d_in {sae.d_in} does not match the hidden size {hidden_size} of the "
                       f"model's block {layer} (params smda.sae.layer)")
    trained_on = hook_layer(sae.cfg)
    if trained_on is not None and trained_on != layer:
        raise MdaError(f"{cfg_path}: hook_name is block {trained_on}'s residual stream, but params "
                       f"smda.sae.layer is {layer}")


def fetch_hub_sae(params: SmdaSae, out: Path) -> dict:
    """Copy a SAELens-format SAE (`cfg.json`, `sae_weights.safetensors`) from the hub cache into `out`."""
    from huggingface_hub import snapshot_download

    hub, folder = params.hub, params.hub_path.strip("/")
    names = [f"{folder}/{n}" if folder else n for n in (CFG, WEIGHTS)]
    try:
        snap = Path(snapshot_download(hub.repo_id, revision=hub.revision, cache_dir=hub.cache_dir,
                                      local_files_only=hub.local_files_only, allow_patterns=names))
    except Exception as err:
        raise MdaError(f"{hub.repo_id}@{hub.revision}: cannot fetch the SAE from the hub "
                       f"({str(err).splitlines()[0]})") from None
    for name in names:
        if not (snap / name).is_file():
            raise MdaError(f"{hub.repo_id}@{hub.revision}: no {name} (params smda.sae.hub_path)")
        shutil.copyfile(snap / name, out / Path(name).name)
    return {"repo_id": hub.repo_id, "revision": snap.name, "path": folder}


# ----------------------------------------------------------------------------- training
def train_topk(acts: torch.Tensor, params: SmdaSae, progress: bool = True) -> tuple[Sae, list[dict]]:
    """A TopK SAE fitted to `acts` (n, d_in) float32 by Adam on the squared reconstruction error,
    with decoder rows kept at unit norm and the AuxK loss (Gao et al., 2024) reviving latents
    dead for `dead_after` vectors. Deterministic for a seed on CPU."""
    gen = torch.Generator().manual_seed(params.seed)
    d_in, d_sae, k = acts.shape[1], params.width, params.k
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.clone()
    b_enc = torch.zeros(d_sae)
    b_dec = acts.mean(0).clone()
    tensors = [t.requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec)]
    opt = torch.optim.Adam(tensors, lr=params.lr, foreach=False)
    scale = acts.var(0).sum()  # loss in units of the data's variance
    since_fired = torch.zeros(d_sae)
    dead_after = 20 * params.batch_size
    log = []
    steps = tqdm(range(params.steps), desc="sae", unit="step", disable=not progress)
    for step in steps:
        x = acts[torch.randint(len(acts), (params.batch_size,), generator=gen)]
        pre = (x - b_dec) @ W_enc + b_enc
        gate = active_set(pre, "topk", k, None)
        z = torch.where(gate, pre, torch.zeros_like(pre))
        recon = z @ W_dec + b_dec
        mse = (recon - x).pow(2).sum(1).mean() / scale
        since_fired += len(x)
        since_fired[gate.any(0)] = 0
        dead = since_fired > dead_after
        aux = torch.zeros(())
        if params.aux_k and dead.any():
            k_aux = min(params.aux_k, int(dead.sum()))
            dead_pre = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
            top = dead_pre.topk(k_aux, dim=-1)
            z_aux = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp(min=0))
            residual = (x - recon).detach()
            aux = (z_aux @ W_dec - residual).pow(2).sum(1).mean() / scale
        loss = mse + aux / 32
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():  # keep decoder rows at unit norm: no gradient along them
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        if step % 50 == 0 or step == params.steps - 1:
            log.append({"step": step, "fvu": float(mse.detach()), "aux": float(aux.detach()), "dead": int(dead.sum())})
            steps.set_postfix(fvu=f"{float(mse.detach()):.3f}", dead=int(dead.sum()))
    sae = Sae(*(t.detach().clone() for t in (W_enc, b_enc, W_dec, b_dec)), architecture="topk", k=k)
    return sae, log


# ----------------------------------------------------------------------------- quality
def quality(sae: Sae, acts: torch.Tensor) -> dict:
    """Explained variance 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², dead-latent share (never active on
    `acts`), and mean L0, on the given activation vectors."""
    acts = acts.to(sae.W_enc.dtype)
    z = sae.encode(acts)
    err = (sae.decode(z) - acts).pow(2).sum()
    total = (acts - acts.mean(0)).pow(2).sum()
    fired = (z > 0).any(0)
    return {"explained_variance": float(1 - err / total), "dead_share": float(1 - fired.double().mean()),
            "l0": float((z > 0).double().sum(1).mean()), "vectors": int(len(acts))}


def heldout_split(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of `n` prompts."""
    order = np.random.default_rng([seed, 7]).permutation(n)
    cut = max(1, int(round(share * n)))
    return np.sort(order[cut:]), np.sort(order[:cut])
