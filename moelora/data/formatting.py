"""Turn rows into token ids: the prompt through the tokenizer's chat template (or a plain one),
loss on the answer only, and a length policy that never silently cuts an answer."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from statistics import mean

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from moelora.config import DataConfig
from moelora.data.tasks import TaskRegistry
from moelora.errors import UserError

IGNORE = -100


@dataclass
class LengthReport:
    """What the length policy did, per task, for the start-of-run summary."""

    kept: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    prompt_tokens: dict[str, list[int]] = field(default_factory=dict)
    target_tokens: dict[str, list[int]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"{'task':<16}{'rows':>7}{'dropped':>8}{'cut':>6}{'prompt avg/max':>16}"
            f"{'target avg/max':>16}"
        ]
        for task in sorted(self.kept | self.dropped):
            p, t = self.prompt_tokens.get(task, [0]), self.target_tokens.get(task, [0])
            out.append(
                f"{task:<16}{self.kept[task]:>7}{self.dropped[task]:>8}{self.truncated[task]:>6}"
                f"{mean(p):>11.0f}/{max(p):<4}{mean(t):>11.0f}/{max(t):<4}"
            )
        return out

    def count(self, task: str, prompt: list[int], answer: list[int], cut: bool) -> None:
        """A kept row: its lengths, and whether its input was cut."""
        self.kept[task] += 1
        self.truncated[task] += int(cut)
        self.prompt_tokens.setdefault(task, []).append(len(prompt))
        self.target_tokens.setdefault(task, []).append(len(answer))


_ANSWER = "MOELORA-ANSWER"  # stands for the answer when the chat template renders a turn


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token the chat template closes an assistant turn with (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>, Gemma's <end_of_turn>): the first token the template writes after the answer,
    when that is a special or added token. The tokenizer's eos when there is no template, or
    when the template closes a turn with plain text or nothing."""
    eos = tokenizer.eos_token_id
    if not has_chat_template(tokenizer):
        return eos
    turn = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _ANSWER}]
    text = tokenizer.apply_chat_template(turn, tokenize=False)
    after = text[text.index(_ANSWER) + len(_ANSWER) :] if _ANSWER in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    control = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return ids[0] if ids and ids[0] in control else eos


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_eos: int | list | None) -> list:
    """Every token that ends an answer in generation: the end of a chat turn, the tokenizer's
    eos, and the base model's own `generation_config.eos_token_id` (one id or several)."""
    extra = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    ids = [end_of_turn_id(tokenizer), tokenizer.eos_token_id, *extra]
    return list(dict.fromkeys(i for i in ids if i is not None))


class PromptFormatter:
    """Builds prompt and answer token ids for one row.

    With a chat template (`data.template=auto` on a tokenizer that has one, or `chat`), the
    prompt is exactly `apply_chat_template(messages, add_generation_prompt=True)`'s ids, the
    messages being `data.system_prompt` (when set) and the row's input as the user's turn, and
    the answer is the target's ids followed by the template's end-of-turn token
    (`end_of_turn_id`), which generation stops at. Without one, the prompt is the tokenized
    input (with the tokenizer's own special tokens) and the answer ends with eos.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> None:
        has_template = has_chat_template(tokenizer)
        if cfg.template == "chat" and not has_template:
            raise UserError(
                "data.template=chat, but the tokenizer has no chat template; use plain."
            )
        self.use_chat = cfg.template == "chat" or (cfg.template == "auto" and has_template)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.end_id = end_of_turn_id(tokenizer) if self.use_chat else tokenizer.eos_token_id

    def prompt_ids(self, text: str) -> list[int]:
        if not self.use_chat:
            return self.tokenizer(text, add_special_tokens=True)["input_ids"]
        messages = [{"role": "user", "content": text}]
        if self.cfg.system_prompt:
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )

    def answer_ids(self, text: str) -> list[int]:
        """The target's ids and the token that ends the answer: what the loss covers."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + [self.end_id]

    def fit_prompt(self, text: str, limit: int | None = None) -> tuple[list[int], bool]:
        """The prompt's ids, cutting the input's start when it is longer than `limit` (default
        data.max_source_length; the instruction and question sit at the end of PromptCBLUE
        inputs). Returns (ids, was_cut)."""
        ids = self.prompt_ids(text)
        limit = self.cfg.max_source_length if limit is None else limit
        if len(ids) <= limit or self.cfg.length_policy != "truncate_input":
            return ids, False
        text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = max(limit - (len(ids) - len(text_ids)), 1)
        ids = self.prompt_ids(self.tokenizer.decode(text_ids[-keep:]))
        while len(ids) > limit and keep > 1:  # re-encoding merged differently: keep less input
            keep = max(keep - (len(ids) - limit), 1)
            ids = self.prompt_ids(self.tokenizer.decode(text_ids[-keep:]))
        return ids, True


def _too_long(
    where: str, row: dict, prompt: list, answer: list, cfg: DataConfig, pack: int | None
) -> UserError:
    """data.length_policy=error: the row, its lengths and the limits it is over."""
    packing = f" / data.pack_length={pack} in all" if pack is not None else ""
    return UserError(
        f"{where} (sample_id {row['sample_id']}, task {row['task_dataset']}) has "
        f"{len(prompt)} prompt / {len(answer)} answer tokens, over data.max_source_length="
        f"{cfg.max_source_length} / data.max_target_length={cfg.max_target_length}{packing}; "
        f"raise the limit or set data.length_policy=drop."
    )


def _fit(
    row: dict, formatter: PromptFormatter, pack: int | None, with_answer: bool
) -> tuple[list[int], list[int], bool, bool]:
    """(prompt ids, answer ids, whether the input was cut, whether the row is over a limit);
    when packing, a row must fit in one packed sequence."""
    cfg = formatter.cfg
    answer = formatter.answer_ids(row["target"])
    limit = cfg.max_source_length
    if pack is not None:
        limit = max(min(limit, pack - len(answer)), 1)
    prompt, cut = formatter.fit_prompt(row["input"], limit)
    too_long = len(prompt) > limit or (with_answer and len(answer) > cfg.max_target_length)
    return prompt, answer, cut, too_long


def _features(
    prompt: list[int], answer: list[int], registry: TaskRegistry, task: str
) -> dict[str, list[int] | int]:
    """One row's columns: the ids, labels on the answer only, the task and domain ids."""
    return {
        "input_ids": prompt + answer,
        "labels": [IGNORE] * len(prompt) + answer,
        "prompt_ids": prompt,
        "task_ids": registry.task_id(task),
        "domain_ids": registry.domain_id(task),
        "length": len(prompt) + len(answer),
    }


def tokenize_split(
    rows: Dataset,
    formatter: PromptFormatter,
    registry: TaskRegistry,
    split: str,
    with_answer: bool,
) -> tuple[Dataset, LengthReport]:
    """Token ids, labels and task/domain ids per row; rows over the length limits (and, when
    packing, longer than data.pack_length) follow the policy. `with_answer=False` keeps rows
    whose answer is too long (eval scores the text)."""
    cfg, report = formatter.cfg, LengthReport()
    pack = cfg.packed_length if with_answer else None
    keep: list[int] = []
    features: dict[str, list] = {k: [] for k in ("input_ids", "labels", "prompt_ids")}
    features |= {"task_ids": [], "domain_ids": [], "length": []}
    for index, row in enumerate(rows):
        task = row["task_dataset"]
        registry.task_id(task)  # an unknown task stops, whatever its length
        prompt, answer, cut, too_long = _fit(row, formatter, pack, with_answer)
        if too_long:
            if cfg.length_policy == "error":
                where = f"row {index + 1} of the {split} set"
                raise _too_long(where, row, prompt, answer, cfg, pack)
            report.dropped[task] += 1
            continue
        report.count(task, prompt, answer, cut)
        keep.append(index)
        for name, value in _features(prompt, answer, registry, task).items():
            features[name].append(value)
    if not keep:
        raise UserError(
            f"every row of the {split} set is over the length limits; raise "
            f"data.max_source_length / data.max_target_length."
        )
    kept_rows = rows.select(keep)
    for name, values in features.items():
        kept_rows = kept_rows.add_column(name, values)
    return kept_rows, report
