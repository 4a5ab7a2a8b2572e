"""Build the demo's base model: the tiny Llama of `configs/model/tiny.yaml` pretrained on text
about the demo's world, saved as a transformers checkpoint folder (`data/demo_base/`, fp16).

Why: a random tiny model warmed up on the task inputs learns the answer formats but not the content
(measured: lora NER 5.4, CLS 8.0 after training), so the demo could not tell methods apart. A real
LLM comes to fine-tuning knowing facts and able to read; this base is given the same two skills,
never a task's instruction or answer format:

* plain text: fresh complaints from the demo's generator (a different seed from the dataset);
* knowledge: short encyclopedia sentences about the world's tables (a symptom's department and
  drug, which words are drugs or body parts), in several wordings;
* reading: a complaint followed by "提到：" and the terms it mentions, in order, untyped. It teaches
  the attention that finds and copies terms from a context; which type a term has, which one
  comes first and what a task wants stay for fine-tuning to learn;
* comparing: two complaints side by side, then the symptoms only one of them mentions (or 无).

    python scripts/build_demo_base.py                  # writes data/demo_base/
    python scripts/build_demo_base.py --steps 500 --out /tmp/base

Seeded: the same arguments give the same weights on the same torch build.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from build_demo_data import (
    BODY_PARTS,
    DRUGS,
    SYMPTOM_NAMES,
    SYMPTOMS,
    complaints_of,
    different_symptom_set,
    find_entities,
    make_complaint,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelora.config import TinyModelConfig
from moelora.modeling import tiny_config
from moelora.paths import DATA_DIR

TERMS = (*SYMPTOMS, *DRUGS, *BODY_PARTS)
SYMPTOM_FACTS = (
    "{s}是常见症状，多见于{dept}，常用{drug}。",
    "出现{s}的患者一般看{dept}，可用{drug}缓解。",
    "{s}属于{dept}的病症，药物可选{drug}。",
)
DRUG_FACTS = ("{d}是一种常用药物。", "{d}是药物。", "药物{d}需按说明服用。")
PART_FACTS = ("{p}是身体部位。", "{p}属于身体的一部分。")


def dev_complaints() -> set[str]:
    """The dev set's complaints: never in the pretraining text, so dev scores stay honest."""
    with (DATA_DIR / "demo" / "dev.jsonl").open(encoding="utf-8") as handle:
        return {text for line in handle for text in complaints_of(json.loads(line))}


class Corpus:
    """Seeded documents of the four kinds, drawn fresh for every batch (no repeats)."""

    def __init__(self, seed: str, held_out: set[str]) -> None:
        self.rng = random.Random(seed)
        self.held_out = held_out

    def document(self) -> str:
        kind = self.rng.random()
        if kind < 0.15:
            return self.complaint()
        if kind < 0.35:
            return self.knowledge()
        if kind < 0.6:
            return self.reading()
        return self.comparing()

    def complaint(self, symptoms: list[str] | None = None) -> str:
        """A complaint from the demo's generator that is not one of the held-out ones."""
        while (text := make_complaint(self.rng, symptoms).text) in self.held_out:
            pass
        return text

    def knowledge(self) -> str:
        """Three to six facts about random entries of the world's tables."""
        rng, facts = self.rng, []
        for _ in range(rng.randint(3, 6)):
            kind = rng.random()
            if kind < 0.6:
                symptom = rng.choice(list(SYMPTOMS))
                dept, drug = SYMPTOMS[symptom]
                facts.append(rng.choice(SYMPTOM_FACTS).format(s=symptom, dept=dept, drug=drug))
            elif kind < 0.8:
                facts.append(rng.choice(DRUG_FACTS).format(d=rng.choice(DRUGS)))
            else:
                facts.append(rng.choice(PART_FACTS).format(p=rng.choice(BODY_PARTS)))
        return "".join(facts)

    def reading(self) -> str:
        """A complaint, then the terms it mentions in order of appearance."""
        text = self.complaint()
        return f"{text}\n提到：{'、'.join(find_entities(text, TERMS))}。"

    def comparing(self) -> str:
        """Two complaints (half of them with the same symptoms in another order, the others
        mostly a near miss), then the symptoms only one of them mentions, or 无."""
        first = self.complaint()
        found = find_entities(first, SYMPTOM_NAMES)
        if self.rng.random() < 0.5:
            symptoms = self.rng.sample(found, len(found))
        else:
            symptoms = different_symptom_set(self.rng, found)
        texts = [first, self.complaint(symptoms)]
        a, b = (find_entities(text, SYMPTOM_NAMES) for text in texts)
        only = [s for s in a if s not in b] + [s for s in b if s not in a]
        return f"“{texts[0]}”和“{texts[1]}”\n两段话症状的差别：{'、'.join(only) or '无'}。"


def pretrain(model, tokenizer, args: argparse.Namespace) -> None:
    """Full-parameter language modelling on freshly generated documents (no repeats)."""
    corpus = Corpus(f"demo-base-{args.seed}", dev_complaints())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps)),
    )
    model.train()
    started = time.perf_counter()
    for step in range(args.steps):
        texts = [corpus.document() + tokenizer.eos_token for _ in range(args.batch)]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - started
            print(f"step {step:>5}  loss {loss.item():.4f}  {elapsed:.0f} s", flush=True)
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR / "demo_base")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(DATA_DIR / "tokenizer")
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(tiny_config(TinyModelConfig(), tokenizer))
    pretrain(model, tokenizer, args)
    model.to(torch.float16).save_pretrained(args.out)  # half the size; loaded as float32
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
