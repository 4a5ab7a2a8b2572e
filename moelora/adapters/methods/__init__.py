"""Every method in one place: its config schema, gate, aux losses, routing ids, stages and export
(docs/methods.md). Importing this package registers the built-in methods."""

from moelora.adapters.methods import contrastive, lora, modula, moelora, molora
from moelora.adapters.methods.base import (
    METHOD_REGISTRY,
    LayerParts,
    Method,
    get_method,
    method_names,
    method_of,
    names_where,
    register_method,
)

__all__ = [
    "METHOD_REGISTRY",
    "LayerParts",
    "Method",
    "contrastive",
    "get_method",
    "lora",
    "method_names",
    "method_of",
    "modula",
    "moelora",
    "molora",
    "names_where",
    "register_method",
]
