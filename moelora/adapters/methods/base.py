"""The method contract and the registry: what the rest of moelora may ask about a method.

A method is a `Method` subclass with its config schema; `register_method` makes it available by
name to configs (`method=<name>`), training, saving, loading, scoring and export. Nothing outside
`moelora/adapters/methods/` compares method names: it asks the method object instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import ClassVar

from torch import nn

from moelora.adapters.config import AdapterConfig, fail
from moelora.errors import UserError


@dataclass
class LayerParts:
    """What `GatedLoRALinear` needs from a method for one targeted Linear."""

    ranks: list[int]  # r_e per expert
    scales: list[float]  # s_e per expert
    gate: nn.Module  # (x, routing) -> g over the experts
    group_sizes: list[int] | None = None  # experts per parameter group (stages freeze groups)
    contrastive: nn.Module | None = None  # an aux loss on the experts' outputs
    gather: bool = False  # a per-token gate computes only its chosen experts' ranks


class Method:
    """One fine-tuning method. Subclasses set the class attributes and `layer_parts`.

    Attributes:
        name: what `method.name` (and `method=<name>`) says.
        config_class: its schema, with only its own fields.
        routes_by_task: the gate reads each row's task id, in training and at inference.
        uses_domains: experts belong to domains (task -> domain, `data.domains`).
        aux_losses: aux loss name (as the gates record it) -> config field that weighs it.
        export_per: what a static gate is fixed by for export and merging: "model" (one
            adapter), "task", "domain"; None when it routes per token and cannot be folded.
        stage_names: the training stages it knows; `stages()` says which a run trains.
        forced_stage: the stage that gates each row by its own domain (`eval.force_domain`).
    """

    name: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]]
    routes_by_task: ClassVar[bool] = False
    uses_domains: ClassVar[bool] = False
    aux_losses: ClassVar[dict[str, str]] = {}
    export_per: ClassVar[str | None] = "model"
    stage_names: ClassVar[tuple[str, ...]] = ()
    forced_stage: ClassVar[str | None] = None

    def __init__(self, config: AdapterConfig) -> None:
        self.config = config

    def layer_parts(self, d_in: int, num_tasks: int, num_domains: int) -> LayerParts:
        """The experts and gate around one targeted Linear of input width `d_in`."""
        raise NotImplementedError

    def shared_gate(self, num_tasks: int) -> nn.Module | None:
        """A gate evaluated once per forward for every layer (moelora's shared task gate); it
        must have `weights(task_ids) -> (batch, E)`."""
        return None

    def check_sizes(self, num_tasks: int, num_domains: int) -> None:
        """Refuse a registry the method cannot work with."""
        if self.routes_by_task and num_tasks < 1:
            raise ValueError(f"{self.name} needs a task registry: num_tasks must be at least 1.")
        if self.uses_domains and num_domains < 1:
            raise ValueError(f"{self.name} needs domains: num_domains must be at least 1.")

    def stages(self) -> list[str | None]:
        """The training stages of a run, in order; one unnamed stage for most methods."""
        return [None]

    def added_domains(self) -> list[str]:
        """Domains this run adds to an earlier run's adapter (only their experts train)."""
        return []

    def stage_rows(self, stage: str | None) -> str:
        """Which training rows a stage draws, one of `moelora.data.mixture.STAGE_ROWS`:
        "mixture" (data.mixture as configured), "added_domains" (that mixture over the added
        domains' tasks only), "balanced_domains" (every domain equally often)."""
        return "mixture"

    def aux_weights(self) -> dict[str, float]:
        """Aux loss name -> its weight in the loss."""
        return {loss: getattr(self.config, key) for loss, key in self.aux_losses.items()}

    def enter_stage(self, layer: nn.Module, stage: str | None, domains: set[int]) -> list:
        """Set the layer's gating for a named `stage` (or None: every adapter trains, as routed)
        and return the parameters that train in a named stage beyond none."""
        return []


METHOD_REGISTRY: dict[str, type[Method]] = {}


def register_method(method: type[Method]) -> type[Method]:
    """Make a method available by its name (usable as a class decorator). A new method's Hydra
    schema is stored as `method_schema/<name>` by `moelora.config.register_configs`."""
    known = METHOD_REGISTRY.get(method.name)
    if known is not None and known is not method:
        raise ValueError(f"a method named {method.name!r} is already registered ({known}).")
    if method.config_class.__dataclass_fields__["name"].default != method.name:
        raise ValueError(f"{method.config_class.__name__}.name must default to {method.name!r}.")
    METHOD_REGISTRY[method.name] = method
    return method


def method_names() -> list[str]:
    """The registered methods, sorted."""
    return sorted(METHOD_REGISTRY)


def get_method(name: str) -> type[Method]:
    if name not in METHOD_REGISTRY:
        fail(f"name={name!r} is unknown; use one of {', '.join(METHOD_REGISTRY)}.")
    return METHOD_REGISTRY[name]


def inference_stage(method: str, force_domain: bool) -> str | None:
    """The adapter stage to score with: as trained (None), or with `eval.force_domain` the
    method's stage that gates each row by its own domain expert (MoDULA's `domain`)."""
    if not force_domain:
        return None
    stage = get_method(method).forced_stage
    if stage is None:
        having = [m for m in method_names() if get_method(m).forced_stage is not None]
        raise UserError(
            f"eval.force_domain=true is for {', '.join(having)} (methods with domain experts), "
            f"not {method}; remove it."
        )
    return stage


def method_config(config: AdapterConfig | Mapping, strict: bool = True) -> AdapterConfig:
    """The method's own config from itself, a plain dict, or Hydra's DictConfig `method` node,
    chosen by its `name`. `strict=False` drops fields the method does not have (an adapter saved
    before each method had its own schema)."""
    if isinstance(config, AdapterConfig):
        return config
    if not isinstance(config, dict):
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(config, resolve=True)
    config = {k: v for k, v in config.items() if k != "defaults"}
    schema = get_method(str(config.get("name", ""))).config_class
    own = {f.name for f in fields(schema)}
    unknown = sorted(set(config) - own)
    if unknown and strict:
        one = len(unknown) == 1
        fail(
            f"{', '.join(unknown)} {'is' if one else 'are'} not a setting of {config['name']}; "
            f"remove {'it' if one else 'them'} (its settings: {', '.join(sorted(own))})."
        )
    return schema(**{k: v for k, v in config.items() if k in own})


def method_of(config: AdapterConfig) -> Method:
    """The method object for a config, whose schema must be the method's own."""
    method = get_method(config.name)
    if type(config) is not method.config_class:
        fail(
            f"name={config.name!r} belongs to {method.config_class.__name__}, "
            f"not {type(config).__name__}."
        )
    return method(config)
