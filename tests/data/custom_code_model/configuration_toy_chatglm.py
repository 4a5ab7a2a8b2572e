"""Config of a toy causal LM that stands in for ChatGLM-6B's remote code in the tests: the same
model_type (`chatglm`, which transformers does not have) and the same Linear names, none of its
maths. Loaded only with trust_remote_code."""

from transformers import PretrainedConfig


class ToyChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"

    def __init__(self, vocab_size=745, hidden_size=32, num_hidden_layers=1, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)
