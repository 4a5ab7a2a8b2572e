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
    """The decoded answer for each row, in order, greedy. Rows are sorted by prompt length so
    batches pad little; an adapted model gets each row's task/domain ids, as in training; an
    answer ends at the first stop token (`stop_token_ids`). With `fold` and a static gate, each
    group of rows sharing a gate generates with its adapter folded into the base weights
    (`moelora.adapters.fold`: base-model speed, weights restored bitwise after). The batches
    are shared out between the processes (the same number of generate calls on each: under
    ZeRO-3 every forward gathers from all of them) and the answers gathered."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    routed = isinstance(unwrapped, AdaptedModel)  # a bare base model takes no task ids
    batches = _batches(rows, batch_size, unwrapped if routed and fold else None, accelerator)
    mine, repeats = _share(batches, accelerator)
    answers: list[tuple[int, str]] = []
    folds = any(key is not UNFOLDED for key, _ in batches)
    settings = _settings(unwrapped, routed, tokenizer, max_new_tokens, accelerator)
    stops = settings["eos_token_id"]
    with folding(unwrapped) if folds else nullcontext() as fold_into:
        folded_key = UNFOLDED
        for number, (key, batch) in enumerate(
            tqdm(mine + repeats, desc=desc, disable=not accelerator.is_local_main_process)
        ):
            if key is not UNFOLDED and key != folded_key:
                fold_into(key)
                folded_key = key
            folded, device = key is not UNFOLDED, accelerator.device
            new = _generate(unwrapped, rows, batch, folded, routed, device, settings)
            if number < len(mine):  # not a repeat that only keeps the processes in step
                answers += list(zip(batch, _decode(tokenizer, new, stops), strict=True))
    found = dict(gather_object(answers))
    return [found[i] for i in range(len(rows))]


def _settings(
    model: torch.nn.Module,
    routed: bool,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    accelerator: Accelerator,
) -> dict:
    """generate()'s settings: the stop tokens, padding, and GPUs kept in step under ZeRO-3."""
    base = model.base_model if routed else model
    stops = stop_token_ids(tokenizer, getattr(base.generation_config, "eos_token_id", None))
    return {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": stops,
        "synced_gpus": is_zero3(accelerator) and accelerator.num_processes > 1,
    }


def _share(batches: list, accelerator: Accelerator) -> tuple[list, list]:
    """(this process's batches, repeats of the last batch): every process makes
    ceil(batches / processes) generate calls."""
    world = accelerator.num_processes
    mine = batches[accelerator.process_index :: world]
    return mine, batches[-1:] * (-(-len(batches) // world) - len(mine))


def _generate(
    model: torch.nn.Module,
    rows: Dataset,
    batch: list[int],
    folded: bool,
    routed: bool,
    device: torch.device,
    settings: dict,
) -> torch.Tensor:
    """One batch's new tokens, greedy: through the base with the adapter folded in, or through
    the adapted model with the rows' task/domain ids (a bare base model takes none)."""
    prompts = [rows[i]["prompt_ids"] for i in batch]
    input_ids = pad(prompts, settings["pad_token_id"], left=True).to(device)
    attention_mask = pad([[1] * len(p) for p in prompts], 0, left=True).to(device)
    routing = {}
    if routed and not folded:
        routing = {
            name: torch.tensor([rows[i][name] for i in batch], device=device)
            for name in ("task_ids", "domain_ids")
        }
    generate = model.base_model.generate if folded else model.generate
    output = generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        **routing,
        do_sample=False,
        num_beams=1,
        **settings,
    )
    return output[:, input_ids.shape[1] :]


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
