"""Every method in one place: its config schema, gate, aux losses, routing ids, stages and export
(docs/methods.md). Each module of this package is imported here, so a new method is one new file
whose `Method` subclass is decorated with `register_method`."""

import importlib
import pkgutil

from moelora.adapters.methods.base import (
    METHOD_REGISTRY,
    LayerParts,
    Method,
    get_method,
    inference_stage,
    method_config,
    method_names,
    method_of,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "METHOD_REGISTRY",
    "LayerParts",
    "Method",
    "get_method",
    "inference_stage",
    "method_config",
    "method_names",
    "method_of",
    "register_method",
]
