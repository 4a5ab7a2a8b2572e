"""MoDULA's router options on hand-made cases: routing each row from its prompt, and a router
warm-started from the domain labels."""

import torch

from moelora.adapters import DomainGate
from tests.adapters.adapter_cases import VOCAB, adapted, batch


def gate_outputs(model) -> list[torch.Tensor]:
    """Every domain gate's output, in call order, recorded by hooks (returned list fills)."""
    seen: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, DomainGate):
            module.register_forward_hook(lambda m, a, g: seen.append(g.detach()))
    return seen


def test_a_prompt_router_gives_every_token_of_a_row_the_same_weights():
    model = adapted("modula_res", router_input="prompt", router_top_k=2).train()
    inputs = batch(rows=3, length=8)
    labels = inputs["input_ids"].clone()
    labels[:, :5] = -100  # the prompt: the first 5 tokens
    seen = gate_outputs(model)
    model(**inputs, labels=labels)
    first = seen[0]
    assert first.shape == (3, 1, 4)  # per row: the universal residual and the 3 domains
    assert ((first[..., 1:] > 0).sum(-1) == 2).all()  # top 2 of the domains
    # The answer tokens do not move the routing: only the prompt's inputs are pooled.
    seen.clear()
    other = dict(inputs, input_ids=inputs["input_ids"].clone())
    other["input_ids"][:, 6:] = (other["input_ids"][:, 6:] + 1) % VOCAB
    model(**other, labels=labels)
    torch.testing.assert_close(seen[0], first)


def test_a_prompt_router_keeps_the_prefill_weights_while_decoding():
    model = adapted("modula", router_input="prompt").eval()
    inputs = batch(rows=2, length=6)
    seen = gate_outputs(model)
    model.generate(
        inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        domain_ids=inputs["domain_ids"],
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        pad_token_id=0,
    )
    layers = sum(isinstance(m, DomainGate) for m in model.modules())
    prefill, decoding = seen[:layers], seen[layers:]
    assert len(decoding) == 2 * layers  # two cached steps after the prefill
    for step in range(2):
        for layer in range(layers):
            torch.testing.assert_close(decoding[step * layers + layer], prefill[layer])


def test_a_warm_started_router_picks_each_rows_own_domain():
    """router_warmup trains the router alone on the cross-entropy to the row's domain: before
    any free routing, it sends each row to its own domain expert."""
    torch.manual_seed(0)
    model = adapted("modula_res", router_input="prompt")
    model.set_stage("router_warmup")
    assert {n for n, p in model.named_adapter_parameters() if p.requires_grad} == {
        n for n, _ in model.named_adapter_parameters() if ".router." in n
    }
    inputs = batch(rows=6, length=7)
    inputs["domain_ids"] = torch.tensor([0, 1, 2, 2, 1, 0])
    labels = inputs["input_ids"].clone()
    labels[:, :5] = -100  # the prompt the router reads
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=0.05)
    model.train()
    for _ in range(60):
        out = model(**inputs, labels=labels)
        assert "router_supervision" in out.aux_losses
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.set_stage("router")
    model.eval()
    seen = gate_outputs(model)
    with torch.no_grad():
        model(**inputs, labels=labels)
    for g in seen:  # modula_res: expert 0 is the universal residual, then the domains
        assert g[:, 0, 1:].argmax(-1).tolist() == inputs["domain_ids"].tolist()
