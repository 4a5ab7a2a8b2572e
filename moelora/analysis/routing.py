"""What the gates do: mean gate weight per task and expert, selection shares, balance, entropy,
and how alike the experts' outputs are (the contrastive loss is meant to push them apart).

One teacher-forced pass over the eval rows with a hook on every adapted layer's gate. Each
token of each row counts once per layer (padding left out); a row-level gate (moelora's task
gate) counts for every token of its row. Layers are grouped by depth (first, middle and last
third of the blocks) besides the average over all of them. For the balance and the entropy a
token's gate weights are normalised to sum to 1 (modula_res keeps its universal expert at
weight 1 beside the router's distribution).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from moelora import atomic
from moelora.data.batching import batches_on
from moelora.log import get_logger

log = get_logger(__name__)

# An expert taking at least this share of all the (normalised) weight has collapsed the gate.
COLLAPSE_SHARE = 0.9


@dataclass
class LayerGroupSums:
    """Running sums for one group of layers: per task, the gate weights and the token count;
    per expert, how often it was selected (weight > 0)."""

    weight: dict[str, Tensor] = field(default_factory=dict)  # task -> (E,) summed weights
    tokens: dict[str, int] = field(default_factory=dict)  # task -> tokens x layers
    selected: Tensor | None = None  # (E,) selections over every task
    normalised: Tensor | None = None  # (E,) summed normalised weights
    entropy: float = 0.0  # summed per-token entropy of the normalised weights
    count: int = 0  # tokens x layers
    similarity: float = 0.0  # summed per-token mean pairwise cosine of the experts' outputs
    similarity_count: int = 0  # tokens x layers

    def add(self, tasks: list[str], g: Tensor, mask: Tensor) -> None:
        """g: (batch, seq, E) gate weights, mask: (batch, seq) real tokens."""
        g = g.float() * mask.unsqueeze(-1)
        for row, task in enumerate(tasks):
            total = self.weight.get(task, torch.zeros(g.shape[-1]))
            self.weight[task] = total + g[row].sum(0)
            self.tokens[task] = self.tokens.get(task, 0) + int(mask[row].sum())
        real = g[mask.bool()]  # (tokens, E)
        p = real / real.sum(-1, keepdim=True).clamp_min(1e-12)
        selected = (real > 0).float().sum(0)
        self.selected = selected if self.selected is None else self.selected + selected
        summed = p.sum(0)
        self.normalised = summed if self.normalised is None else self.normalised + summed
        self.entropy += float(-(p * p.clamp_min(1e-12).log()).sum())
        self.count += real.shape[0]

    def add_similarity(self, cosine: Tensor) -> None:
        """cosine: (tokens, E, E) of the experts' outputs on the same real tokens."""
        experts = cosine.shape[-1]
        off_diagonal = cosine.sum((1, 2)) - cosine.diagonal(dim1=1, dim2=2).sum(-1)
        self.similarity += float(off_diagonal.sum()) / (experts * (experts - 1))
        self.similarity_count += cosine.shape[0]

    def result(self) -> dict:
        tasks = sorted(self.weight)
        experts = self.normalised.numel()
        share = self.normalised / max(self.count, 1)
        selected = self.selected / self.selected.sum().clamp_min(1e-12)
        return {
            "mean_weight": {t: (self.weight[t] / max(self.tokens[t], 1)).tolist() for t in tasks},
            "weight_share": share.tolist(),
            "selection_share": selected.tolist(),
            "load_balance_cv2": float(share.var(unbiased=False) / share.mean().pow(2)),
            "entropy": self.entropy / max(self.count, 1),
            "entropy_max": math.log(experts),
            "expert_similarity": self.similarity / max(self.similarity_count, 1),
        }


def depth_groups(paths: list[str]) -> dict[str, str]:
    """Layer path -> "first"/"middle"/"last" third of the blocks (by the `.layers.<i>.` index);
    "all" when the paths carry no block index or there are fewer than three blocks."""
    index = {p: int(m.group(1)) for p in paths if (m := re.search(r"\.layers\.(\d+)\.", p))}
    blocks = sorted(set(index.values()))
    if len(index) < len(paths) or len(blocks) < 3:
        return dict.fromkeys(paths, "all")
    names = ("first", "middle", "last")
    third = {b: names[min(3 * i // len(blocks), 2)] for i, b in enumerate(blocks)}
    return {p: third[index[p]] for p in paths}


@torch.no_grad()
def expert_cosines(layer, x: Tensor) -> Tensor:
    """(tokens, E, E): cosine similarity of the experts' outputs o_e = B_e A_e x on each token
    of x (tokens, d_in), whether the gate chose them or not. In rank space: with u_e = A_e x in
    expert e's slots of the R ranks, o_e . o_f = u_e^T (B^T B) u_f."""
    a, b = layer.stacked()
    h = x.to(a.dtype) @ a.T  # (tokens, R)
    slots = torch.nn.functional.one_hot(layer.expert_of_rank, layer.num_experts).T.to(h.dtype)
    u = h[:, None, :] * slots  # (tokens, E, R)
    projected = u @ (b.T @ b)
    dots = projected @ u.transpose(1, 2)  # (tokens, E, E)
    norms = dots.diagonal(dim1=1, dim2=2).clamp_min(1e-24).sqrt()
    return (dots / (norms[:, :, None] * norms[:, None, :])).float().cpu()


def expand_gate(g: Tensor, batch: int, seq: int) -> Tensor:
    """A gate's output (E,), (batch, 1, E) or (batch, seq, E) as (batch, seq, E)."""
    if g.dim() == 1:
        g = g.view(1, 1, -1)
    return g.expand(batch, seq, g.shape[-1])


class RoutingRecorder:
    """Forward hooks that add every full-sequence forward's gate weights and expert similarities
    to the sums of each layer group (all layers, and by depth), per task of the batch's rows."""

    def __init__(self, layers: dict[str, torch.nn.Module], task_names: list[str]) -> None:
        self.group_of = depth_groups(list(layers))
        names = ["all", *dict.fromkeys(self.group_of.values())]
        self.groups = {name: LayerGroupSums() for name in names}
        self.task_names, self.tasks, self.mask = task_names, [], torch.zeros(0, 0)
        self.handles = [lay.gate.register_forward_hook(self._gate(p)) for p, lay in layers.items()]
        self.handles += [lay.register_forward_hook(self._layer(p)) for p, lay in layers.items()]

    def see(self, batch: dict) -> None:
        """The rows of the batch about to run forward."""
        self.tasks = [self.task_names[int(t)] for t in batch["task_ids"]]
        self.mask = batch["attention_mask"].cpu()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _gate(self, path: str):
        def record(module, args, g: Tensor) -> None:
            batch, seq = self.mask.shape
            if g.dim() == 3 and g.shape[1] not in (1, seq):  # not a full-sequence forward
                return
            for name in {"all", self.group_of[path]}:
                self.groups[name].add(self.tasks, expand_gate(g, batch, seq), self.mask)

        return record

    def _layer(self, path: str):
        def record(module, args, output) -> None:
            x = args[0]
            if x.shape[:-1] != self.mask.shape:  # not a full-sequence forward
                return
            cosine = expert_cosines(module, x[self.mask.to(x.device).bool()])
            for name in {"all", self.group_of[path]}:
                self.groups[name].add_similarity(cosine)

        return record


@torch.no_grad()
def collect_routing(model, batches, task_names: list[str]) -> dict | None:
    """Routing statistics of `model` (an AdaptedModel) over `batches` (loss_loader batches on
    the model's device); None when its layers have a single expert (nothing is routed)."""
    experts = max(layer.num_experts for layer in model.adapted_layers.values())
    if experts < 2:
        return None
    layers = {p: lay for p, lay in model.adapted_layers.items() if lay.num_experts == experts}
    recorder, was_training = RoutingRecorder(layers, task_names), model.training
    model.eval()
    try:
        for batch in batches:
            recorder.see(batch)
            model(**batch)
    finally:
        recorder.remove()
        model.train(was_training)
    groups = recorder.groups
    if not groups["all"].count:
        return None
    report = {"experts": experts, "layers": len(layers)}
    report["groups"] = {name: sums.result() for name, sums in groups.items() if sums.count}
    report["warnings"] = routing_warnings(report["groups"]["all"])
    return report


def routing_warnings(stats: dict) -> list[str]:
    """A collapsed gate (one expert takes nearly all the weight) or an expert never chosen."""
    warnings = []
    share = stats["weight_share"]
    top = max(range(len(share)), key=share.__getitem__)
    if share[top] >= COLLAPSE_SHARE:
        warnings.append(
            f"routing collapsed: expert {top} takes {share[top]:.0%} of the gate weight over "
            f"all tokens and layers"
        )
    never = [e for e, s in enumerate(stats["selection_share"]) if s == 0]
    if never:
        warnings.append(f"experts {never} were never chosen for any token")
    return warnings


ROUTING_FILES = ("routing.json", "routing.png")


def write_routing(
    model, rows, batch_size: int, task_names: list[str], out_dir: Path, title: str, main: bool
) -> dict[str, str]:
    """routing.json and routing.png for the eval rows `rows` (every process runs the pass, as
    ZeRO-3 needs; the main process writes); returns the report's figure link, if any."""
    pad_id = model.base_model.config.pad_token_id or 0
    batches = batches_on(rows, batch_size, pad_id, next(model.parameters()).device)
    report = collect_routing(model, batches, task_names)
    if report is None or not main:
        return {}
    from moelora.analysis.plots import plot_routing

    atomic.write_json(out_dir / "routing.json", report)
    plot_routing(report, out_dir / "routing.png", title)
    for warning in report["warnings"]:
        log.warning(warning)
    return {"routing: mean gate weight per task and expert": "routing.png"}
