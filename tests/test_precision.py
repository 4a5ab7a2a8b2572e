"""Half precision for every method: bf16 and fp16 base weights with the forward under autocast, as
accelerate's `prepare` runs it for `hardware.mixed_precision=bf16|fp16` (`torch.autocast` around
the forward; the CPU has both), against the same model and batch in fp32.

Stated tolerances, half precision against fp32 (worst measured over 6 batches on the tiny Llama,
bf16 / fp16, in brackets):
- the loss (LM + weighted aux): relative difference <= 1e-3 (1.6e-4 / 2.2e-5);
- each aux loss: relative 2e-2 or absolute 1e-3;
- the gradients of all adapter and gate parameters, as one vector: cosine similarity >= 0.995
  (0.9992 / 0.99999) and norm of the difference <= 0.1 of fp32's (0.042 / 0.005).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moelora.adapters import RoutingState, TaskGate, TopKRouter
from moelora.cli import main
from tests.adapters.adapter_cases import CASES, DENSE_ROUTING, adapted, batch, tiny_llama
from tests.conftest import TINY_SHAPE

pytestmark = pytest.mark.usefixtures("one_thread")

HALF = [torch.bfloat16, torch.float16]
# adapter_cases' table, plus MoDULA routing each row from its prompt (the prompt's mean input)
VARIANTS = {case: (case, {}) for case in CASES} | {
    "modula_prompt": ("modula", {"router_input": "prompt"})
}


def half_model(variant: str, dtype: torch.dtype, **overrides):
    """The variant's adapted tiny Llama, its base weights in `dtype`, in training mode."""
    case, fields = VARIANTS[variant]
    return adapted(case, tiny_llama().to(dtype), **fields, **overrides).train()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gates_compute_in_fp32_whatever_the_autocast(
    variant: str, dtype: torch.dtype, monkeypatch
) -> None:
    """Every gate's output under autocast is fp32 and bitwise what the gate gives for the same
    input with autocast off; so are the shared task gate's weights and the aux losses."""
    model = half_model(variant, dtype)
    checked = []
    aux_losses = RoutingState.aux_losses

    def aux_losses_without_autocast_too(state):
        found = aux_losses(state)
        with torch.autocast("cpu", enabled=False):
            again = aux_losses(state)
        checked.extend((name, value, again[name]) for name, value in found.items())
        return found

    monkeypatch.setattr(RoutingState, "aux_losses", aux_losses_without_autocast_too)

    def rerun_without_autocast(gate, args, g):
        x, routing = args
        state = routing.state
        collect, state.collect_aux = state.collect_aux, False  # record no aux loss twice
        with torch.autocast("cpu", enabled=False):
            again = gate.forward(x, routing)
        state.collect_aux = collect
        checked.append((type(gate).__name__, g, again))

    for layer in model.adapted_layers.values():
        layer.gate.register_forward_hook(rerun_without_autocast)
    inputs = batch(rows=2, length=8)
    with torch.autocast("cpu", dtype=dtype):
        out = model(**inputs, labels=inputs["input_ids"])
        task_weights = model.task_gate.weights(inputs["task_ids"]) if model.task_gate else None
    assert checked
    for name, g, again in checked:
        assert g.dtype == torch.float32 and torch.equal(g, again), name
    if task_weights is not None:
        assert torch.equal(task_weights, model.task_gate.weights(inputs["task_ids"]))
        assert task_weights.dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in out.aux_losses.values())


def loss_and_gradients(model, dtype: torch.dtype | None, seed: int):
    inputs = batch(rows=2, length=8, seed=seed)
    torch.manual_seed(0)  # the contrastive loss samples its tokens
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = [p.grad.flatten() for _, p in model.named_adapter_parameters() if p.grad is not None]
    return out.loss.detach(), out.aux_losses, torch.cat(grads)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_loss_and_gradients_match_fp32(variant: str, dtype: torch.dtype) -> None:
    """Token routers keep every expert here (`DENSE_ROUTING`): a hard top-k is discontinuous,
    and a token whose k-th and (k+1)-th experts lie within bf16's rounding of each other picks
    the other one, moving that expert's gradients by the token's whole share (cosine down to
    0.85 on the tiny model): another valid routing, not lost precision. What top-k routing needs
    from the precision, fp32 logits, softmax and top-k, is checked exactly by the first test."""
    dense = DENSE_ROUTING.get(VARIANTS[variant][0], {})
    model = half_model(variant, dtype, **dense)
    # PEFT's arrangement (autocast_adapter_dtype): fp32 adapters on a half-precision base, so
    # the optimizer (and fp16's gradient scaler) steps fp32 weights.
    assert all(p.dtype == torch.float32 for _, p in model.named_adapter_parameters())
    for seed in (0, 1):
        loss, aux, grads = loss_and_gradients(model, dtype, seed)
        model.zero_grad()
        loss32, aux32, grads32 = loss_and_gradients(
            half_model(variant, torch.float32, **dense), None, seed
        )
        torch.testing.assert_close(loss.float(), loss32, rtol=1e-3, atol=0)
        assert aux.keys() == aux32.keys()
        for name, value in aux.items():
            torch.testing.assert_close(value, aux32[name], rtol=2e-2, atol=1e-3, msg=name)
        assert grads.dtype == torch.float32
        assert torch.cosine_similarity(grads, grads32, dim=0) >= 0.995
        assert (grads - grads32).norm() <= 0.1 * grads32.norm()


# DeepSpeed's bf16 mode casts the gates' weights to bf16 too: their logits are still the fp32
# product of those weights and the (bf16) input, within fp32's rounding, not bf16's (1e-2).
def test_router_logits_are_fp32_products_even_of_bf16_router_weights() -> None:
    torch.manual_seed(0)
    router = TopKRouter(64, 4, 2).to(torch.bfloat16)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    expected = x.double() @ router.proj.weight.double().T + router.proj.bias.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router.logits(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-6)


def test_task_gate_weights_are_fp32_even_of_bf16_gate_weights() -> None:
    torch.manual_seed(0)
    gate = TaskGate(3, 4, embedding_dim=64).to(torch.bfloat16)
    ids = torch.tensor([0, 2])
    expected = (gate.embedding(ids).double() @ gate.proj.weight.double().T).softmax(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights = gate.weights(ids)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_bf16_base_trains_and_scores_end_to_end(tmp_path) -> None:
    """`model.dtype=bfloat16` on the CPU (where mixed precision is off): bf16 base weights, fp32
    adapters, a token router; the loss falls and the adapter is saved in fp32."""
    run_dir = tmp_path / "run"
    overrides = [
        "+experiment=demo",
        *TINY_SHAPE,
        "model.tiny.pretrain_steps=0",
        "model.dtype=bfloat16",
        "method=molora",
        "data.max_eval_samples_per_task=1",
        "trainer.batch_size=8",
        "trainer.max_steps=12",
        "trainer.lr=1e-2",
        "trainer.log_every=4",
        "eval.max_new_tokens=4",
    ]
    main(["train", *overrides, f"run_dir={run_dir}"])
    assert (run_dir / "metrics.json").is_file() and (run_dir / "routing.json").is_file()
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    losses = [entry["train/loss"] for entry in history if "train/loss" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0]
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert saved and {tensor.dtype for tensor in saved.values()} == {torch.float32}
