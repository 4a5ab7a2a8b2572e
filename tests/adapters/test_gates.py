"""Gates and aux losses: top-k routing, the Switch loss by hand, the experts' InfoNCE."""

import math

import pytest
import torch

from moelora.adapters import (
    Routing,
    RoutingState,
    TaskGate,
    TopKRouter,
    expert_contrastive_loss,
    load_balance_loss,
)

# Router probabilities of four tokens over three experts; the last token is padding.
PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.15, 0.8, 0.05], [0.1, 0.1, 0.8]])
MASK = torch.tensor([True, True, True, False])


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_router_sends_each_token_to_exactly_k_experts(top_k):
    torch.manual_seed(0)
    router = TopKRouter(16, 4, top_k)
    routing = Routing()
    with routing.bind(RoutingState()):
        g = router(torch.randn(3, 7, 16), routing)
    assert ((g > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(3, 7))


@pytest.mark.parametrize(
    ("top_k", "expected"),
    [
        # f = [2/3, 1/3, 0], P = [1.45, 1.3, 0.25] / 3: L = 3 * (2/3 * 1.45/3 + 1/3 * 1.3/3)
        (1, (2 * 1.45 + 1.3) / 3),
        # slots: expert 0 and 1 get 3 of 6 each: L = 3 * (1/2 * 1.45/3 + 1/2 * 1.3/3)
        (2, (1.45 + 1.3) / 2),
    ],
)
def test_load_balance_loss_matches_hand_computation(top_k, expected):
    logits = PROBS.log()
    chosen = logits.topk(top_k, dim=-1).indices
    loss = load_balance_loss(logits, chosen, MASK)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_router_records_load_balance_on_real_tokens_only():
    router = TopKRouter(3, 3, 1)
    with torch.no_grad():  # logits = log(PROBS) for x = log(PROBS) with identity weights
        router.proj.weight.copy_(torch.eye(3))
        router.proj.bias.zero_()
    routing = Routing()
    state = RoutingState(token_mask=MASK.view(1, 4), collect_aux=True)
    with routing.bind(state):
        router(PROBS.log().view(1, 4, 3), routing)
    (loss,) = state.aux["load_balance"]
    assert loss.item() == pytest.approx((2 * 1.45 + 1.3) / 3, rel=1e-5)


def test_contrastive_loss_is_positive_finite_and_differentiable():
    torch.manual_seed(0)
    outputs = torch.randn(24, 16, requires_grad=True)
    experts = torch.arange(24) % 4
    loss = expert_contrastive_loss(outputs, experts, tau=0.1)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(outputs.grad).all() and outputs.grad.abs().sum() > 0


def test_contrastive_loss_is_lower_when_experts_are_distinct():
    torch.manual_seed(0)
    experts = torch.arange(32) % 4
    centers = torch.randn(4, 16) * 3
    distinct = centers[experts] + 0.1 * torch.randn(32, 16)
    mixed = torch.randn(32, 16)
    tau = 0.1
    assert expert_contrastive_loss(distinct, experts, tau) < expert_contrastive_loss(
        mixed, experts, tau
    )
    # all outputs zero (B = 0 at init): uniform similarities, loss = log(M - 1) with zero grads
    zero = torch.zeros(32, 16, requires_grad=True)
    loss = expert_contrastive_loss(zero, experts, tau)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(31), rel=1e-5)
    assert torch.isfinite(zero.grad).all()


def test_task_gate_is_a_softmax_and_averages_several_tasks():
    torch.manual_seed(0)
    gate = TaskGate(num_tasks=3, num_experts=4, embedding_dim=8)
    one = gate.weights(torch.tensor([0, 2]))
    torch.testing.assert_close(one.sum(-1), torch.ones(2))
    both = gate.weights(torch.tensor([[0, 2], [1, -1]]))
    mean = gate.embedding.weight[[0, 2]].mean(0)
    torch.testing.assert_close(both[0], gate.proj(mean).softmax(-1))
    torch.testing.assert_close(both[1], gate.weights(torch.tensor([1]))[0])
