"""Greedy, batched generation with left padding: deterministic answers for scoring."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from moelora.adapters import AdaptedModel
from moelora.data.formatting import pad
from moelora.hardware import is_zero3


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Dataset,
    batch_size: int,
    max_new_tokens: int,
    accelerator: Accelerator,
    desc: str = "generating",
) -> list[str]:
    """The decoded answer for each row, in order. Rows are sorted by prompt length so batches
    pad little; an adapted model gets each row's task/domain ids, as in training.

    The batches are shared out between the processes and the answers gathered. Every process
    runs the same number of generate calls (the last may repeat a batch whose answers are
    dropped), because under ZeRO-3 each forward gathers parameters from all of them."""
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]))
    answers: list[tuple[int, str]] = []
    device = accelerator.device
    unwrapped = accelerator.unwrap_model(model)
    routed = isinstance(unwrapped, AdaptedModel)  # a bare base model takes no task ids
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    world = accelerator.num_processes
    mine = batches[accelerator.process_index :: world]
    repeats = batches[-1:] * (-(-len(batches) // world) - len(mine))  # up to ceil(n / world)
    synced = is_zero3(accelerator) and world > 1
    for number, batch in enumerate(
        tqdm(mine + repeats, desc=desc, disable=not accelerator.is_local_main_process)
    ):
        prompts = [rows[i]["prompt_ids"] for i in batch]
        input_ids = pad(prompts, tokenizer.pad_token_id, left=True).to(device)
        attention_mask = pad([[1] * len(p) for p in prompts], 0, left=True).to(device)
        routing = {}
        if routed:
            routing = {
                "task_ids": torch.tensor([rows[i]["task_ids"] for i in batch], device=device),
                "domain_ids": torch.tensor([rows[i]["domain_ids"] for i in batch], device=device),
            }
        output = unwrapped.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **routing,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
        )
        if number >= len(mine):
            continue  # a repeat that only keeps the processes in step
        texts = tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
        answers += [(i, text.strip()) for i, text in zip(batch, texts, strict=True)]
    found = dict(gather_object(answers))
    return [found[i] for i in range(len(rows))]
