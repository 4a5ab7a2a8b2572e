"""Chat templates: with `data.template=auto` and a tokenizer that has one (ChatML set on the shipped
tokenizer), the prompt is exactly `apply_chat_template(..., add_generation_prompt=True)`'s ids,
the loss covers the answer and the template's end-of-turn token only, and generation stops there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from moelora.config import DataConfig, ModelConfig
from moelora.data.formatting import IGNORE, end_of_turn_id
from moelora.data.pipeline import prepare_data
from moelora.evaluate.generate import generate_answers
from moelora.modeling import load_tokenizer
from moelora.paths import DATA_DIR

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
PLAIN_TURNS = "{% for message in messages %}{{ message['content'] + '\n' }}{% endfor %}"
CONTROL = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
ROW = {
    "input": "问：头痛三天，该挂哪个科？\n答：",
    "target": "神经内科",
    "answer_choices": None,
    "task_type": "cls",
    "task_dataset": "A",
    "sample_id": "s1",
}


def shipped_tokenizer(template: str | None = None):
    """The shipped tokenizer (eos </s>) with the chat control tokens added and `template` set."""
    tokenizer = load_tokenizer(
        ModelConfig(name="tiny", name_or_path="tiny", tokenizer=str(DATA_DIR / "tokenizer"))
    )
    tokenizer.add_tokens(CONTROL, special_tokens=True)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def chatml():
    return shipped_tokenizer(CHATML)


def chat_data(tmp_path: Path, tokenizer, **fields):
    rows = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [ROW])
    (tmp_path / "train.jsonl").write_text(rows, encoding="utf-8")
    (tmp_path / "dev.jsonl").write_text(rows, encoding="utf-8")
    return prepare_data(DataConfig(name="t", root=str(tmp_path), **fields), tokenizer)


@pytest.mark.parametrize("system_prompt", [None, "你是一名医生。"])
def test_the_prompt_is_the_chat_templates_and_the_loss_the_answer_and_end_of_turn(
    tmp_path, chatml, system_prompt
) -> None:
    data = chat_data(tmp_path, chatml, system_prompt=system_prompt)
    messages = [{"role": "user", "content": ROW["input"]}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    expected = chatml.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert chatml.decode(expected).endswith("<|im_end|>\n<|im_start|>assistant\n")
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    answer = chatml(ROW["target"], add_special_tokens=False)["input_ids"] + [im_end]
    for split in (data.train, data.eval):
        row = split[0]
        assert row["prompt_ids"] == expected
        assert row["input_ids"] == expected + answer
    labels = data.train[0]["labels"]
    assert labels == [IGNORE] * len(expected) + answer  # not the prompt, not eos (</s>)
    assert chatml.eos_token_id not in labels


@pytest.mark.parametrize(
    ("template", "end"),
    [
        (CHATML, "<|im_end|>"),
        (LLAMA3, "<|eot_id|>"),
        (PLAIN_TURNS, "</s>"),  # a turn closed by plain text: the tokenizer's eos
        (None, "</s>"),
    ],
)
def test_the_end_of_turn_token_is_the_one_the_template_closes_a_turn_with(template, end) -> None:
    tokenizer = shipped_tokenizer(template)
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids(end)


class Scripted(LlamaForCausalLM):
    """A causal LM that writes `script` (each token chosen by the one before it: the prompt's
    last token starts it) and keeps going past the end of the turn; counts its forwards."""

    def __init__(self, config: LlamaConfig, script: list[int]) -> None:
        super().__init__(config)
        follows = torch.full((config.vocab_size,), script[-1])
        follows[torch.tensor(script[:-1])] = torch.tensor(script[1:])
        self.register_buffer("follows", follows, persistent=False)
        self.forwards = 0

    def forward(self, input_ids=None, **kwargs):
        self.forwards += 1
        out = super().forward(input_ids=input_ids, **kwargs)
        chosen = self.follows[input_ids[:, -1]]
        logits = torch.full_like(out.logits[:, -1:], -1e4)
        out.logits = logits.scatter(-1, chosen[:, None, None], 0.0)
        return out


def test_generation_stops_at_the_end_of_turn_token(tmp_path, chatml) -> None:
    rows = chat_data(tmp_path, chatml).eval
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    answer = chatml("头痛", add_special_tokens=False)["input_ids"]
    after = chatml("之后还有", add_special_tokens=False)["input_ids"]
    config = LlamaConfig(
        vocab_size=len(chatml),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=chatml.pad_token_id,
        eos_token_id=chatml.eos_token_id,  # the base's own eos is </s>, not the end of turn
    )
    model = Scripted(config, [rows[0]["prompt_ids"][-1], *answer, im_end, *after]).eval()
    texts = generate_answers(model, chatml, rows, 1, 16, Accelerator(cpu=True))
    assert texts == ["头痛"]
    assert model.forwards == len(answer) + 1  # it stopped at <|im_end|>, not at 16 tokens
