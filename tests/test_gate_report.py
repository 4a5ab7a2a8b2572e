"""routing.json's numbers against gate weights computed directly, the collapse warning on a gate
forced to one expert, and the routing report of a trained run."""

from __future__ import annotations

import math

import pytest
import torch

from moelora.analysis.routing import collect_routing, depth_groups, routing_warnings
from tests.adapters.adapter_cases import NUM_TASKS, adapted, batch

TASKS = ["alpha", "beta", "gamma"]


def test_task_gate_weights_per_task_equal_the_gate_computed_directly() -> None:
    model = adapted("moelora_layer_gate")
    inputs = batch(rows=6, length=5)
    report = collect_routing(model, [inputs], TASKS)
    layers = list(model.adapted_layers.values())
    assert report["experts"] == 4 and report["layers"] == len(layers)
    stats = report["groups"]["all"]
    for task_id, task in enumerate(TASKS):
        # Each layer's own task gate, averaged over the layers (every layer sees the same tokens).
        direct = torch.stack([layer.gate.weights(torch.tensor([task_id]))[0] for layer in layers])
        assert stats["mean_weight"][task] == pytest.approx(direct.mean(0).tolist(), abs=1e-6)
    # Token-weighted over rows: row r has task r % 3, and rows after the first have 2 pads.
    tokens = inputs["attention_mask"].sum(1).tolist()
    per_task = {
        t: sum(n for r, n in enumerate(tokens) if r % NUM_TASKS == i) for i, t in enumerate(TASKS)
    }
    share = sum(torch.tensor(stats["mean_weight"][t]) * n for t, n in per_task.items())
    assert stats["weight_share"] == pytest.approx((share / sum(tokens)).tolist(), abs=1e-6)
    p = torch.tensor(stats["weight_share"])
    assert stats["load_balance_cv2"] == pytest.approx(float(p.var(unbiased=False) / p.mean() ** 2))
    assert 0 < stats["entropy"] <= stats["entropy_max"] == pytest.approx(math.log(4))
    assert report["warnings"] == []


def test_a_gate_forced_to_one_expert_is_reported_as_collapsed() -> None:
    model = adapted("molora")
    with torch.no_grad():
        for layer in model.adapted_layers.values():
            if layer.num_experts > 1:
                layer.gate.proj.weight.zero_()
                layer.gate.proj.bias.copy_(torch.tensor([12.0, 0.0, -1.0, -1.0]))
    report = collect_routing(model, [batch(rows=3)], TASKS)
    stats = report["groups"]["all"]
    assert stats["selection_share"] == pytest.approx([0.5, 0.5, 0.0, 0.0])  # top-2: 0 and 1
    assert stats["weight_share"][0] == pytest.approx(1 / (1 + math.exp(-12)), abs=1e-5)
    assert report["warnings"] == [
        "routing collapsed: expert 0 takes 100% of the gate weight over all tokens and layers",
        "experts [2, 3] were never chosen for any token",
    ]


def test_a_balanced_gate_gives_no_warning() -> None:
    stats = {"weight_share": [0.3, 0.2, 0.25, 0.25], "selection_share": [0.25] * 4}
    assert routing_warnings(stats) == []


def test_a_single_expert_has_nothing_to_route() -> None:
    assert collect_routing(adapted("lora"), [batch()], TASKS) is None


def test_layers_are_grouped_by_depth_thirds() -> None:
    paths = [f"model.layers.{i}.mlp.up_proj" for i in range(6)]
    assert list(depth_groups(paths).values()) == ["first"] * 2 + ["middle"] * 2 + ["last"] * 2
    assert set(depth_groups(paths[:2]).values()) == {"all"}


def test_expert_similarity_equals_the_cosines_of_outputs_computed_directly() -> None:
    """The mean pairwise cosine of the experts' outputs B_e A_e x on the same real tokens, over
    tokens and layers, against the outputs formed expert by expert."""
    model = adapted("moelora_layer_gate")
    inputs = batch(rows=3, length=5)
    inputs_seen: dict[str, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(
            lambda module, args, out, path=path: inputs_seen.__setitem__(path, args[0])
        )
        for path, layer in model.adapted_layers.items()
    ]
    report = collect_routing(model, [inputs], TASKS)
    for handle in handles:
        handle.remove()
    mask = inputs["attention_mask"].bool()
    per_layer = []
    for path, layer in model.adapted_layers.items():
        x = inputs_seen[path][mask]
        a, b = layer.stacked()
        r = layer.ranks[0]
        outputs = torch.stack(
            [x @ a[e * r : (e + 1) * r].T @ b[:, e * r : (e + 1) * r].T for e in range(4)], 1
        )
        z = torch.nn.functional.normalize(outputs, dim=-1)
        cosine = z @ z.transpose(1, 2)  # (tokens, 4, 4)
        per_layer.append((cosine.sum((1, 2)) - 4).mean() / 12)
    expected = float(torch.stack(per_layer).mean())
    assert report["groups"]["all"]["expert_similarity"] == pytest.approx(expected, abs=1e-5)
