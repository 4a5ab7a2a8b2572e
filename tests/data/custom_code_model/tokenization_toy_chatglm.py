"""The toy ChatGLM stand-in's tokenizer: the shipped byte-level BPE under a class of its own, so
that, like ChatGLM-6B's, it loads only with trust_remote_code."""

from transformers import PreTrainedTokenizerFast


class ToyChatGLMTokenizer(PreTrainedTokenizerFast):
    pass
