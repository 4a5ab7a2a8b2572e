"""`AdaptedModel`: the wrapper the trainer uses (routing, aux losses, stages, adapter state)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from moelora.adapters.attention import ROWS
from moelora.adapters.config import AdapterConfig
from moelora.adapters.inject import inject_adapters
from moelora.adapters.methods import method_config, method_of
from moelora.adapters.routing import Routing, RoutingState, attach_checkpointing


class AdaptedModel(nn.Module):
    """A causal LM with gated LoRA experts on its targeted Linears; only adapters train.

    Args:
        base: any HF causal LM; it is modified in place (Linears wrapped, parameters frozen).
        config: the `method` node (an AdapterConfig, or a dict/DictConfig validated into one).
        num_tasks: size of the task registry (task ids run 0..num_tasks-1); used by moelora.
        num_domains: number of domain experts; used by modula/modula_res.
    """

    def __init__(
        self, base: PreTrainedModel, config: AdapterConfig, num_tasks: int, num_domains: int = 1
    ) -> None:
        super().__init__()
        config = method_config(config)
        self.method = method_of(config)
        self.method.check_sizes(num_tasks, num_domains)
        self.config, self.num_tasks, self.num_domains = config, num_tasks, num_domains
        self.routing = Routing()
        base_params = {id(p) for p in base.parameters()}
        self.base_model = base
        self.task_gate = self.method.shared_gate(num_tasks)
        if self.task_gate is not None:
            self.task_gate.to(self.device)
        self.adapted_layers = inject_adapters(base, config, self.routing, num_tasks, num_domains)
        self._adapter_names = {n for n, p in self.named_parameters() if id(p) not in base_params}
        self.stage: str | None = None

    @property
    def varlen_attention(self) -> bool:
        """Whether the base attends packed rows apart by their position ids alone, in one
        flattened sequence (flash-attention, `moelora_rows`), rather than with a mask."""
        implementation = str(getattr(self.base_model.config, "_attn_implementation", ""))
        return "flash" in implementation or implementation == ROWS

    @property
    def device(self) -> torch.device:
        return self.base_model.get_input_embeddings().weight.device

    # -- forward and generation ------------------------------------------------------------
    def routing_state(
        self,
        task_ids: Tensor | None = None,
        domain_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        collect_aux: bool = False,
        labels: Tensor | None = None,
        segment_ids: Tensor | None = None,
    ) -> RoutingState:
        """The state the layers route by; the shared task gate is evaluated here, once (per
        row). The prompt is the real tokens without a label (all of them when generating). A
        packed batch's real tokens are those with a row (`segment_ids` >= 0)."""
        if task_ids is not None:
            task_ids = torch.as_tensor(task_ids, device=self.device).long()
        if domain_ids is not None:
            domain_ids = torch.as_tensor(domain_ids, device=self.device).long()
        if self.method.routes_by_task and task_ids is None:
            raise ValueError(
                f"{self.config.name} routes by task: pass task_ids (one registry id per row) to "
                f"forward and generate."
            )
        weights = self.task_gate.weights(task_ids) if self.task_gate is not None else None
        if segment_ids is not None:
            attention_mask = segment_ids >= 0
        mask = attention_mask.bool() if attention_mask is not None else None
        state = RoutingState(task_ids, domain_ids, mask, weights, collect_aux)
        state.segments = segment_ids
        if mask is not None or labels is not None:
            prompt = mask if mask is not None else torch.ones_like(labels, dtype=torch.bool)
            state.prompt_mask = prompt if labels is None else prompt & (labels == -100)
        return state

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        task_ids: Tensor | None = None,
        domain_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
        **kwargs,
    ) -> ModelOutput:
        """The base model's output, with `loss` = LM loss + weighted aux losses.

        A packed batch (`moelora.data.batching`) passes `segment_ids` (each token's row, -1 on
        padding) and `position_ids` restarting at every row, and no attention mask: transformers
        then attends within each row only, with a block-diagonal mask for sdpa and eager. Its
        flash-attention path does so only for one flattened sequence, so under flash-attention
        (and `moelora_rows`, `moelora.adapters.attention`) the packs are joined into one row
        without their padding (`_flattened`), which those attend row by row.

        Adds `lm_loss` (the plain LM loss), `aux_loss` (the weighted aux sum, with grad; for a
        trainer computing its own LM loss) and `aux_losses` (unweighted, detached, for logging;
        each averaged over layers). Aux losses are collected in training mode only.
        """
        if labels is not None or segment_ids is not None:  # a loss, not decoding: no KV cache
            kwargs.setdefault("use_cache", False)  # to build (and a cache turns packing off)
        if segment_ids is not None and self.varlen_attention:
            input_ids, labels, segment_ids, kwargs["position_ids"] = _flattened(
                segment_ids, input_ids, labels, segment_ids, kwargs["position_ids"]
            )
        state = self.routing_state(
            task_ids, domain_ids, attention_mask, self.training, labels, segment_ids
        )
        if self.training:
            attach_checkpointing(self.base_model, self.routing)
        with self.routing.bind(state):
            out = self.base_model(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
            )
        return self._with_aux_losses(out, state.aux_losses())

    def _with_aux_losses(self, out: ModelOutput, aux: dict[str, Tensor]) -> ModelOutput:
        """`lm_loss`, `aux_loss` (weighted sum), `aux_losses` (detached) and `loss` = both."""
        coef = self.method.aux_weights()
        weighted = [coef[name] * value for name, value in aux.items() if coef.get(name)]
        aux_loss = torch.stack(weighted).sum() if weighted else None
        out["lm_loss"] = out.loss
        out["aux_loss"] = aux_loss
        out["aux_losses"] = {name: value.detach() for name, value in aux.items()}
        if out.loss is not None and aux_loss is not None:
            out["loss"] = out.loss + aux_loss
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        task_ids: Tensor | None = None,
        domain_ids: Tensor | None = None,
        **generate_kwargs,
    ) -> Tensor:
        """`base_model.generate` with the rows' ids bound; beams/returned sequences are expanded."""
        with self.routing.bind(self.routing_state(task_ids, domain_ids, attention_mask)):
            return self.base_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs
            )

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None
    ) -> None:
        """Enable non-reentrant activation checkpointing with routing restored on recompute."""
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        attach_checkpointing(base, self.routing)

    def compile_layers(self, **options) -> list[str]:
        """`torch.compile` each repeated block of the base in place (the classes its
        `_no_split_modules` names, the decoder layers), adapters included: one graph serves
        every layer, names and state dict keys stay as they are. Returns the compiled classes.
        Methods whose routers record aux losses recompile per layer (`TrainConfig` refuses them).
        `options` go to `torch.compile` (e.g. backend).
        """
        blocks = set(getattr(self.base_model, "_no_split_modules", None) or [])
        compiled = set()
        for module in self.base_model.modules():
            if type(module).__name__ in blocks:
                module.compile(**options)
                compiled.add(type(module).__name__)
        if not compiled:
            raise ValueError(
                f"{type(self.base_model).__name__} names no repeated block to compile "
                "(_no_split_modules); set trainer.compile=false."
            )
        return sorted(compiled)

    # -- training stages and parameters ------------------------------------------------------
    def set_stage(self, stage: str | None, domains: Iterable[int] | None = None) -> None:
        """Select what trains (and, for staged methods, how gates route).

        None trains every adapter and gate. A named stage is the method's (modula: `universal`
        trains the universal expert alone; `domain` the domain experts, only `domains` when
        given, each row gated to its own domain; `router` only the routers); it also sets the
        gating, so `set_stage("domain")` with domain_ids forces one domain expert at inference.
        """
        names = self.method.stage_names
        if stage is not None and stage not in names:
            raise ValueError(
                f"stage={stage!r} is not available for {self.config.name}; it takes "
                f"{', '.join(map(str, [*names, None]))}."
            )
        self.stage = stage
        chosen = set(range(self.num_domains) if domains is None else domains)
        for _, param in self.named_adapter_parameters():
            param.requires_grad_(stage is None)
        if not names:
            return
        for layer in self.adapted_layers.values():
            for param in self.method.enter_stage(layer, stage, chosen):
                param.requires_grad_(True)

    def named_adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if n in self._adapter_names]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_adapter_parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # -- adapter state --------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Only adapter and gate tensors, keyed by their path in this wrapper."""
        return {name: param.detach() for name, param in self.named_adapter_parameters()}

    def load_adapter_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> list[str]:
        """Copy adapter tensors in; returns the adapter names left as they were.

        strict raises on missing, unexpected or mis-shaped names; otherwise tensors that do not
        fit are skipped (e.g. the router after `add_domains`, which is retrained anyway).
        """
        own = dict(self.named_adapter_parameters())
        missing = [n for n in own if n not in state]
        unexpected = [n for n in state if n not in own]
        misfit = [n for n in own if n in state and state[n].shape != own[n].shape]
        if strict and (missing or unexpected or misfit):
            raise ValueError(
                f"the adapter state does not fit this model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, wrong shape {misfit[:5]}; build the model with the same "
                "method config, num_tasks and num_domains, or load with strict=False."
            )
        with torch.no_grad():
            for name, param in own.items():
                if name in state and name not in misfit:
                    param.copy_(state[name])
        return missing + misfit


def _flattened(segment_ids: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """(packs, seq) tensors as one (1, real tokens) row: the packs joined, their padding
    dropped. Each row's first label is a prompt token's (-100), so no loss crosses rows."""
    real = segment_ids >= 0
    return tuple(tensor[real].unsqueeze(0) for tensor in tensors)
