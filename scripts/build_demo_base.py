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
* yes/no questions about the tables or about what a complaint mentions, answered 是的 or 不是;
* comparing: two complaints side by side, whether their symptoms are the same (是的 / 不是),
  then the symptoms only one of them mentions (or 无).

The yes/no words are there because a base that never saw them could not learn a yes/no task:
its embeddings for the two were near-equal (cosine 0.65, other pairs 0.39), and LoRA on the
matching task stayed at one answer for every input (loss 1.39 per token, 6% on each word).

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
    DEPARTMENTS,
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
KINDS = {"药物": DRUGS, "身体部位": BODY_PARTS, "症状": SYMPTOM_NAMES}


def dev_complaints() -> set[str]:
    """The dev set's complaints: never in the pretraining text, so dev scores stay honest."""
    with (DATA_DIR / "demo" / "dev.jsonl").open(encoding="utf-8") as handle:
        return {text for line in handle for text in complaints_of(json.loads(line))}


class Corpus:
    """Seeded documents of the five kinds, drawn fresh for every batch (no repeats)."""

    def __init__(self, seed: str, held_out: set[str]) -> None:
        self.rng = random.Random(seed)
        self.held_out = held_out

    def document(self) -> str:
        """Plain 10%, knowledge 15%, yes/no 15%, reading 30%, comparing 30%. The mix decides
        what lora can learn on the base (BENCHMARKS.md, one build each): reading 20% and
        comparing 40% gave NER 24 and STS 71; this mix NER 100 and STS 66."""
        kind = self.rng.random()
        if kind < 0.1:
            return self.complaint()
        if kind < 0.25:
            return self.knowledge()
        if kind < 0.4:
            return self.yes_no()
        if kind < 0.7:
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

    def yes_no(self) -> str:
        """Two to four questions answered 是的 or 不是 (half each): about the tables, or whether a
        complaint mentions a term (why the base needs them: the module docstring)."""
        rng, answers = self.rng, []
        for _ in range(rng.randint(2, 4)):
            yes, kind = rng.random() < 0.5, rng.random()
            if kind < 0.35:
                symptom = rng.choice(list(SYMPTOMS))
                dept = SYMPTOMS[symptom][0]
                if not yes:
                    dept = rng.choice([d for d in DEPARTMENTS if d != dept])
                question = f"{symptom}多见于{dept}吗？"
            elif kind < 0.65:
                label = rng.choice(list(KINDS))
                pool = KINDS[label] if yes else [t for t in TERMS if t not in KINDS[label]]
                question = f"{rng.choice(pool)}是{label}吗？"
            else:
                text = self.complaint()
                found = find_entities(text, TERMS)
                term = rng.choice(found if yes else [t for t in TERMS if t not in found])
                question = f"“{text}”提到{term}了吗？"
            answers.append(f"{question}{'是的' if yes else '不是'}。")
        return "".join(answers)

    def reading(self) -> str:
        """A complaint, then the terms it mentions in order of appearance."""
        text = self.complaint()
        return f"{text}\n提到：{'、'.join(find_entities(text, TERMS))}。"

    def comparing(self) -> str:
        """Two complaints (half of them with the same symptoms in another order, the others
        mostly a near miss), whether they mention the same symptoms, then the symptoms only one
        of them mentions, or 无."""
        first = self.complaint()
        found = find_entities(first, SYMPTOM_NAMES)
        if self.rng.random() < 0.5:
            symptoms = self.rng.sample(found, len(found))
        else:
            symptoms = different_symptom_set(self.rng, found)
        texts = [first, self.complaint(symptoms)]
        a, b = (find_entities(text, SYMPTOM_NAMES) for text in texts)
        only = [s for s in a if s not in b] + [s for s in b if s not in a]
        same = "不是" if only else "是的"
        return (
            f"“{texts[0]}”和“{texts[1]}”\n两段话的症状一样吗？{same}。"
            f"症状的差别：{'、'.join(only) or '无'}。"
        )


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


PROBE_CUES = {"reading": "\n提到：", "same": "一样吗？", "difference": "差别：", "yes/no": "吗？"}


@torch.no_grad()
def probe(model, tokenizer, rows: int = 100) -> dict[str, float]:
    """What the base learnt: greedy exact-answer accuracy on fresh exercises of each skill (the
    text up to the skill's last cue is the prompt, the answer runs to the next "。")."""
    corpus = Corpus("probe", dev_complaints())
    makers = {"reading": corpus.reading, "yes/no": corpus.yes_no}
    scores = {}
    for skill, cue in PROBE_CUES.items():
        hits = 0
        for _ in range(rows):
            document = makers.get(skill, corpus.comparing)()
            cut = document.rindex(cue) + len(cue)
            prompt = tokenizer(document[:cut], return_tensors="pt")
            out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
            answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
            hits += answer.split("。")[0] == document[cut:].split("。")[0]
        scores[skill] = hits / rows
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR / "demo_base")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-only", action="store_true", help="probe the base at --out")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(DATA_DIR / "tokenizer")
    if args.probe_only:
        model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    else:
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(tiny_config(TinyModelConfig(), tokenizer))
        pretrain(model, tokenizer, args)
        model.to(torch.float16).save_pretrained(args.out)  # half the size; loaded as float32
        print(f"wrote {args.out}")
        model.float()
    print("probe:", "  ".join(f"{k} {v:.2f}" for k, v in probe(model, tokenizer).items()))


if __name__ == "__main__":
    main()
