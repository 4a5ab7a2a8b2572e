"""Packed batches (data.packing=packed) against the same rows padded: for every method the same
loss and the same adapter gradients (fp32), with rows of different tasks and domains in one
sequence and a row that fills pack_length exactly; the bin packing, the length-grouped order,
and rows longer than pack_length under each length policy."""

from __future__ import annotations

import pytest
import torch

from moelora.adapters import AdaptedModel
from moelora.config import DataConfig
from moelora.data.batching import (
    LengthGroupedSampler,
    PackingCollator,
    TrainCollator,
    fill_rate,
    first_fit_decreasing,
)
from moelora.data.formatting import IGNORE
from tests.adapters.adapter_cases import (
    NUM_DOMAINS,
    NUM_TASKS,
    VOCAB,
    adapted,
    tiny_llama,
)

PACK = 24
# (prompt, answer) lengths: 24 fills a pack exactly; the others share packs across tasks.
SHAPES = [(4, 3), (14, 10), (5, 2), (9, 4), (3, 3), (6, 5), (2, 2)]


def rows() -> list[dict]:
    generator = torch.Generator().manual_seed(5)
    out = []
    for index, (prompt, answer) in enumerate(SHAPES):
        ids = torch.randint(1, VOCAB, (prompt + answer,), generator=generator).tolist()
        out.append(
            {
                "input_ids": ids,
                "labels": [IGNORE] * prompt + ids[prompt:],
                "task_ids": index % NUM_TASKS,
                "domain_ids": (index * 2 + 1) % NUM_DOMAINS,
            }
        )
    return out


def loss_and_grads(model: AdaptedModel, batch: dict) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    losses = {"lm": out.lm_loss.detach(), **out.aux_losses}
    grads = {n: p.grad.clone() for n, p in model.named_adapter_parameters() if p.grad is not None}
    return losses, grads


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm().clamp(min=1e-30))


# (case, adapter config overrides, MoDULA stage)
METHODS = [
    ("lora", {}, None),
    ("moelora", {}, None),
    ("moelora_layer_gate", {}, None),
    ("molora", {}, None),
    ("contrastive", {"contrastive_tokens": 10_000, "contrastive_coef": 0.5}, None),
    ("modula", {}, "universal"),
    ("modula", {}, "domain"),
    ("modula", {}, "router"),
    ("modula", {"router_input": "prompt"}, "router"),
    ("modula", {"router_input": "prompt"}, "router_warmup"),
    ("modula_res", {}, "router_warmup"),
    ("modula_res", {"router_top_k": 1}, "router"),
]


@pytest.mark.parametrize(
    ("case", "overrides", "stage"),
    METHODS,
    ids=[f"{c}-{s}-{o.get('router_input', '')}" for c, o, s in METHODS],
)
def test_a_packed_batch_gives_the_padded_loss_and_gradients(case, overrides, stage) -> None:
    """In fp32 the losses and the whole adapter gradient agree to 1e-5 (relative). In fp64
    (where only the LM loss and the routers' softmax stay fp32) every parameter's gradient
    agrees to 1e-6: fp32 sums taken in another order differ in their last bits, and a top-1
    router's gradient, reached through the balance loss alone, is made of little else."""
    batch_rows = rows()
    padded = TrainCollator(pad_id=0)(batch_rows)
    packed = PackingCollator(pad_id=0, pack_length=PACK)(batch_rows)
    assert len(packed["input_ids"]) < len(batch_rows)  # several rows share a sequence
    assert (packed["segment_ids"] >= 0).sum(1).max() == PACK  # one pack is full
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-6)):
        model = adapted(case, **overrides).to(dtype).train()
        if stage is not None:
            model.set_stage(stage)
        expected_losses, expected_grads = loss_and_grads(model, padded)
        got_losses, got_grads = loss_and_grads(model, packed)
        assert got_losses.keys() == expected_losses.keys()
        for name, value in expected_losses.items():
            assert relative_error(got_losses[name], value) < tolerance, name
        assert got_grads.keys() == expected_grads.keys() and expected_grads
        if dtype == torch.float32:
            flat = [
                torch.cat([g.flatten() for g in grads.values()])
                for grads in (got_grads, expected_grads)
            ]
            assert relative_error(*flat) < tolerance
        else:
            for name, grad in expected_grads.items():
                assert relative_error(got_grads[name], grad) < tolerance, name


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_attend_within_their_own_row(attention) -> None:
    """The base alone: each token's logits in a pack equal its row's alone, both attention
    implementations."""
    base = tiny_llama()
    base.config._attn_implementation = attention
    batch_rows = rows()
    packed = PackingCollator(pad_id=0, pack_length=PACK)(batch_rows)
    inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    logits = base(**inputs, use_cache=False).logits  # a cache turns the packed masks off
    for index, row in enumerate(batch_rows):
        alone = base(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        where = packed["segment_ids"] == index
        torch.testing.assert_close(logits[where], alone, rtol=1e-5, atol=1e-5)


def test_first_fit_decreasing_fills_packs_and_keeps_every_row_once() -> None:
    lengths = [7, 3, 9, 1, 4, 4, 2, 10, 5]
    packs = first_fit_decreasing(lengths, 10)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in pack) <= 10 for pack in packs)
    assert len(packs) == 5  # 45 tokens: the fewest packs of 10 that can hold them
    assert first_fit_decreasing([12, 3], 10) == [[0], [1]]  # an over-long eval row: alone


def test_packed_labels_positions_and_rows() -> None:
    batch_rows = rows()[:3]
    packed = PackingCollator(pad_id=0, pack_length=PACK)(batch_rows)
    for index, row in enumerate(batch_rows):
        where = packed["segment_ids"] == index
        assert packed["input_ids"][where].tolist() == row["input_ids"]
        assert packed["labels"][where].tolist() == row["labels"]
        assert packed["position_ids"][where].tolist() == list(range(len(row["input_ids"])))
    padding = packed["segment_ids"] < 0
    assert (packed["labels"][padding] == IGNORE).all()
    assert packed["task_ids"].tolist() == [r["task_ids"] for r in batch_rows]


def test_length_grouped_batches_hold_rows_of_similar_length_and_keep_the_epoch() -> None:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 500, (400,), generator=generator).tolist()
    order = torch.randperm(400, generator=generator).tolist()
    grouped = LengthGroupedSampler(order, lengths, batch_size=8, window=10, seed=0)
    regrouped = list(grouped)
    assert sorted(regrouped) == sorted(order)  # the same rows: the mixture holds
    assert fill_rate(lengths, regrouped, 8, None) > 0.9 > fill_rate(lengths, order, 8, None)
    assert fill_rate(lengths, order, 8, 512) > 0.8 > 0.65 > fill_rate(lengths, order, 8, None)
    grouped.set_epoch(1)
    assert list(grouped) != regrouped  # each epoch its own batch order


def formatter_for(**data):
    from transformers import PreTrainedTokenizerFast

    from moelora.data.formatting import PromptFormatter
    from moelora.paths import DATA_DIR

    tokenizer = PreTrainedTokenizerFast.from_pretrained(DATA_DIR / "tokenizer")
    cfg = DataConfig(name="t", root=".", packing="packed", **data)
    return PromptFormatter(tokenizer, cfg)


@pytest.mark.parametrize("policy", ["truncate_input", "drop", "error"])
def test_a_row_longer_than_pack_length_follows_the_length_policy(policy) -> None:
    from datasets import Dataset

    from moelora.data.formatting import tokenize_split
    from moelora.data.tasks import TaskRegistry
    from moelora.errors import UserError

    formatter = formatter_for(pack_length=40, length_policy=policy)
    row = {"task_dataset": "A", "task_type": "cls", "answer_choices": None}
    long = {**row, "input": "头痛三天，伴有发热。" * 8, "target": "神经内科", "sample_id": "1"}
    short = {**row, "input": "咳嗽", "target": "呼吸内科", "sample_id": "2"}
    split = Dataset.from_list([long, short])
    registry = TaskRegistry.from_rows(split)
    if policy == "error":
        with pytest.raises(UserError, match="data.pack_length=40 in all"):
            tokenize_split(split, formatter, registry, "train", True)
        return
    tokenized, report = tokenize_split(split, formatter, registry, "train", True)
    assert max(tokenized["length"]) <= 40
    if policy == "truncate_input":
        assert len(tokenized) == 2 and report.truncated["A"] == 1
        assert tokenized[0]["input_ids"][-len(formatter.answer_ids("神经内科")) :] == (
            formatter.answer_ids("神经内科")
        )
    else:
        assert len(tokenized) == 1 and report.dropped["A"] == 1


@pytest.mark.parametrize("case", ["moelora", "molora", "modula_res"])
def test_under_flash_attention_the_packs_train_as_one_padding_free_row(case, monkeypatch) -> None:
    """transformers' flash-attention attends packed rows apart only in one flattened sequence:
    there the packs are joined without padding. Checked through the same flattening with sdpa's
    packed mask (flash-attention itself needs a GPU)."""
    monkeypatch.setattr(AdaptedModel, "varlen_attention", property(lambda self: True))
    model = adapted(case).train()
    batch_rows = rows()
    expected_losses, expected_grads = loss_and_grads(model, TrainCollator(pad_id=0)(batch_rows))
    shapes = []
    model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    got_losses, got_grads = loss_and_grads(model, PackingCollator(0, PACK)(batch_rows))
    assert shapes == [(1, sum(len(r["input_ids"]) for r in batch_rows))]  # one padding-free row
    for name, value in expected_losses.items():
        assert relative_error(got_losses[name], value) < 1e-5, name
    got, expected = (
        torch.cat([g.flatten() for g in grads.values()]) for grads in (got_grads, expected_grads)
    )
    assert relative_error(got, expected) < 1e-5


def row_attention_llama():
    from moelora.adapters.attention import use_row_attention

    base = tiny_llama()
    assert use_row_attention(base)
    return base


def test_row_attention_attends_each_packed_row_alone() -> None:
    base = row_attention_llama()
    batch_rows = rows()
    packed = PackingCollator(pad_id=0, pack_length=PACK)(batch_rows)
    inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    logits = base(**inputs, use_cache=False).logits
    reference = tiny_llama()  # sdpa, each row alone
    for index, row in enumerate(batch_rows):
        alone = reference(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        torch.testing.assert_close(logits[packed["segment_ids"] == index], alone)


@pytest.mark.parametrize("case", ["lora", "moelora", "molora", "modula"])
def test_with_row_attention_a_packed_batch_gives_the_padded_loss_and_gradients(case) -> None:
    model = adapted(case, base=row_attention_llama()).train()
    assert model.varlen_attention  # the packs are joined into one padding-free row
    batch_rows = rows()
    expected_losses, expected_grads = loss_and_grads(model, TrainCollator(pad_id=0)(batch_rows))
    got_losses, got_grads = loss_and_grads(model, PackingCollator(0, PACK)(batch_rows))
    for name, value in expected_losses.items():
        assert relative_error(got_losses[name], value) < 1e-5, name
    got, expected = (
        torch.cat([g.flatten() for g in grads.values()]) for grads in (got_grads, expected_grads)
    )
    assert relative_error(got, expected) < 1e-5


def test_row_attention_generates_exactly_like_sdpa() -> None:
    """Left-padded prompts and cached decoding are not packed forwards: sdpa's own path."""
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, VOCAB, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = attention_mask[2, :5] = 0
    answers = [
        base.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
        for base in (tiny_llama(), row_attention_llama())
    ]
    assert torch.equal(*answers)


def test_row_attention_is_kept_off_bases_whose_attention_it_would_change() -> None:
    from moelora.adapters.attention import use_row_attention

    eager, windowed, capped = tiny_llama(), tiny_llama(), tiny_llama()
    eager.set_attn_implementation("eager")
    windowed.config.sliding_window = 8
    capped.config.attn_logit_softcapping = 50.0
    assert not any(use_row_attention(base) for base in (eager, windowed, capped))
    assert windowed.config._attn_implementation == "sdpa"
