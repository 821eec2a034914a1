"""Where one attention head lives inside GPT-NeoX's weights.

GPT-NeoX fuses the three projections into `attention.query_key_value`, whose output is
viewed as (heads, 3·head_size): the rows are **interleaved per head** —
[q_0, k_0, v_0, q_1, k_1, v_1, …], each block `head_size` rows long — not [Q; K; V].
A head's output projection is its `head_size` columns of `attention.dense`.

Blocks of a head (weights only; biases are excluded because they are shared offsets, not
the head's token-to-token computation, and the influence literature restricts to weights):
- `qk`: the head's query rows and key rows of `query_key_value`, one joint block;
- `v`: its value rows of `query_key_value`;
- `o`: its columns of `attention.dense`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

BLOCKS = ("qk", "v", "o")


@dataclass(frozen=True, order=True)
class Head:
    layer: int
    head: int

    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}"

    @classmethod
    def parse(cls, name: str) -> "Head":
        m = re.fullmatch(r"L(\d+)H(\d+)", name)
        if not m:
            raise ValueError(f"not a head name: {name!r} (expected L<layer>H<head>)")
        return cls(int(m.group(1)), int(m.group(2)))


def head_size(config) -> int:
    return config.hidden_size // config.num_attention_heads


def qkv_rows(config, head: int) -> dict[str, torch.Tensor]:
    """Row indices of `query_key_value.weight` for the head's query, key and value."""
    hs = head_size(config)
    base = head * 3 * hs
    return {part: torch.arange(base + i * hs, base + (i + 1) * hs) for i, part in enumerate("qkv")}


def block_rows(config, head: int, block: str) -> torch.Tensor:
    """Indices into the block's module weight: rows of `query_key_value` for `qk`/`v`,
    columns of `attention.dense` for `o`."""
    rows = qkv_rows(config, head)
    if block == "qk":
        return torch.cat([rows["q"], rows["k"]])
    if block == "v":
        return rows["v"]
    if block == "o":
        hs = head_size(config)
        return torch.arange(head * hs, (head + 1) * hs)
    raise ValueError(f"unknown block {block!r} (expected one of {BLOCKS})")


def block_module(model, layer: int, block: str) -> torch.nn.Linear:
    attention = model.gpt_neox.layers[layer].attention
    return attention.dense if block == "o" else attention.query_key_value


def block_weight(model, head: Head, block: str) -> torch.Tensor:
    """The head's block as a (out, in) matrix (a copy; `o` is (hidden, head_size))."""
    weight = block_module(model, head.layer, block).weight
    idx = block_rows(model.config, head.head, block).to(weight.device)
    return weight[:, idx] if block == "o" else weight[idx]


def check_head(layers: int, heads: int, head: Head, what: str = "head") -> None:
    if not (0 <= head.layer < layers and 0 <= head.head < heads):
        raise ValueError(f"{what} {head.name} does not exist in the model ({layers} layers × {heads} heads)")


@dataclass(frozen=True)
class Block:
    """One parameter block: rows `out_index` × columns `in_index` of a Linear weight in one layer
    (`None` = all). A head's blocks are slices; a whole module is a block with no indices."""

    name: str
    layer: int
    module: str  # "query_key_value" | "dense"
    out_index: tuple[int, ...] | None = None
    in_index: tuple[int, ...] | None = None

    def linear(self, model) -> torch.nn.Linear:
        return getattr(model.gpt_neox.layers[self.layer].attention, self.module)

    def shape(self, model) -> tuple[int, int]:
        out_features, in_features = self.linear(model).weight.shape
        return (len(self.out_index) if self.out_index else out_features,
                len(self.in_index) if self.in_index else in_features)

    def weight(self, model) -> torch.Tensor:
        w = self.linear(model).weight
        if self.out_index:
            w = w[list(self.out_index)]
        if self.in_index:
            w = w[:, list(self.in_index)]
        return w

    def slice_grad(self, weight_grad: torch.Tensor) -> torch.Tensor:
        """The block's part of a gradient w.r.t. the whole module weight."""
        g = weight_grad
        if self.out_index:
            g = g[list(self.out_index)]
        if self.in_index:
            g = g[:, list(self.in_index)]
        return g


def head_blocks(config, head: Head, mode: str = "qkvo") -> list[Block]:
    """The head's parameter blocks: `qk` only, or `qk`, `v`, `o` (mode `qkvo`)."""
    check_head(config.num_hidden_layers, config.num_attention_heads, head)
    names = ("qk",) if mode == "qk" else BLOCKS
    out = []
    for name in names:
        idx = tuple(block_rows(config, head.head, name).tolist())
        module = "dense" if name == "o" else "query_key_value"
        out.append(Block(f"{head.name}/{name}", head.layer, module,
                         out_index=None if name == "o" else idx, in_index=idx if name == "o" else None))
    return out


def module_blocks(layer: int) -> list[Block]:
    """A whole layer's attention weights as two blocks (what kronfluence sees as modules)."""
    return [Block(f"L{layer}/query_key_value", layer, "query_key_value"),
            Block(f"L{layer}/dense", layer, "dense")]
