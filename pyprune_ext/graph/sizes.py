"""Sizes a module writes into its own computation, kept true after pruning.

Some modules cut or reshape a layer's output at a size they hold as an
attribute: GPT-2's attention splits its packed q/k/v projection with
``self.c_attn(x).split(self.split_size, dim=2)``, torchvision's ViT reshapes its
patch embedding with ``x.reshape(n, self.hidden_dim, n_h * n_w)``. The traced
graph sees only the number, which pruning would make wrong, so the analysis
refuses such a split or view unless the size is *declared*: ``register_size_attribute(GPT2Attention,
"split_size", compute, child="c_attn")`` says that modules of that type cut
their ``c_attn`` child's output at ``split_size``, and that ``compute(module)``
gives its value from the (shrunk) layers. The analysis then prunes the pieces
alike (position i of every piece together), or lets the view follow the
channels, and ``remove_channels`` recomputes the attribute after shrinking the
layers.

Declarations for library classes are made by qualified name (``("transformers.
models.gpt2.modeling_gpt2", "GPT2Attention")``) and take effect once that
module has been imported, so this file imports no optional library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .._library import register_imported

__all__ = ["SizeAttribute", "register_size_attribute", "unregister_size_attribute", "size_attributes_of",
           "declared_size", "refresh_sizes"]


@dataclass(frozen=True)
class SizeAttribute:
    """``attribute`` of a module is a size it cuts its ``child``'s output at (the
    child is None for sizes that are refreshed only, not matched to a split);
    ``compute(module)`` is its value once the module's layers have been shrunk."""

    attribute: str
    compute: Callable[[nn.Module], int]
    child: str | None = None
    # refreshed only on modules that hold it: a library class that has it in some releases only
    present_only: bool = False


_REGISTRY: dict[type, list[SizeAttribute]] = {}


def _gpt2_attention_sizes() -> list[SizeAttribute]:
    # c_attn is a transformers Conv1D (weight: in x out) holding q, k and v side by side
    def split_size(module):
        return module.c_attn.weight.shape[1] // 3
    return [SizeAttribute("split_size", split_size, child="c_attn"),
            SizeAttribute("embed_dim", split_size),
            SizeAttribute("num_heads", lambda module: split_size(module) // module.head_dim)]


def _grouped_query_attention_sizes() -> list[SizeAttribute]:
    # Llama-like attention repeats K/V num_key_value_groups times (repeat_kv, or sdpa's enable_gqa
    # when it is > 1): pruning query heads within their KV groups (gqa="query") changes it
    def query_heads(module):
        return module.q_proj.out_features // module.head_dim

    def kv_heads(module):
        return module.k_proj.out_features // module.head_dim
    return [SizeAttribute("num_key_value_groups", lambda module: query_heads(module) // kv_heads(module)),
            SizeAttribute("num_heads", query_heads, present_only=True),
            SizeAttribute("num_key_value_heads", kv_heads, present_only=True)]


_LIBRARY: dict[tuple[str, str], Callable[[], list[SizeAttribute]]] = {
    ("transformers.models.gpt2.modeling_gpt2", "GPT2Attention"): _gpt2_attention_sizes,
    **{(f"transformers.models.{name}.modeling_{name}", f"{prefix}Attention"): _grouped_query_attention_sizes
       for name, prefix in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"))},
    # torchvision's ViT reshapes the patch embedding with x.reshape(n, self.hidden_dim, n_h * n_w)
    ("torchvision.models.vision_transformer", "VisionTransformer"):
        lambda: [SizeAttribute("hidden_dim", lambda module: module.conv_proj.out_channels, child="conv_proj")],
}


def register_size_attribute(module_type: type, attribute: str, compute: Callable[[nn.Module], int], *,
                            child: str | None = None, replace: bool = False) -> SizeAttribute:
    """Declares that modules of ``module_type`` hold the size ``attribute``
    (computed as ``compute(module)`` from their layers), cutting their ``child``
    module's output at it when ``child`` is given. ``replace=True`` replaces an
    earlier declaration of the same attribute."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_size_attribute: module_type must be an nn.Module class, got {module_type!r}")
    if not isinstance(attribute, str) or not attribute.isidentifier():
        raise ValueError(f"register_size_attribute: attribute must be an attribute name, got {attribute!r}")
    if not callable(compute):
        raise TypeError(f"register_size_attribute: compute must be a function of the module, got {compute!r}")
    declared = _REGISTRY.setdefault(module_type, [])
    if any(s.attribute == attribute for s in declared):
        if not replace:
            raise ValueError(f"register_size_attribute: {module_type.__name__}.{attribute} is already declared; "
                             "pass replace=True")
        declared[:] = [s for s in declared if s.attribute != attribute]
    size = SizeAttribute(attribute, compute, child)
    declared.append(size)
    return size


def unregister_size_attribute(module_type: type, attribute: str) -> SizeAttribute:
    """Removes a declaration (a built-in one too, once its library is imported); returns it."""
    if _LIBRARY:
        register_imported(_LIBRARY, _REGISTRY)
    declared = _REGISTRY.get(module_type, [])
    found = [s for s in declared if s.attribute == attribute]
    if not found:
        raise KeyError(f"unregister_size_attribute: no size {attribute!r} is declared for {module_type!r}")
    declared.remove(found[0])
    if not declared:
        del _REGISTRY[module_type]
    return found[0]


def size_attributes_of(module: nn.Module) -> list[SizeAttribute]:
    """The sizes declared for ``module``'s class (and its base classes)."""
    if _LIBRARY:
        register_imported(_LIBRARY, _REGISTRY)
    return [size for base in type(module).__mro__ for size in _REGISTRY.get(base, ())]


def declared_size(model: nn.Module, producer: str, size: int) -> str | None:
    """``"owner.attribute"`` when ``size`` (a split or view size written in the
    graph) is a declared size of the module owning ``producer`` (the module whose
    output is cut or reshaped, e.g. ``h.0.attn.c_attn``), else None."""
    owner_name, _, child = producer.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return None
    for declared in size_attributes_of(owner):
        if declared.child == child and getattr(owner, declared.attribute, None) == size:
            return f"{owner_name}.{declared.attribute}" if owner_name else declared.attribute
    return None


def refresh_sizes(model: nn.Module) -> None:
    """Recomputes every declared size from the layers (after ``remove_channels``)."""
    for module in model.modules():
        for declared in size_attributes_of(module):
            if declared.present_only and not hasattr(module, declared.attribute):
                continue
            setattr(module, declared.attribute, int(declared.compute(module)))
