"""GPT-NeoX (Pythia architecture) models: building, checkpoint layout, hub download.

A checkpoint is a folder `step<N>/` holding
- `model.safetensors` and `config.json` (what `GPTNeoXForCausalLM.from_pretrained` reads),
- `trainer_state.pt` (optimizer, scheduler, RNG states, data cursor) for locally trained
  runs, enough to continue bit-exactly. Hub checkpoints have no trainer state: EleutherAI
  did not publish optimizer states.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mda.core.config import HubModel, Model
from mda.core.errors import MdaError
from mda.core.io import atomic_dir

MODEL_FILES = ("model.safetensors", "config.json")
TRAINER_STATE = "trainer_state.pt"


def neox_config(model: Model, vocab_size: int) -> GPTNeoXConfig:
    """Pythia's architecture at the size given in params: parallel residual, partial
    rotary, untied unembedding, no dropout, LayerNorm eps 1e-5, and GPT-NeoX's
    "small_init" std sqrt(2 / (5·d_model)) (HF's 0.02 default is far smaller at tiny widths
    and slows early learning of attention patterns)."""
    config = GPTNeoXConfig(
        vocab_size=model.vocab_size or vocab_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.layers,
        num_attention_heads=model.heads,
        intermediate_size=model.intermediate_size,
        rotary_pct=model.rotary_pct,
        rotary_emb_base=10000,
        max_position_embeddings=model.max_position_embeddings,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_act="gelu",
        attention_dropout=0.0,
        hidden_dropout=0.0,
        layer_norm_eps=1e-5,
        initializer_range=(2.0 / (5.0 * model.hidden_size)) ** 0.5,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = "eager"
    return config


def rotary_fraction(config) -> float:
    """The share of each head's dimensions that rotary embeddings turn (transformers ≥ 5 keeps it
    in `rope_parameters`, older versions as `rotary_pct`)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("partial_rotary_factor", getattr(config, "rotary_pct", 1.0)))


def hub_initial_model(hub: HubModel, model: Model) -> GPTNeoXForCausalLM:
    """Pythia's own initialisation: the `step0` revision of `hub`, checked to have the shape
    `model` describes (one line naming the key that differs)."""
    from mda.core.errors import ConfigError

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"mda-hub-step0-{os.getpid()}"
    download_hub_checkpoints(hub.model_copy(update={"revisions": [0]}), tmp)
    try:
        loaded = load_model(step_dir(tmp, 0))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    c = loaded.config
    for key, theirs in (("layers", c.num_hidden_layers), ("hidden_size", c.hidden_size),
                        ("heads", c.num_attention_heads), ("intermediate_size", c.intermediate_size),
                        ("rotary_pct", rotary_fraction(c)), ("max_position_embeddings", c.max_position_embeddings),
                        ("vocab_size", c.vocab_size)):
        ours = getattr(model, key)
        if ours is not None and ours != theirs:
            raise ConfigError(f"params: model.{key}: {ours}, but {hub.repo_id}@step0 has {theirs}")
    loaded.config._attn_implementation = "eager"
    return loaded


def new_model(config: GPTNeoXConfig, seed: int) -> GPTNeoXForCausalLM:
    # Seed every global RNG a trainer state records, so checkpoints are the same bytes run to run.
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    model = GPTNeoXForCausalLM(config)
    model.config._attn_implementation = "eager"
    return model


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step{step}"


def saved_steps(root: str | os.PathLike) -> list[int]:
    """Steps of the checkpoint folders under `root`, ascending."""
    root = Path(root)
    if not root.is_dir():
        raise MdaError(f"{root}: checkpoint directory not found; run the checkpoints stage")
    steps = sorted(int(m.group(1)) for p in root.iterdir()
                   if (m := re.fullmatch(r"step(\d+)", p.name)) and p.is_dir())
    if not steps:
        raise MdaError(f"{root}: no step<N> checkpoint folders")
    return steps


def check_checkpoint(path: str | os.PathLike, need_trainer_state: bool = False) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise MdaError(f"{path}: checkpoint folder not found")
    needed = MODEL_FILES + ((TRAINER_STATE,) if need_trainer_state else ())
    for name in needed:
        if not (path / name).is_file():
            hint = " (hub checkpoints carry no optimizer state)" if name == TRAINER_STATE else ""
            raise MdaError(f"{path / name}: missing checkpoint file{hint}")
    return path


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> GPTNeoXForCausalLM:
    path = check_checkpoint(path)
    try:
        model = GPTNeoXForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    except Exception as err:  # safetensors/json errors come in many types
        raise MdaError(f"{path}: cannot load model ({str(err).splitlines()[0]})") from None
    model.eval()
    return model


def save_model(model: GPTNeoXForCausalLM, path: str | os.PathLike) -> None:
    model.save_pretrained(path, safe_serialization=True)


def load_trainer_state(path: str | os.PathLike) -> dict:
    path = check_checkpoint(path, need_trainer_state=True)
    try:
        return torch.load(path / TRAINER_STATE, weights_only=False, map_location="cpu")
    except Exception as err:
        raise MdaError(f"{path / TRAINER_STATE}: cannot load ({str(err).splitlines()[0]})") from None


# ----------------------------------------------------------------------------- hub
def download_hub_checkpoints(hub: HubModel, out: str | os.PathLike, progress=None,
                             skip: set[int] = frozenset()) -> list[int]:
    """Fetch `EleutherAI/pythia-<size>` at each `step<N>` revision into `out/step<N>/`
    (revisions in `skip` are already there: a resumed download).

    Only the model weights and config are fetched; Pythia's hub revisions carry no
    optimizer state, so retraining from them needs the fresh-optimizer fallback.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    out = Path(out)
    for step in hub.revisions:
        if step in skip:
            continue
        try:
            snap = Path(snapshot_download(
                hub.repo_id, revision=f"step{step}", cache_dir=hub.cache_dir,
                local_files_only=hub.local_files_only,
                allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin"]))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
            raise MdaError(f"{hub.repo_id}@step{step}: cannot fetch from the hub "
                           f"({str(err).splitlines()[0]})") from None
        if not (snap / "config.json").is_file():
            raise MdaError(f"{snap / 'config.json'}: missing from {hub.repo_id}@step{step}")
        with atomic_dir(step_dir(out, step)) as tmp:
            if (snap / "model.safetensors").is_file():
                shutil.copyfile(snap / "config.json", tmp / "config.json")
                shutil.copyfile(snap / "model.safetensors", tmp / "model.safetensors")
            elif (snap / "pytorch_model.bin").is_file():
                # Older Pythia revisions ship only a pickle: convert once to safetensors.
                model = GPTNeoXForCausalLM.from_pretrained(snap)
                save_model(model, tmp)
            else:
                raise MdaError(f"{snap}: no model weights in {hub.repo_id}@step{step}")
            check_checkpoint(tmp)
        if progress:
            progress(step)
    return list(hub.revisions)
