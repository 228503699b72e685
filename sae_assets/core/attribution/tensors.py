"""Tracked weights: which tensors are captured, the modules that hold them, how entries are indexed.

A tracked tensor is named by its key in the model's state dict (what `model.safetensors`
holds), e.g. `blocks.0.mlp.in.weight`. In a TransformerLens 4 native bridge every tracked
weight is a plain `nn.Linear` (attention Q/K/V/O and MLP in/out, inside `LinearBridge`s; no
einsum `W_Q` parameters are created) or an `nn.Embedding`, so a shift's (row, column) is the
index into the weight *as stored*, PyTorch's (out_features, in_features) layout:

| kind      | shape                      | row                              | column                   | unit           |
|-----------|----------------------------|----------------------------------|--------------------------|----------------|
| `attn.q/k/v` | (n_heads*d_head, d_model) | head*d_head + e (head output)    | residual dimension       | head = row // d_head |
| `attn.o`  | (d_model, n_heads*d_head)  | residual dimension               | head*d_head + e          | head = column // d_head |
| `mlp.in`  | (d_mlp, d_model)           | hidden unit                      | residual dimension       | neuron = row   |
| `mlp.out` | (d_model, d_mlp)           | residual dimension               | hidden unit              | neuron = column |
| `embed`   | (d_vocab, d_model)         | token id                         | residual dimension       | token = row    |
| `unembed` | (d_vocab, d_model)         | token id (its logit)             | residual dimension       | token = row    |

(TransformerLens' processed `W_in` is (d_model, d_mlp), the transpose: neuron j is a *row* of
`mlp.in.weight` and a *column* of `mlp.out.weight`.) All tracked entries are numbered in one
flat space, tensor after tensor in the order above, layer by layer; `TensorLayout.decode`
maps a flat index back to (tensor, row, column). Tests: tests/test_attribution_core.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

BLOCK_KINDS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out")
TENSOR_KINDS = (*BLOCK_KINDS, "embed", "unembed")
DEFAULT_KINDS = BLOCK_KINDS
"""Embeddings are excluded by default, as in the write-up (they dwarf the rest of a small model)."""

_UNITS = {  # kind -> (unit kind, axis that indexes the unit)
    "attn.q": ("attention_head", "row"), "attn.k": ("attention_head", "row"),
    "attn.v": ("attention_head", "row"), "attn.o": ("attention_head", "column"),
    "mlp.in": ("mlp_neuron", "row"), "mlp.out": ("mlp_neuron", "column"),
    "embed": ("embedding_token", "row"), "unembed": ("unembedding_token", "row"),
}
UNIT_KINDS = ("mlp_neuron", "attention_head", "embedding_token", "unembedding_token")


@dataclass(frozen=True)
class TrackedTensor:
    name: str
    """State-dict key of the weight, e.g. 'blocks.0.mlp.in.weight'."""
    kind: str
    """One of TENSOR_KINDS."""
    layer: int | None
    """Block index; None for embed/unembed."""
    rows: int
    columns: int
    offset: int
    """Flat index of entry (0, 0) in the space of all tracked entries."""
    unit_kind: str
    unit_axis: str
    """'row' or 'column': the axis whose index, // unit_width, is the unit."""
    unit_width: int
    """d_head for attention heads, 1 otherwise."""

    @property
    def size(self) -> int:
        return self.rows * self.columns

    @property
    def module_path(self) -> str:
        return self.name.removesuffix(".weight")


@dataclass(frozen=True)
class TensorLayout:
    tensors: tuple[TrackedTensor, ...]

    @property
    def total(self) -> int:
        return sum(t.size for t in self.tensors)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def decode(self, flat_index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tensor position, row, column) arrays of flat indices into the tracked space."""
        flat = np.asarray(flat_index, dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= self.total):
            raise ValueError(f"flat index outside the tracked space [0, {self.total})")
        offsets = np.array([t.offset for t in self.tensors], dtype=np.int64)
        columns = np.array([t.columns for t in self.tensors], dtype=np.int64)
        position = np.searchsorted(offsets, flat, side="right") - 1
        local = flat - offsets[position]
        return position.astype(np.int16), (local // columns[position]).astype(np.int32), \
            (local % columns[position]).astype(np.int32)

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(t) for t in self.tensors]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> TensorLayout:
        return cls(tuple(TrackedTensor(**entry) for entry in data))


def _module_at(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The torch module at a bridge path ('blocks.0.mlp.in'), unwrapped from its bridge."""
    obj: Any = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    inner = getattr(obj, "original_component", None)
    return inner if inner is not None else obj


def _paths(model: torch.nn.Module, kinds: Sequence[str]) -> list[tuple[str, str, int | None]]:
    unknown = [k for k in kinds if k not in TENSOR_KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"tracked tensors {list(kinds)} must be distinct names from {list(TENSOR_KINDS)}"
                         + (f"; unknown: {unknown}" if unknown else ""))
    paths = [(f"blocks.{layer}.{kind}", kind, layer) for layer in range(model.cfg.n_layers)
             for kind in BLOCK_KINDS if kind in kinds]
    return paths + [(kind, kind, None) for kind in ("embed", "unembed") if kind in kinds]


def track(model: torch.nn.Module, kinds: Sequence[str] = DEFAULT_KINDS) -> tuple[TensorLayout, list[torch.nn.Module]]:
    """The layout of the tracked weights of a TransformerBridge and the modules holding them.

    Raises ValueError for an unknown kind, a weight the model does not have, or one held by
    something other than nn.Linear / nn.Embedding (whose per-datum gradients are known here).
    """
    state = model.state_dict()
    tensors, modules, offset = [], [], 0
    for path, kind, layer in _paths(model, kinds):
        name = f"{path}.weight"
        try:
            module = _module_at(model, path)
        except (AttributeError, IndexError) as exc:
            raise ValueError(f"tracked tensor {name!r} ({kind}) does not exist in this model") from exc
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            raise ValueError(f"tracked tensor {name!r} is held by {type(module).__name__}; "
                             "capture handles nn.Linear and nn.Embedding weights only")
        if name not in state or state[name].data_ptr() != module.weight.data_ptr():
            raise ValueError(f"tracked tensor {name!r} is not the weight of module {path!r} in the state dict")
        rows, columns = module.weight.shape
        unit_kind, axis = _UNITS[kind]
        width = model.cfg.d_head if unit_kind == "attention_head" else 1
        tensors.append(TrackedTensor(name, kind, layer, rows, columns, offset, unit_kind, axis, width))
        modules.append(module)
        offset += rows * columns
    return TensorLayout(tuple(tensors)), modules


def unit_weights(model: torch.nn.Module, unit_kind: str, layer: int, unit: int
                 ) -> list[tuple[torch.Tensor, tuple[slice, ...]]]:
    """The (weight or bias, index) slices a zero-weight ablation of one unit sets to zero.

    An MLP neuron j: row j of mlp.in.weight, mlp.in.bias[j], column j of mlp.out.weight. A
    head h: its rows of q/k/v weights and biases, its columns of o.weight. Only the tensors
    of that block are needed, whether or not they are tracked.
    """
    if unit_kind == "mlp_neuron":
        kinds, width = ("mlp.in", "mlp.out"), 1
    elif unit_kind == "attention_head":
        kinds, width = ("attn.q", "attn.k", "attn.v", "attn.o"), model.cfg.d_head
    else:
        raise ValueError(f"ablation of {unit_kind!r} units is not supported (mlp_neuron, attention_head)")
    span = slice(unit * width, (unit + 1) * width)
    found = []
    for kind in kinds:
        module = _module_at(model, f"blocks.{layer}.{kind}")
        axis = _UNITS[kind][1]
        if span.stop > (module.weight.shape[0] if axis == "row" else module.weight.shape[1]):
            raise ValueError(f"{unit_kind} {unit} is outside layer {layer}")
        found.append((module.weight, (span, slice(None)) if axis == "row" else (slice(None), span)))
        if axis == "row" and module.bias is not None:
            found.append((module.bias, (span,)))
    return found
