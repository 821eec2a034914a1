"""The language-model side of SMDA: loading, encoding, hidden states, Y and generations.

- The model studied is the last pretrained checkpoint with the corpus tokenizer (the embedded
  default) or a causal LM from the hub (e.g. Llama-3.2-3B-Instruct, prompts wrapped in its
  chat template). `smda-instruct` writes the analysed model to `data/smda/instruct/`: its
  weights and tokenizer, or — a hub model kept as it is — a `model.json` naming the repository
  and the commit, read back from the hub cache.
- Prompts in a chat template carry a pinned date (`smda.model.date_string`, passed to the
  template as `date_string`): Llama 3's template otherwise writes today's date, and a rerun on
  another day would encode other prompts.
- h: the residual stream after block `layer` (HF `hidden_states[layer + 1]`, SAELens's
  `blocks.<layer>.hook_resid_post`) at the read position (`smda.model.read_position`): the last
  prompt token, whose next-token distribution starts the response, or the end-of-turn token that
  closes the user's message.
- Y = log Σ_s p(s | prompt) over the refusal prefixes s (token sequences), each p a product
  of next-token probabilities.
- Sequences are right-padded: with causal attention, padding after a token never changes it.
- A generation is judged refused when its decoded text opens with one of the refusal patterns,
  compared after `normalise_text` (case, apostrophes, whitespace), up to a word boundary.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mda.core.config import SmdaHub, SmdaModel
from mda.core.errors import ConfigError, MdaError

MODEL_REF = "model.json"


@dataclass
class LM:
    """A causal LM ready to score: model (eval mode, on the runtime's device), tokenizer, settings."""

    model: torch.nn.Module
    tokenizer: object
    chat_template: bool
    batch_size: int
    rt: object  # mda.core.compute.Runtime
    read_position: str = SmdaModel.model_fields["read_position"].default
    date_string: str = SmdaModel.model_fields["date_string"].default

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


# ----------------------------------------------------------------------------- loading
def _hub_kwargs(hub: SmdaHub) -> dict:
    return {"revision": hub.revision, "cache_dir": hub.cache_dir, "local_files_only": hub.local_files_only}


def _hub_error(hub: SmdaHub, err: Exception) -> MdaError:
    return MdaError(f"{hub.repo_id}@{hub.revision}: cannot load from the hub ({str(err).splitlines()[0]})")


def load_tokenizer(model: SmdaModel, corpus_tokenizer: str | os.PathLike):
    """The studied model's tokenizer: the corpus's (checkpoints) or the hub repository's."""
    from transformers import AutoTokenizer

    if model.source == "hub":
        try:
            return AutoTokenizer.from_pretrained(model.hub.repo_id, **_hub_kwargs(model.hub))
        except Exception as err:  # hub, json and tokenizer errors come in many types
            raise _hub_error(model.hub, err) from None
    path = Path(corpus_tokenizer)
    if not path.is_dir():
        raise MdaError(f"{path}: missing; run the corpus stage")
    return AutoTokenizer.from_pretrained(str(path))


def load_base_model(model: SmdaModel, checkpoints: str | os.PathLike):
    """The model before the instruct stage: the last checkpoint, or the hub model (float32)."""
    if model.source == "hub":
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(model.hub.repo_id, dtype=torch.float32,
                                                        **_hub_kwargs(model.hub)).eval()
        except Exception as err:
            raise _hub_error(model.hub, err) from None
    from mda.model.neox import load_model, saved_steps, step_dir

    return load_model(step_dir(checkpoints, saved_steps(checkpoints)[-1]))


def hub_commit(hub: SmdaHub) -> str:
    """The commit `hub.revision` resolves to in the cache (what `model.json` pins)."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(hub.repo_id, allow_patterns=["config.json"], **_hub_kwargs(hub))
    except Exception as err:
        raise _hub_error(hub, err) from None
    return Path(path).name


def save_analysed(out: Path, model, tokenizer, smda_model: SmdaModel, trained: bool) -> dict:
    """Write the analysed model to `out`: weights + tokenizer, or a pin of the untouched hub model."""
    if smda_model.source == "hub" and not trained:
        ref = {"repo_id": smda_model.hub.repo_id, "revision": hub_commit(smda_model.hub)}
        (out / MODEL_REF).write_text(json.dumps(ref, indent=2, sort_keys=True) + "\n")
        return ref
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return {"path": "model"}


def load_analysed(directory: str | os.PathLike, smda_model: SmdaModel, rt) -> LM:
    """The model `smda-instruct` wrote (or pinned), on `rt.device`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    if (directory / MODEL_REF).is_file():
        ref = json.loads((directory / MODEL_REF).read_text())
        hub = smda_model.hub.model_copy(update={"repo_id": ref["repo_id"], "revision": ref["revision"]})
        try:
            model = AutoModelForCausalLM.from_pretrained(hub.repo_id, dtype=torch.float32, **_hub_kwargs(hub))
            tokenizer = AutoTokenizer.from_pretrained(hub.repo_id, **_hub_kwargs(hub))
        except Exception as err:
            raise _hub_error(hub, err) from None
    elif (directory / "model" / "config.json").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(directory / "model", dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"))
        except Exception as err:
            raise MdaError(f"{directory}: cannot load the instruct model ({str(err).splitlines()[0]})") from None
    else:
        raise MdaError(f"{directory}: missing; run the smda-instruct stage")
    eager_attention(model)
    return LM(model.to(rt.device).eval(), tokenizer, smda_model.chat_template, smda_model.batch_size, rt,
              smda_model.read_position, smda_model.date_string)


def eager_attention(model) -> None:
    """GPT-NeoX's eager attention, as every mda stage uses (same numerics as training)."""
    if getattr(model.config, "model_type", "") == "gpt_neox":
        model.config._attn_implementation = "eager"


# ----------------------------------------------------------------------------- encoding
def encode_prompt(lm_or_tok, prompt: str, chat_template: bool | None = None) -> list[int]:
    """Token ids of a prompt as the model sees it (chat template, with the pinned date, and
    generation prompt if set)."""
    tok = getattr(lm_or_tok, "tokenizer", lm_or_tok)
    use_template = lm_or_tok.chat_template if chat_template is None else chat_template
    if use_template:
        return list(tok(chat_text(lm_or_tok, prompt), add_special_tokens=False).input_ids)
    return list(tok(prompt, add_special_tokens=False).input_ids)


def chat_text(lm_or_tok, prompt: str) -> str:
    """A prompt as a user turn in the tokenizer's chat template, with the generation prompt and
    the date of `smda.model.date_string` (the LM's, else the default)."""
    tok = getattr(lm_or_tok, "tokenizer", lm_or_tok)
    date = getattr(lm_or_tok, "date_string", LM.date_string)
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True, date_string=date)


def encode_response(tokenizer, response: str) -> list[int]:
    """A response's ids, ended by the end-of-turn token (the tokenizer's eos)."""
    ids = list(tokenizer(response, add_special_tokens=False).input_ids)
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def refusal_prefix_ids(tokenizer, prefixes: list[str]) -> list[list[int]]:
    """Each refusal prefix's token ids, or one ConfigError line naming the prefix the tokenizer
    cannot encode (an unknown word, or ids that do not decode back to the prefix)."""
    out = []
    for prefix in prefixes:
        ids = list(tokenizer(prefix, add_special_tokens=False).input_ids)
        unk = tokenizer.unk_token_id
        back = tokenizer.decode(ids) if ids else ""
        if not ids or (unk is not None and unk in ids) or _squash(back) != _squash(prefix):
            why = "unknown token" if ids and unk is not None and unk in ids else f"decodes to {back!r}"
            raise ConfigError(f"params: smda.task.refusal_prefixes: {prefix!r} cannot be encoded by the "
                              f"tokenizer ({why})")
        out.append(ids)
    return out


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def pad_right(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


# ----------------------------------------------------------------------------- h and Y
def shared_inputs(prefixes: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The response-side inputs that cover every prefix, and which input each prefix reads.

    Scoring prefix s needs the model's input to hold s[:-1] after the prompt; prefixes that
    share tokens share a sequence ("raise False" and "raise None" both read "raise"; "I cannot"
    reads "I", a start of "I can't"'s "I can"), so each prompt takes as few forwards as possible."""
    heads = sorted({tuple(p[:-1]) for p in prefixes}, key=len, reverse=True)
    inputs: list[tuple[int, ...]] = []
    for head in heads:
        if not any(kept[:len(head)] == head for kept in inputs):
            inputs.append(head)
    reads = [next(i for i, kept in enumerate(inputs) if kept[:len(p) - 1] == tuple(p[:-1])) for p in prefixes]
    return [list(i) for i in inputs], reads


def read_positions(lm: LM, prompts: list[list[int]]) -> list[int]:
    """Where h is read in each prompt (`smda.model.read_position`): its last token, or the last
    end-of-turn token (the tokenizer's eos), which closes the user's message in a chat template."""
    if lm.read_position == "last":
        return [len(p) - 1 for p in prompts]
    tok, out = lm.tokenizer, []
    for p in prompts:
        if tok.eos_token_id not in p:
            raise ConfigError(f"params: smda.model.read_position: end_of_turn, but a prompt holds no end-of-turn "
                              f"token {tok.eos_token!r} (the tokenizer's eos): {tok.decode(p)[:120]!r}")
        out.append(len(p) - 1 - p[::-1].index(tok.eos_token_id))
    return out


def _trunk(lm: LM, ids: torch.Tensor):
    """The transformer without its unembedding: hidden states of every block, final-norm output."""
    with lm.rt.autocast():
        return lm.model.base_model(input_ids=ids, output_hidden_states=True)


def hidden_and_logprob(lm: LM, prompts: list[list[int]], prefixes: list[list[int]],
                       layer: int | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(h, Y) for each prompt: h (n, d) float64, the residual stream after block `layer` at the
    read position (None when `layer` is None); Y (n,) float64 = log Σ_s p(s | prompt) over
    the refusal prefixes. Logits are computed only where a prefix token is predicted."""
    if layer is not None and not 0 <= layer < lm.layers:
        raise ConfigError(f"params: smda.sae.layer: {layer} is not a block of this model "
                          f"({lm.layers} blocks: 0…{lm.layers - 1})")
    where = read_positions(lm, prompts) if layer is not None else None
    inputs, reads = shared_inputs(prefixes)
    seqs = [(i, m, p + tail) for i, p in enumerate(prompts) for m, tail in enumerate(inputs)]
    h = torch.empty(len(prompts), lm.hidden_size, dtype=torch.float64)
    logp = torch.zeros(len(prompts) * len(prefixes), dtype=torch.float64)
    unembed = lm.model.get_output_embeddings()
    with torch.no_grad():
        for start in range(0, len(seqs), lm.batch_size):
            chunk = seqs[start:start + lm.batch_size]
            ids = pad_right([s for _, _, s in chunk], lm.pad_id).to(lm.rt.device)
            out = _trunk(lm, ids)
            # Every prefix token this chunk predicts: (row, position predicting it, token, slot).
            entries = [(row, len(prompts[i]) - 1 + j, t, i * len(prefixes) + k)
                       for row, (i, m, _) in enumerate(chunk)
                       for k, prefix in enumerate(prefixes) if reads[k] == m
                       for j, t in enumerate(prefix)]
            rows, pos, tgt, slot = (torch.tensor(col) for col in zip(*entries))
            dev = ids.device
            with lm.rt.autocast():
                logits = unembed(out.last_hidden_state[rows.to(dev), pos.to(dev)]).float()
            token_logp = logits.log_softmax(-1).gather(-1, tgt.to(dev)[:, None])[:, 0]
            logp.index_add_(0, slot, token_logp.double().cpu())
            first = [row for row, (_, m, _) in enumerate(chunk) if m == 0]
            if first and layer is not None:
                at = torch.tensor([where[chunk[r][0]] for r in first], device=dev)
                h[[chunk[r][0] for r in first]] = out.hidden_states[layer + 1][
                    torch.tensor(first, device=dev), at].double().cpu()
    return (h if layer is not None else None), torch.logsumexp(logp.view(len(prompts), len(prefixes)), dim=1)


def residual_stream(lm: LM, prompts: list[list[int]], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(every position's, each read position's) residual stream after block `layer`, float32:
    the SAE's training and measuring data."""
    every, last = [], []
    where = read_positions(lm, prompts)
    with torch.no_grad():
        for start in range(0, len(prompts), lm.batch_size):
            chunk = prompts[start:start + lm.batch_size]
            ids = pad_right(chunk, lm.pad_id).to(lm.rt.device)
            hidden = _trunk(lm, ids).hidden_states[layer + 1].float().cpu()
            for row, p in enumerate(chunk):
                every.append(hidden[row, :len(p)])
                last.append(hidden[row, where[start + row]])
    return torch.cat(every), torch.stack(last)


def generate(lm: LM, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """Greedy continuations (`tokens` new ids each), prompts left-padded in batches."""
    out: list[list[int]] = []
    pad = lm.pad_id
    for start in range(0, len(prompts), lm.batch_size):
        chunk = prompts[start:start + lm.batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=lm.rt.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=lm.rt.device)
        with torch.no_grad(), lm.rt.autocast():
            gen = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                                    min_new_tokens=tokens, do_sample=False, num_beams=1,
                                    pad_token_id=pad, eos_token_id=None, top_p=None, top_k=None,
                                    temperature=None)
        out.extend(gen[:, width:].cpu().tolist())
    return out


def starts_with_any(generated: list[int], prefixes: list[list[int]]) -> bool:
    return any(generated[:len(p)] == p for p in prefixes)


APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def normalise_text(text: str) -> str:
    """Case-folded, curly and modifier apostrophes as ', whitespace runs as one space, no leading
    whitespace: what refusal patterns and generations are compared as."""
    return re.sub(r"\s+", " ", text.translate(APOSTROPHES)).lstrip().casefold()


def refusal_texts(task) -> list[str]:
    """The patterns generations are judged by: `smda.task.refusal_patterns`, or the prefixes."""
    return list(task.refusal_patterns or task.refusal_prefixes)


def is_refusal(text: str, patterns: list[str]) -> bool:
    """Whether a generation's text opens with one of `patterns` (after `normalise_text`), the
    match ending at a word boundary: "I can't" matches "I CAN’T help", not "I can'tx"."""
    text = normalise_text(text)
    for pattern in map(normalise_text, patterns):
        if text.startswith(pattern) and not text[len(pattern):len(pattern) + 1].isalnum():
            return True
    return False


def refused(tokenizer, generated: list[int], patterns: list[str]) -> bool:
    """`is_refusal` on a generation's decoded ids (special tokens kept, so one that opens the
    generation is no refusal)."""
    return is_refusal(decode(tokenizer, generated), patterns)


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


# ----------------------------------------------------------------------------- SFT batches
def pair_tokens(lm_or_tok, prompts: list[str], responses: list[str],
                chat_template: bool | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per pair."""
    tok = getattr(lm_or_tok, "tokenizer", lm_or_tok)
    return [(encode_prompt(lm_or_tok, p, chat_template), encode_response(tok, r))
            for p, r in zip(prompts, responses)]


def response_batch(pairs: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `prompt + response` right-padded, and (rows, len − 1) target weights: 1 where the
    target is a response token, 0 on prompt and padding targets (loss on responses only)."""
    rows = [p + r for p, r in pairs]
    ids = pad_right(rows, pad)
    weights = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    for i, (p, r) in enumerate(pairs):
        weights[i, len(p) - 1:len(p) - 1 + len(r)] = 1.0
    return ids, weights


def seeded_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)
