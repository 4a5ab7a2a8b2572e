"""A toy causal LM with ChatGLM-6B's Linear names (query_key_value, dense, dense_h_to_4h,
dense_4h_to_h), shipped as remote code beside its config (see configuration_toy_chatglm.py)."""

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_toy_chatglm import ToyChatGLMConfig


class ToyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.query_key_value = nn.Linear(width, 3 * width)
        self.dense = nn.Linear(width, width)
        self.dense_h_to_4h = nn.Linear(width, 4 * width)
        self.dense_4h_to_h = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dense(self.query_key_value(x).chunk(3, -1)[2])
        return x + self.dense_4h_to_h(torch.relu(self.dense_h_to_4h(x)))


class ToyChatGLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ToyChatGLMConfig

    def __init__(self, config: ToyChatGLMConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            ToyBlock(config.hidden_size) for _ in range(config.num_hidden_layers)
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)
