"""Gates and aux losses: top-k routing, the Switch loss by hand, the experts' InfoNCE."""

import math

import pytest
import torch
import torch.nn.functional as F

from moelora.adapters import (
    ExpertContrastive,
    Routing,
    RoutingState,
    TaskGate,
    TopKRouter,
    contrastive_losses,
    importance_loss,
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
    x = torch.randn(3, 7, 16)
    with routing.bind(RoutingState()):
        g = router(x, routing)
    assert ((g > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(3, 7))
    # the definition: a softmax over the k largest logits, 0 elsewhere
    logits = router.proj(x)
    top, chosen = logits.topk(top_k, dim=-1)
    torch.testing.assert_close(g, torch.zeros_like(logits).scatter(-1, chosen, top.softmax(-1)))


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
    chosen = PROBS.topk(top_k, dim=-1).indices
    loss = load_balance_loss(PROBS, chosen, MASK)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_importance_loss_matches_hand_computation():
    # real tokens' probabilities sum to I = [1.45, 1.3, 0.25]: mean 1, variance
    # (0.45^2 + 0.3^2 + 0.75^2) / 3 = 0.285, so CV^2 = 0.285
    assert importance_loss(PROBS, MASK).item() == pytest.approx(0.285, rel=1e-5)
    uniform = torch.full((5, 3), 1 / 3)
    assert importance_loss(uniform).item() == pytest.approx(0.0, abs=1e-7)
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    assert importance_loss(collapsed).item() == pytest.approx(2.0, rel=1e-5)  # E - 1


def test_a_dense_router_records_the_importance_loss_with_a_gradient():
    """With top_k = E the Switch loss is the constant 1 (every expert gets every token); the
    router records the importance loss instead, and it moves the router's weights."""
    torch.manual_seed(0)
    router = TopKRouter(8, 3, top_k=3)
    x = torch.randn(2, 4, 8)
    state = RoutingState(collect_aux=True)
    routing = Routing()
    with routing.bind(state):
        router(x, routing)
    losses = state.aux_losses()
    assert set(losses) == {"importance"}
    loss = losses["importance"]
    probs = router.proj(x).softmax(-1)
    torch.testing.assert_close(loss, importance_loss(probs))
    switch = load_balance_loss(probs, probs.topk(3, dim=-1).indices)
    assert switch.item() == pytest.approx(1.0, rel=1e-6)  # the constant it replaces
    loss.backward()
    assert router.proj.weight.grad.abs().sum() > 0


def test_router_records_load_balance_on_real_tokens_only():
    router = TopKRouter(3, 3, 1)
    with torch.no_grad():  # logits = log(PROBS) for x = log(PROBS) with identity weights
        router.proj.weight.copy_(torch.eye(3))
        router.proj.bias.zero_()
    routing = Routing()
    state = RoutingState(token_mask=MASK.view(1, 4), collect_aux=True)
    with routing.bind(state):
        router(PROBS.log().view(1, 4, 3), routing)
    loss = state.aux_losses()["load_balance"]
    assert loss.item() == pytest.approx((2 * 1.45 + 1.3) / 3, rel=1e-5)


@pytest.mark.parametrize("top_k", [2, 4])
def test_routers_of_several_layers_record_the_mean_of_their_losses(top_k):
    """The balance losses are computed for all layers at once; the result is each layer's
    loss (the one-layer definition) averaged over the layers."""
    torch.manual_seed(0)
    routers = [TopKRouter(8, 4, top_k) for _ in range(3)]
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    routing = Routing()
    state = RoutingState(token_mask=mask, collect_aux=True)
    with routing.bind(state):
        for router in routers:
            router(x, routing)
    (name, got), *rest = state.aux_losses().items()
    assert not rest
    expected = []
    for router in routers:
        probs = router.proj(x).softmax(-1)
        if top_k == 4:
            expected.append(importance_loss(probs, mask))
        else:
            expected.append(load_balance_loss(probs, probs.topk(top_k, dim=-1).indices, mask))
    assert name == ("importance" if top_k == 4 else "load_balance")
    torch.testing.assert_close(got, torch.stack(expected).mean())


def expert_contrastive_loss(outputs, experts, tau):
    """The loss's definition in output space (the first implementation), the reference for
    the rank-space one: InfoNCE over L2-normalised outputs, positives share the expert."""
    z = F.normalize(outputs.float(), dim=-1)
    itself = torch.eye(len(z), dtype=torch.bool)
    sim = (z @ z.T / tau).masked_fill(itself, float("-inf"))
    log_prob = sim - sim.logsumexp(dim=1, keepdim=True)
    positive = (experts[:, None] == experts[None, :]) & ~itself
    count = positive.sum(1)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(1) / count.clamp(min=1)
    return per_anchor[count > 0].mean()


def routed_contrastive_loss(h, b, experts, tau):
    """One layer's loss through the batched computation."""
    return contrastive_losses(h[None], (b.T @ b)[None], experts[None], tau)[0]


def routed_pairs(num_pairs, num_experts, rank, d_out, seed=0):
    """Random (h, B_cat, experts) and the outputs o = B_e h they stand for."""
    torch.manual_seed(seed)
    h = torch.randn(num_pairs, rank, requires_grad=True)
    b = torch.randn(d_out, num_experts * rank, requires_grad=True)
    experts = torch.arange(num_pairs) % num_experts
    outputs = torch.einsum("mr,omr->mo", h, b.view(d_out, num_experts, rank)[:, experts])
    return h, b, experts, outputs


def test_contrastive_loss_is_positive_finite_and_differentiable():
    h, b, experts, outputs = routed_pairs(24, 4, 3, 16)
    loss = routed_contrastive_loss(h, b, experts, tau=0.1)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0
    torch.testing.assert_close(loss, expert_contrastive_loss(outputs, experts, 0.1))


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
    # B = 0 at init: every output is zero, similarities are uniform, loss = log(M - 1), and
    # the gradients are finite
    h = torch.randn(32, 4, requires_grad=True)
    b = torch.zeros(16, 16, requires_grad=True)
    loss = routed_contrastive_loss(h, b, experts, tau)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(31), rel=1e-5)
    assert torch.isfinite(h.grad).all() and torch.isfinite(b.grad).all()


def test_task_gate_is_a_softmax_and_averages_several_tasks():
    torch.manual_seed(0)
    gate = TaskGate(num_tasks=3, num_experts=4, embedding_dim=8)
    one = gate.weights(torch.tensor([0, 2]))
    torch.testing.assert_close(one.sum(-1), torch.ones(2))
    both = gate.weights(torch.tensor([[0, 2], [1, -1]]))
    mean = gate.embedding.weight[[0, 2]].mean(0)
    torch.testing.assert_close(both[0], gate.proj(mean).softmax(-1))
    torch.testing.assert_close(both[1], gate.weights(torch.tensor([1]))[0])


def contrastive_in_output_space(h, g, b, tokens, tau):
    """The first implementation, kept as the reference: every routed output o = B_e A_e x
    is formed in d_out and compared there."""
    num = g.shape[-1]
    rank = h.shape[-1] // num
    per_expert = torch.einsum(
        "ner,oer->neo", h[tokens].view(-1, num, rank), b.view(b.shape[0], num, rank)
    )
    token, expert = (g[tokens] > 0).nonzero(as_tuple=True)
    return expert_contrastive_loss(per_expert[token, expert], expert, tau)


@pytest.mark.parametrize("max_tokens", [5, 256])
def test_contrastive_in_rank_space_equals_the_output_space_loss_and_gradients(max_tokens):
    """Two layers record into one forward's state: the batched loss is the mean of each
    layer's loss in output space, on the same sampled tokens, with the same gradients."""
    torch.manual_seed(0)
    num, rank, d_out, tokens = 4, 3, 40, 30
    mask = torch.ones(2, tokens // 2, dtype=torch.bool)
    mask[1, -4:] = False  # padding: never sampled
    layers = []
    for _ in range(2):
        h = torch.randn(2, tokens // 2, num * rank, requires_grad=True)
        b = torch.randn(d_out, num * rank, requires_grad=True)
        x = torch.randn(2, tokens // 2, 8)
        routing = Routing()
        with routing.bind(RoutingState(token_mask=mask)):
            g = TopKRouter(8, num, 2)(x, routing).detach()
        layers.append((h, g, b, x))
    state = RoutingState(token_mask=mask, collect_aux=True)
    torch.manual_seed(1)
    for h, g, b, x in layers:
        rank_outputs = h.reshape(-1, num * rank).__getitem__
        ExpertContrastive(num, top_k=2, tau=0.1, max_tokens=max_tokens)(
            rank_outputs, g, b, state, x
        )
    fast = state.aux_losses()["contrastive"]
    inputs = [t for h, _, b, _ in layers for t in (h, b)]
    torch.manual_seed(1)  # the same sampled tokens, once for both layers
    real = torch.arange(tokens)[mask.reshape(-1)]
    sampled = real[torch.randperm(len(real))[:max_tokens]]
    reference = torch.stack(
        [
            contrastive_in_output_space(
                h.reshape(-1, num * rank), g.reshape(-1, num), b, sampled, 0.1
            )
            for h, g, b, _ in layers
        ]
    ).mean()
    torch.testing.assert_close(fast, reference)
    expected = torch.autograd.grad(reference, inputs)
    for got, want in zip(torch.autograd.grad(fast, inputs), expected, strict=True):
        torch.testing.assert_close(got, want)
