"""Every method through the same generic checks: gradients, stages, aux losses, save/load."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from moelora.adapters import AdaptedModel, load_adapter, method_config, save_adapter
from tests.adapters.adapter_cases import (
    CASES,
    NUM_DOMAINS,
    NUM_TASKS,
    TOKEN_ROUTED,
    adapted,
    batch,
    make_config,
    randomize_adapters,
    tiny_llama,
)


def train_step(model, inputs):
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    return out


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_only_adapters_and_gates(case):
    model = adapted(case)
    out = train_step(model, batch())
    adapter = {n for n, _ in model.named_adapter_parameters()}
    for name, param in model.named_parameters():
        if name in adapter:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("case", CASES)
def test_loss_is_lm_loss_plus_weighted_aux_losses(case):
    model = adapted(case)
    out = train_step(model, batch())
    expected = {"molora": {"load_balance"}, "contrastive": {"load_balance", "contrastive"}}
    # modula_res's router keeps every domain (dense): the importance loss, not Switch's
    expected |= {"modula": {"load_balance"}, "modula_res": {"importance"}}
    assert set(out.aux_losses) == expected.get(case, set())
    config = model.config
    coef = {  # each method's config holds the weights of its own aux losses only
        "load_balance": getattr(config, "aux_loss_coef", None),
        "importance": getattr(config, "aux_loss_coef", None),
        "contrastive": getattr(config, "contrastive_coef", None),
    }
    total = out.lm_loss + sum(coef[k] * v for k, v in out.aux_losses.items())
    torch.testing.assert_close(out.loss, total)
    for value in out.aux_losses.values():
        assert torch.isfinite(value) and value > 0 and not value.requires_grad
    model.eval()
    assert model(**batch()).aux_losses == {}


def test_token_routed_methods_ignore_padding_in_load_balance():
    model = adapted("molora").train()
    inputs = batch()  # row 1 is left-padded over two positions
    other_padding = inputs["input_ids"].clone()
    other_padding[1, :2] = 7  # padding tokens still run through the routers but must not count
    a = model(**inputs).aux_losses["load_balance"]
    b = model(**dict(inputs, input_ids=other_padding)).aux_losses["load_balance"]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", CASES)
def test_save_load_round_trip_gives_identical_outputs(case, tmp_path):
    model = adapted(case)
    inputs = batch()
    expected = model(**inputs).logits
    save_adapter(model, tmp_path, {"tasks": {"a": 0, "b": 1, "c": 2}})
    loaded, metadata = load_adapter(tmp_path, tiny_llama())
    assert metadata == {"tasks": {"a": 0, "b": 1, "c": 2}}
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.eval()(**inputs).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["moelora", "moelora_layer_gate"])
def test_moelora_output_depends_on_the_task(case):
    model = adapted(case)
    inputs = batch()
    other = dict(inputs, task_ids=(inputs["task_ids"] + 1) % 3)
    assert not torch.allclose(model(**inputs).logits, model(**other).logits)


def test_moelora_without_task_ids_fails_clearly():
    model = adapted("moelora")
    inputs = batch()
    del inputs["task_ids"]
    with pytest.raises(ValueError, match="task_ids"):
        model(**inputs)


def stage_trainable(model, stage, domains=None):
    model.set_stage(stage, domains)
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", ["modula", "modula_res"])
def test_modula_stage_freezing(case):
    model = adapted(case)
    adapter = {n for n, _ in model.named_adapter_parameters()}
    universal = {n for n in adapter if n.endswith(("lora_A_0", "lora_B_0"))}
    router = {n for n in adapter if ".gate.router." in n}
    domain = adapter - universal - router
    assert universal and router and domain
    assert stage_trainable(model, "universal") == universal
    assert stage_trainable(model, "domain") == domain
    assert stage_trainable(model, "domain", [2]) == {n for n in domain if n.endswith("_3")}
    assert stage_trainable(model, "router") == router
    assert stage_trainable(model, None) == adapter
    for stage in ("universal", "domain", "router"):
        model.set_stage(stage)
        model.zero_grad(set_to_none=True)
        train_step(model, batch())
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == stage_trainable(model, stage)


def test_modula_domain_stage_routes_each_row_to_its_domain_expert():
    model = adapted("modula")
    model.set_stage("domain")
    inputs = batch()
    for layer in model.adapted_layers.values():
        with model.routing.bind(model.routing_state(domain_ids=inputs["domain_ids"])):
            g = layer.gate(torch.zeros(2, 6, 64), model.routing)
        assert g.shape == (2, 1, NUM_DOMAINS + 1)
        assert g.argmax(-1).flatten().tolist() == (inputs["domain_ids"] + 1).tolist()
        break
    other = dict(inputs, domain_ids=(inputs["domain_ids"] + 1) % NUM_DOMAINS)
    assert not torch.allclose(model(**inputs).logits, model(**other).logits)


def test_stages_are_refused_for_other_methods():
    with pytest.raises(ValueError, match="stage"):
        adapted("moelora").set_stage("router")


@pytest.mark.parametrize("case", sorted(TOKEN_ROUTED))
def test_token_routed_methods_need_no_task_ids(case):
    model = adapted(case)
    inputs = batch()
    del inputs["task_ids"], inputs["domain_ids"]
    assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("case", ["modula", "modula_res"])
def test_adding_a_domain_keeps_the_old_experts_and_trains_only_the_new_one(case, tmp_path):
    old = AdaptedModel(tiny_llama(), make_config(case), NUM_TASKS, num_domains=2)
    randomize_adapters(old)
    save_adapter(old, tmp_path)
    new = AdaptedModel(tiny_llama(), make_config(case, add_domains=["new"]), NUM_TASKS, 3)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    skipped = new.load_adapter_state_dict(state, strict=False)
    assert skipped and all(n.endswith("_3") or ".gate.router." in n for n in skipped)
    kept = {n: p for n, p in new.named_adapter_parameters() if n not in skipped}
    assert all(torch.equal(p, state[n]) for n, p in kept.items())
    trainable = stage_trainable(new, "domain", [2])
    assert trainable and all(n.endswith("_3") for n in trainable)


def test_compiled_layers_train_like_eager_ones():
    """trainer.compile: each decoder layer compiled in place, adapters included; the loss and
    the adapter gradients equal the eager model's, and the parameter names do not change."""
    eager = adapted("moelora")
    compiled = copy.deepcopy(eager)
    # aot_eager: dynamo's capture and AOT autograd, without inductor's minutes of C++ codegen
    assert compiled.compile_layers(backend="aot_eager") == ["LlamaDecoderLayer"]
    assert [n for n, _ in compiled.named_adapter_parameters()] == [
        n for n, _ in eager.named_adapter_parameters()
    ]
    inputs = batch(rows=3, length=7)
    results = []
    for model in (eager, compiled):
        model.train()
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        results.append((out.loss, {n: p.grad for n, p in model.named_adapter_parameters()}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("fields", "domains", "says"),
    [
        ({"name": "modula_res"}, 1, "modula_res's router has one candidate"),
        ({"name": "molora", "num_experts": 1, "top_k": 1}, 1, "molora has one expert"),
        ({"name": "modula_res"}, 2, None),
    ],
)
def test_a_balance_loss_with_nothing_to_balance_is_said(fields, domains, says, capsys):
    config = method_config({"dropout": 0.0, **fields})
    AdaptedModel(tiny_llama(), config, NUM_TASKS, domains)
    printed = capsys.readouterr().out
    if says is None:
        assert "nothing to balance" not in printed
    else:
        assert f"has nothing to balance: {says}" in printed
