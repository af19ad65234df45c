"""Hugging Face ``transformers`` models after structured pruning.

Removing heads and MLP neurons shrinks the layers, but the model's config still
describes the old sizes, so ``save_pretrained`` / ``from_pretrained`` would
rebuild the unpruned shapes. :func:`update_config` writes the pruned sizes
back into the config (``hidden_size``, ``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``, with ``head_dim`` made explicit). A config holds one
size per model, so every layer must have been pruned alike: prune with
``TaylorPruner(..., uniform=True)``. Query heads pruned within their KV groups
(``gqa="query"``) change ``num_attention_heads`` only: the KV heads are kept, and
the attention's ``num_key_value_groups`` is recomputed on removal (a size declared in
:mod:`pyprune_ext.graph.sizes`). BERT and GPT-2 configs have no ``head_dim``
(they derive it from ``hidden_size / num_attention_heads``): for them only the
MLP size can change, and pruned heads are refused by name.

Which layers hold those sizes depends on the architecture: ``ARCHITECTURES``
maps a config's ``model_type`` to a :class:`Layout`; :func:`register_architecture`
adds one. This module does not import ``transformers``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

__all__ = ["Layout", "ARCHITECTURES", "register_architecture", "update_config"]


@dataclass(frozen=True)
class Layout:
    """Where one decoder/encoder layer keeps its sizes, as module paths relative to
    the layer, and which config fields hold them.

    ``query``: the projection whose output features are heads x head_dim (times
    ``packed`` when it also holds the keys and values, GPT-2's ``c_attn``);
    ``key``: the key projection (its heads are the key/value heads), or None
    without grouped-query attention; ``mlp``: the projection whose output features
    are the intermediate size, written to ``mlp_field``. ``head_dim_field``: the
    config field holding head_dim, or None where the architecture derives it as
    hidden_size / num_attention_heads (BERT, GPT-2): such a config can describe a
    pruned MLP, but not pruned heads or a pruned hidden size."""

    query: str
    key: str | None
    mlp: str
    mlp_field: str = "intermediate_size"
    head_dim_field: str | None = "head_dim"
    packed: int = 1


_LLAMA_LIKE = Layout(query="self_attn.q_proj", key="self_attn.k_proj", mlp="mlp.up_proj")
ARCHITECTURES: dict[str, Layout] = {
    **{name: _LLAMA_LIKE for name in ("llama", "mistral", "qwen2", "qwen3")},
    "bert": Layout(query="attention.self.query", key=None, mlp="intermediate.dense", head_dim_field=None),
    "gpt2": Layout(query="attn.c_attn", key=None, mlp="mlp.c_fc", mlp_field="n_inner", head_dim_field=None,
                   packed=3),
}


def _out_features(module: nn.Module) -> int:
    """Output features of a Linear, or of a transformers Conv1D (weight: in x out)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.weight.shape[1]


def register_architecture(model_type: str, layout: Layout, *, replace: bool = False) -> None:
    """Declares where layers of ``model_type`` (a config's ``model_type``) keep their sizes."""
    if not isinstance(layout, Layout):
        raise TypeError(f"register_architecture: expected a Layout, got {type(layout).__name__}")
    if model_type in ARCHITECTURES and not replace:
        raise ValueError(f"register_architecture: '{model_type}' is already registered; pass replace=True")
    ARCHITECTURES[model_type] = layout


def _per_layer(model: nn.Module, path: str, what) -> dict[str, int]:
    """layer prefix -> what(module) for every module named ``<layer>.<path>``, where
    ``<layer>`` ends with a block number."""
    found = {}
    for name, module in model.named_modules():
        if name.endswith("." + path):
            prefix = name[: -len(path) - 1]
            if re.search(r"\.\d+$", prefix):
                found[prefix] = what(module)
    return found


def _one_value(counts: dict[str, int], what: str) -> int:
    values = sorted(set(counts.values()))
    if not values:
        raise ValueError(f"update_config: found no {what} in the model")
    if len(values) > 1:
        listing = ", ".join(f"{layer}: {n}" for layer, n in counts.items())
        raise ValueError(f"update_config: the layers have different {what} ({listing}); a config holds one "
                         "value: prune with TaylorPruner(..., uniform=True), or save with torch.save")
    return values[0]


def update_config(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Writes the pruned model's sizes into ``model.config``; returns
    ``{field: (old, new)}`` for the fields that changed. Raises ValueError for an
    unregistered architecture or layers of different sizes."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"update_config: no layout for model_type {model_type!r} (known: {known}); "
                         "add one with pyprune_ext.hf.register_architecture")
    layout = ARCHITECTURES[model_type]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = _one_value(_per_layer(model, layout.query, lambda m: _out_features(m) // layout.packed // head_dim),
                       "query head counts")
    hidden = _one_value(_per_layer(model, layout.mlp, _out_features), "MLP sizes")
    new = {"hidden_size": model.get_input_embeddings().embedding_dim, "num_attention_heads": heads,
           layout.mlp_field: hidden}
    if layout.key is not None:
        new["num_key_value_heads"] = _one_value(_per_layer(model, layout.key, lambda m: _out_features(m) // head_dim),
                                                "key/value head counts")
    if layout.head_dim_field is not None:
        new = {**new, layout.head_dim_field: head_dim}
    elif new["hidden_size"] != heads * head_dim:
        raise ValueError(f"update_config: a {model_type} config has no head_dim: it derives it as hidden_size / "
                         f"num_attention_heads, which would be {new['hidden_size']} / {heads}, not the model's "
                         f"{head_dim}; pruned heads or a pruned hidden size cannot be described. Prune only the MLP "
                         "neurons to save with save_pretrained, or save the model with torch.save")
    changed = {}
    for field, value in new.items():
        old = getattr(config, field, None)
        if old != value:
            changed[field] = (old, value)
            setattr(config, field, value)
    _validate(config, changed)
    return changed


def _validate(config, changed: dict[str, tuple[int, int]]) -> None:
    """The config's own checks (recent transformers validate on save and load);
    on failure the config is left as it was."""
    validate = getattr(config, "validate_architecture", None)
    if validate is None:
        return
    try:
        validate()
    except Exception as error:  # noqa: BLE001 - whatever the library raises, undo and explain
        for field, (old, _) in changed.items():
            setattr(config, field, old)
        raise ValueError(f"update_config: transformers refuses the pruned sizes ({error}); prune to sizes its "
                         f"config accepts (e.g. a head count that divides hidden_size = {config.hidden_size}), "
                         "or save the model with torch.save") from error
