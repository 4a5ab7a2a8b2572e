"""Tokenized rows as batches for a teacher-forced loss (training, the eval loss, routing
statistics), padded or packed. Packing and grouping are there to waste less compute on padding.
A batch is always the same rows
(the mixture holds in rows, and a step's loss is the mean over those rows' answer tokens); what
changes is how they become tensors:

- `none`: each row right-padded to the batch's longest.
- `grouped`: the epoch's order is cut into windows of `group_window` batches, each window sorted
  by length and cut into batches, whose order is shuffled (seeded): a batch holds rows of similar
  length, padded as in `none`.
- `packed`: the batch's rows are concatenated into as few sequences of at most `pack_length`
  tokens as first-fit decreasing finds, with position ids restarting at every row and each
  token's row in `segment_ids` (-1 on padding). Without an attention mask, transformers attends
  within each row only (block-diagonal for sdpa and eager, varlen for flash-attention), and the
  gates read each token's task through its row (`moelora.adapters.routing`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler

from moelora.config import DataConfig
from moelora.data.formatting import IGNORE


def pad(sequences: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    padded = [
        ([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s)))
        for s in sequences
    ]
    return torch.tensor(padded, dtype=torch.long)


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the LM loss is taken over: labels after the one-token shift, minus ignored ones."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def loss_loader(
    rows: Dataset,
    batch_size: int,
    pad_id: int,
    cfg: DataConfig | None = None,
    sampler: Sampler[int] | None = None,
    seed: int = 0,
    **kwargs,
) -> DataLoader:
    """Batches of token ids, labels and routing ids for a teacher-forced loss (train or eval),
    padded or packed as `cfg.packing` says (rows padded when no cfg is given)."""
    packing = cfg.packing if cfg is not None else "none"
    collate: TrainCollator | PackingCollator = TrainCollator(pad_id)
    if packing == "packed":
        collate = PackingCollator(pad_id, cfg.packed_length)
    elif packing == "grouped":
        lengths = list(rows["length"])
        order = sampler if sampler is not None else range(len(rows))
        sampler = LengthGroupedSampler(order, lengths, batch_size, cfg.group_window, seed)
    return DataLoader(
        rows.select_columns(["input_ids", "labels", "task_ids", "domain_ids"]),
        batch_size=batch_size,
        collate_fn=collate,
        sampler=sampler,
        **kwargs,
    )


def batches_on(
    rows: Dataset,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    cfg: DataConfig | None = None,
) -> Iterator[dict]:
    """`loss_loader`'s batches (in order), moved to `device`: an eval pass over `rows`."""
    for batch in loss_loader(rows, batch_size, pad_id, cfg):
        yield {key: value.to(device) for key, value in batch.items()}


class TrainCollator:
    """Right-padded input ids, labels (-100 on prompt and padding) and task/domain ids."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        return {
            "input_ids": pad(ids, self.pad_id, left=False),
            "attention_mask": pad([[1] * len(s) for s in ids], 0, left=False),
            "labels": pad([r["labels"] for r in rows], IGNORE, left=False),
            "task_ids": torch.tensor([r["task_ids"] for r in rows], dtype=torch.long),
            "domain_ids": torch.tensor([r["domain_ids"] for r in rows], dtype=torch.long),
        }


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Row indices per pack, every pack at most `capacity` tokens: rows longest first (ties by
    index, so the packing is a function of the batch), each into the first pack it fits. A row
    longer than `capacity` (an eval row whose answer is over the limit: training rows are cut
    to fit) gets a pack of its own."""
    packs: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        slot = next((k for k, free in enumerate(room) if free >= length), None)
        if slot is None:
            packs.append([index])
            room.append(capacity - length)
        else:
            packs[slot].append(index)
            room[slot] -= length
    return [sorted(pack) for pack in packs]


class PackingCollator:
    """A batch of rows as packed sequences: input ids, labels (-100 on prompts and padding),
    position ids restarting at every row, each token's row (`segment_ids`) and each row's
    task and domain ids."""

    def __init__(self, pad_id: int, pack_length: int) -> None:
        self.pad_id, self.pack_length = pad_id, pack_length

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(r["input_ids"]) for r in rows]
        columns: dict[str, list[list[int]]] = {
            "input_ids": [],
            "labels": [],
            "position_ids": [],
            "segment_ids": [],
        }
        for pack in first_fit_decreasing(lengths, self.pack_length):
            for key in columns:
                columns[key].append([])
            for row in pack:
                columns["input_ids"][-1] += rows[row]["input_ids"]
                columns["labels"][-1] += rows[row]["labels"]
                columns["position_ids"][-1] += list(range(lengths[row]))
                columns["segment_ids"][-1] += [row] * lengths[row]
        width = max(len(ids) for ids in columns["input_ids"])
        # Padding is a sequence of its own (positions from 0), so no row attends to it.
        positions = [p + list(range(width - len(p))) for p in columns["position_ids"]]
        return {
            "input_ids": pad(columns["input_ids"], self.pad_id, left=False),
            "labels": pad(columns["labels"], IGNORE, left=False),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "segment_ids": pad(columns["segment_ids"], -1, left=False),
            "task_ids": torch.tensor([r["task_ids"] for r in rows], dtype=torch.long),
            "domain_ids": torch.tensor([r["domain_ids"] for r in rows], dtype=torch.long),
        }


class LengthGroupedSampler(Sampler[int]):
    """The wrapped sampler's epoch order, regrouped so that each run of `batch_size` indices
    holds rows of similar length (see the module docstring); `set_epoch` passes on."""

    def __init__(
        self, sampler: Sampler[int], lengths: Sequence[int], batch_size: int, window: int, seed: int
    ) -> None:
        self.sampler, self.lengths = sampler, lengths
        self.batch_size, self.window, self.seed = batch_size, window, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7)
        span, grouped = self.batch_size * self.window, []
        for start in range(0, len(order), span):
            window = sorted(order[start : start + span], key=lambda i: -self.lengths[i])
            batches = [
                window[k : k + self.batch_size] for k in range(0, len(window), self.batch_size)
            ]
            # A short last batch stays last, so every later batch keeps its rows together.
            full = len(batches) - (len(batches[-1]) < self.batch_size)
            shuffled = torch.randperm(full, generator=generator).tolist()
            for k in [*shuffled, *range(full, len(batches))]:
                grouped += batches[k]
        return iter(grouped)


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The batch's tokens that are not padding, in either layout."""
    if "segment_ids" in batch:
        return int((batch["segment_ids"] >= 0).sum())
    return int(batch["attention_mask"].sum())


def fill_rate(
    lengths: Sequence[int], order: Sequence[int], batch_size: int, pack_length: int | None
) -> float:
    """Real tokens over the tensors' tokens for the batches of `order` (in [0, 1]): padded to
    each batch's longest row, or packed into `pack_length` when given."""
    real = total = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        real += sum(batch)
        if pack_length is not None:
            packs = first_fit_decreasing(batch, pack_length)
            total += len(packs) * max(sum(batch[i] for i in pack) for pack in packs)
        else:
            total += len(batch) * max(batch)
    return real / max(total, 1)


def fill_rates(
    rows: Dataset, sampler: Sampler[int], cfg: DataConfig, batch_size: int, seed: int
) -> dict[str, float]:
    """The real tokens' share of one epoch's batch tensors (the first epoch's order), padded
    as rows come ("none") and as `cfg.packing` makes them."""
    lengths, order = list(rows["length"]), list(sampler)
    shares = {"none": fill_rate(lengths, order, batch_size, None)}
    if cfg.packing == "grouped":
        grouped = LengthGroupedSampler(order, lengths, batch_size, cfg.group_window, seed)
        shares["grouped"] = fill_rate(lengths, list(grouped), batch_size, None)
    elif cfg.packing == "packed":
        shares["packed"] = fill_rate(lengths, order, batch_size, cfg.packed_length)
    return shares
