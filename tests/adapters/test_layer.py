"""The fused layer against a per-expert loop, against PEFT's LoRA, and against itself (E=1)."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

from moelora.adapters import (
    AdaptedModel,
    Routing,
    RoutingState,
    TaskGate,
    build_layer,
)
from tests.adapters.adapter_cases import (
    ATTENTION,
    CASES,
    MLP,
    NUM_DOMAINS,
    NUM_TASKS,
    adapted,
    batch,
    make_config,
    tiny_gpt2,
    tiny_llama,
)

D_IN, D_OUT = 16, 12


def loop_reference(layer, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """W x + sum_e g_e s_e B_e A_e x, one expert at a time."""
    g = layer.gate(x, routing).expand(*x.shape[:-1], layer.num_experts)
    a, b = layer.stacked()
    out, start = layer.base_layer(x), 0
    for e, r in enumerate(layer.ranks):
        a_e, b_e = a[start : start + r], b[:, start : start + r]
        out = out + g[..., e : e + 1] * layer.expert_scale[e] * (x @ a_e.T @ b_e.T)
        start += r
    return out


def gate_setups():
    for case in CASES:
        stages = [None]
        if case.startswith("modula"):
            stages = ["universal", "domain", None]
        for stage in stages:
            yield pytest.param(case, stage, nn.Linear, {}, id=f"{case}-{stage}")
    yield pytest.param("lora", None, Conv1D, {}, id="lora-conv1d")
    yield pytest.param("molora", None, Conv1D, {}, id="molora-conv1d")
    gather = {"expert_compute": "gather", "num_experts": 8}
    yield pytest.param("molora", None, nn.Linear, gather, id="molora-gather")
    yield pytest.param("molora", None, Conv1D, gather, id="molora-gather-conv1d")
    yield pytest.param("contrastive", None, nn.Linear, gather, id="contrastive-gather")


def make_base(kind) -> nn.Module:
    return nn.Linear(D_IN, D_OUT) if kind is nn.Linear else Conv1D(D_OUT, D_IN)


@pytest.mark.parametrize(("case", "stage", "kind", "extra"), list(gate_setups()))
def test_fused_equals_per_expert_loop(case, stage, kind, extra):
    torch.manual_seed(0)
    if "dense_targets" in CASES[case]:
        extra = {"dense_targets": [], **extra}
    config = make_config(case, **extra)
    routing = Routing()
    layer = build_layer(make_base(kind), config, routing, NUM_TASKS, NUM_DOMAINS)
    layer.requires_grad_(True)
    layer.base_layer.requires_grad_(False)
    for i in range(layer.num_groups):
        nn.init.normal_(layer.group(i)[1], std=0.1)
    if stage is not None:
        layer.gate.stage = stage
    shared = TaskGate(NUM_TASKS, layer.num_experts, 8)
    x = torch.randn(3, 5, D_IN, requires_grad=True)
    task_ids, domain_ids = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 2])
    weight = torch.randn(3, 5, D_OUT)

    def run(fn):
        params = [x, *(p for p in layer.parameters() if p.requires_grad), *shared.parameters()]
        state = RoutingState(task_ids, domain_ids, task_weights=shared.weights(task_ids))
        with routing.bind(state):
            out = fn()
        grads = torch.autograd.grad((out * weight).sum(), params, allow_unused=True)
        return out, grads

    fused, fused_grads = run(lambda: layer(x))
    assert layer.gather == (extra.get("expert_compute") == "gather")
    loop, loop_grads = run(lambda: loop_reference(layer, x, routing))
    torch.testing.assert_close(fused, loop)
    assert any(g is not None and g.abs().sum() > 0 for g in fused_grads[1:])
    for got, want in zip(fused_grads, loop_grads, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want)


def test_gathered_experts_that_get_no_token_have_zero_gradients():
    """ZeRO-3 needs every parameter in the backward: an expert no token chose still gets a
    gradient (zero), because its ranks are a slice of the one A_cat/B_cat parameter."""
    torch.manual_seed(0)
    config = make_config("molora", dense_targets=[], num_experts=8, expert_compute="gather")
    routing = Routing()
    layer = build_layer(nn.Linear(D_IN, D_OUT), config, routing, NUM_TASKS, NUM_DOMAINS)
    layer.requires_grad_(True)
    layer.base_layer.requires_grad_(False)
    nn.init.normal_(layer.lora_B_0, std=0.1)
    with torch.no_grad():  # experts 2..7 are never in the top 2
        layer.gate.proj.weight.zero_()
        layer.gate.proj.bias.copy_(torch.tensor([5.0, 4.0, *[-5.0] * 6]))
    with routing.bind(RoutingState()):
        layer(torch.randn(2, 5, D_IN)).sum().backward()
    rank = layer.ranks[0]
    a_grad, b_grad = layer.lora_A_0.grad, layer.lora_B_0.grad
    assert a_grad[: 2 * rank].abs().sum() > 0 and b_grad[:, : 2 * rank].abs().sum() > 0
    assert torch.equal(a_grad[2 * rank :], torch.zeros_like(a_grad[2 * rank :]))
    assert torch.equal(b_grad[:, 2 * rank :], torch.zeros_like(b_grad[:, 2 * rank :]))


@pytest.mark.parametrize("case", ["molora", "contrastive"])
def test_gathered_model_has_the_dense_losses_and_gradients(case):
    """The whole model in training: LM loss, load balance, contrastive loss (whose rank
    outputs the gathered layer computes for the sampled tokens only) and every gradient."""
    dense = adapted(case, expert_compute="dense")
    gathered = copy.deepcopy(dense)
    for layer in gathered.adapted_layers.values():
        layer.gather = True
    inputs = batch(rows=3, length=7)

    def step(model):
        torch.manual_seed(0)
        model.train()
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_adapter_parameters() if p.grad is not None}
        return out, grads

    (want, want_grads), (got, got_grads) = step(dense), step(gathered)
    torch.testing.assert_close(got.loss, want.loss)
    assert got.aux_losses.keys() == want.aux_losses.keys()
    for name, value in want.aux_losses.items():
        torch.testing.assert_close(got.aux_losses[name], value)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, msg=name)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_layer_equals_peft_lora_layer(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    config = make_config("lora", rank_per_expert=8, alpha=32, use_rslora=use_rslora)
    ours = build_layer(copy.deepcopy(base), config, Routing(), 1, 1)
    peft_config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, use_rslora=use_rslora)
    theirs = PeftLoraLinear(base, "default", config=peft_config, r=8, lora_alpha=32)
    nn.init.normal_(ours.lora_B_0, std=0.1)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A_0)
        theirs.lora_B["default"].weight.copy_(ours.lora_B_0)
    x = torch.randn(2, 4, D_IN)
    torch.testing.assert_close(ours(x), theirs(x))


def copy_into_peft(ours: AdaptedModel, peft_model) -> None:
    with torch.no_grad():
        for name, layer in ours.adapted_layers.items():
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A_0)
            target.lora_B["default"].weight.copy_(layer.lora_B_0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_model_equals_get_peft_model(family):
    build = tiny_llama if family == "llama" else tiny_gpt2
    targets = ["c_attn", "c_proj", "c_fc"] if family == "gpt2" else ATTENTION + MLP
    ours = adapted("lora", base=build(), target_modules=targets, alpha=16)
    peft_config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=targets,
        lora_dropout=0.0,
        fan_in_fan_out=family == "gpt2",
    )
    theirs = get_peft_model(build(), peft_config).eval()
    copy_into_peft(ours, theirs)
    inputs = batch()
    expected = theirs(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(ours(**inputs).logits, expected)


def test_moelora_with_one_expert_equals_lora():
    lora = adapted("lora", rank_per_expert=4)
    moelora = adapted("moelora", num_experts=1, total_rank=4)
    moelora.load_adapter_state_dict(lora.adapter_state_dict(), strict=False)
    inputs = batch()
    torch.testing.assert_close(moelora(**inputs).logits, lora(**inputs).logits)


def test_moelora_expert_parameters_equal_lora_at_same_total_rank():
    def expert_params(model):
        return sum(p.numel() for n, p in model.named_adapter_parameters() if ".lora_" in n)

    lora = AdaptedModel(tiny_llama(), make_config("lora", rank_per_expert=16), NUM_TASKS)
    moelora = AdaptedModel(
        tiny_llama(), make_config("moelora", num_experts=8, total_rank=16), NUM_TASKS
    )
    assert moelora.config.rank_per_expert == 2
    assert expert_params(moelora) == expert_params(lora) == lora.num_trainable_parameters()
    gate = NUM_TASKS * 64 + 64 * 8
    assert moelora.num_trainable_parameters() == expert_params(lora) + gate


@pytest.mark.parametrize("init", ["normal", "kaiming"])
def test_adapters_start_as_the_identity_with_the_configured_init(init):
    model = AdaptedModel(tiny_llama(), make_config("moelora", init=init), NUM_TASKS)
    inputs = batch()
    plain = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    torch.testing.assert_close(model(**inputs).logits, tiny_llama()(**plain).logits)
    a = model.adapted_layers["model.layers.0.self_attn.q_proj"].lora_A_0
    if init == "normal":  # MOELoRA's N(0, 0.01^2)
        assert 0.008 < a.std().item() < 0.012
    else:  # PEFT's kaiming-uniform(a=sqrt(5)): U(-1/sqrt(d_in), 1/sqrt(d_in))
        assert a.abs().max().item() <= 64**-0.5 and a.std().item() > 0.05
