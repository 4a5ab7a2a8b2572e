"""Greedy, batched generation with left padding: deterministic answers for scoring."""

from __future__ import annotations

from collections.abc import Hashable
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from moelora.adapters import AdaptedModel
from moelora.adapters.fold import fold_blocker, fold_key, folding, is_static
from moelora.data.batching import pad
from moelora.data.formatting import stop_token_ids
from moelora.hardware import is_zero3
from moelora.log import get_logger

log = get_logger(__name__)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Dataset,
    batch_size: int,
    max_new_tokens: int,
    accelerator: Accelerator,
    desc: str = "generating",
    fold: bool = True,
) -> list[str]:
    """The decoded answer for each row, in order. Rows are sorted by prompt length so batches
    pad little; an adapted model gets each row's task/domain ids, as in training. An answer
    ends at the chat template's end-of-turn token, the tokenizer's eos or the base model's own
    eos ids (`stop_token_ids`), whichever comes first.

    With `fold` and a static gate (lora, moelora, modula with a forced domain), the rows are
    grouped by what their gate depends on and each group generates with its adapter folded into
    the base weights (`moelora.adapters.fold`): base-model speed, weights restored bitwise after.

    The batches are shared out between the processes and the answers gathered. Every process
    runs the same number of generate calls (the last may repeat a batch whose answers are
    dropped), because under ZeRO-3 each forward gathers parameters from all of them."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    routed = isinstance(unwrapped, AdaptedModel)  # a bare base model takes no task ids
    batches = _batches(rows, batch_size, unwrapped if routed and fold else None, accelerator)
    world = accelerator.num_processes
    mine = batches[accelerator.process_index :: world]
    repeats = batches[-1:] * (-(-len(batches) // world) - len(mine))  # up to ceil(n / world)
    synced = is_zero3(accelerator) and world > 1
    answers: list[tuple[int, str]] = []
    device = accelerator.device
    folds = any(key is not UNFOLDED for key, _ in batches)
    base = unwrapped.base_model if routed else unwrapped
    stops = stop_token_ids(tokenizer, getattr(base.generation_config, "eos_token_id", None))
    with folding(unwrapped) if folds else nullcontext() as fold_into:
        folded_key = UNFOLDED
        for number, (key, batch) in enumerate(
            tqdm(mine + repeats, desc=desc, disable=not accelerator.is_local_main_process)
        ):
            if key is not UNFOLDED and key != folded_key:
                fold_into(key)
                folded_key = key
            prompts = [rows[i]["prompt_ids"] for i in batch]
            input_ids = pad(prompts, tokenizer.pad_token_id, left=True).to(device)
            attention_mask = pad([[1] * len(p) for p in prompts], 0, left=True).to(device)
            generate = unwrapped.base_model.generate if key is not UNFOLDED else unwrapped.generate
            routing = {}
            if routed and key is UNFOLDED:
                routing = {
                    "task_ids": torch.tensor([rows[i]["task_ids"] for i in batch], device=device),
                    "domain_ids": torch.tensor(
                        [rows[i]["domain_ids"] for i in batch], device=device
                    ),
                }
            output = generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **routing,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops,
                synced_gpus=synced,
            )
            if number >= len(mine):
                continue  # a repeat that only keeps the processes in step
            texts = _decode(tokenizer, output[:, input_ids.shape[1] :], stops)
            answers += list(zip(batch, texts, strict=True))
    found = dict(gather_object(answers))
    return [found[i] for i in range(len(rows))]


def _decode(tokenizer: PreTrainedTokenizerBase, new: torch.Tensor, stops: list[int]) -> list[str]:
    """Each row's answer: its new tokens up to the first stop token (what follows is padding),
    decoded without special tokens and stripped."""
    rows = []
    for row in new.tolist():
        rows.append(row[: next((i for i, token in enumerate(row) if token in stops), len(row))])
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


UNFOLDED = object()  # the key of a batch that generates through the adapter, unfolded


def _batches(
    rows: Dataset, batch_size: int, model: AdaptedModel | None, accelerator: Accelerator
) -> list[tuple[Hashable, list[int]]]:
    """(fold key, row indices) of each generate call: rows grouped by the key their folded
    weights depend on (one group when `model` is None or cannot fold), sorted by prompt length
    within a group. A model that cannot fold for a reason the user can change gets a note."""
    lengths = [len(p) for p in rows["prompt_ids"]]
    keys: list[Hashable] = [UNFOLDED] * len(rows)
    if model is not None and is_static(model):
        blocker = fold_blocker(model)
        if blocker is None:
            keys = [
                fold_key(model, task, domain)
                for task, domain in zip(rows["task_ids"], rows["domain_ids"], strict=True)
            ]
        elif accelerator.is_main_process:
            log.info(f"note: generating through the unfolded adapter, as {blocker}.")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    batches = []
    for key, members in groups.items():
        members.sort(key=lambda i: lengths[i])
        batches += [(key, members[i : i + batch_size]) for i in range(0, len(members), batch_size)]
    return batches
