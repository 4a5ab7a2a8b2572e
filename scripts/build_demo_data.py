"""Build the embedded demo dataset and the small byte-level BPE tokenizer shipped with moelora.

Why this exists: the real PromptCBLUE data cannot be redistributed and real LLMs do not fit a CPU
smoke test, yet the CLI, the trainer, the MoE-LoRA router and the scorer all need a multi-task
dataset whose tasks *interfere* (the same kind of input needs a different answer per task) to be
exercised end to end in seconds. This script writes such a dataset, in PromptCBLUE's exact row
and answer formats so that one scorer serves both, plus a tiny tokenizer trained on it.

Outputs (under ``--out``, default: the repository's ``data/`` folder)::

    demo/train.jsonl   2,000 rows (500 per task)
    demo/dev.jsonl       160 rows (40 per task), complaints disjoint from train
    tokenizer/         byte-level BPE, ``PreTrainedTokenizerFast.save_pretrained`` layout

The world is a fixed set of tables (symptoms -> department and preferred drug, drugs, body
parts). A single complaint generator feeds all four tasks; only the instruction tells the model
which answer is wanted, and every target is exactly derivable from the input by the rules below:

* ``DEMO-CLS`` (cls): the department of the first symptom mentioned.
* ``DEMO-STS`` (matching): "是的" iff both complaints mention the same symptom set.
* ``DEMO-NER`` (ner): symptoms, drugs and body parts, in order of appearance.
* ``DEMO-GEN`` (report_generation): advice naming the department and the preferred drug of the
  first symptom.

Tokenizer contract: byte-level (any text tokenizes, ``decode`` round-trips exactly), special
tokens ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, and **no bos/eos is ever added automatically**
(``tok("abc")`` == ``tok.encode("abc", add_special_tokens=False)``); the trainer appends ``</s>`` to
targets itself. No chat template. BPE is trained on the corpus cut at entity boundaries, so every
symptom, drug and body part is a whole token sequence of its own wherever it appears.

Everything is seeded: re-running the script produces byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "data"
DEFAULT_SEED = 20240601
DEFAULT_VOCAB_SIZE = 1536  # an upper bound: the demo corpus saturates at ~750 tokens

TRAIN_PER_TASK = 500
DEV_PER_TASK = 40
MIN_COMPLAINT_CHARS = 20
MAX_COMPLAINT_CHARS = 60

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2 in this order

# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------

DEPARTMENTS: tuple[str, ...] = ("呼吸内科", "消化内科", "神经内科", "心血管内科", "皮肤科")

DRUGS: tuple[str, ...] = (
    "布洛芬",
    "对乙酰氨基酚",
    "氨溴索",
    "阿莫西林",
    "奥美拉唑",
    "蒙脱石散",
    "甲钴胺",
    "艾司唑仑",
    "阿司匹林",
    "氯雷他定",
)

BODY_PARTS: tuple[str, ...] = ("头部", "胸部", "腹部", "背部", "颈部", "咽喉", "腰部", "手臂")

# symptom -> (department, preferred drug); insertion order is the canonical order.
SYMPTOMS: dict[str, tuple[str, str]] = {
    "咳嗽": ("呼吸内科", "氨溴索"),
    "咳痰": ("呼吸内科", "氨溴索"),
    "发热": ("呼吸内科", "对乙酰氨基酚"),
    "咽痛": ("呼吸内科", "阿莫西林"),
    "气喘": ("呼吸内科", "氨溴索"),
    "腹痛": ("消化内科", "奥美拉唑"),
    "腹泻": ("消化内科", "蒙脱石散"),
    "恶心": ("消化内科", "奥美拉唑"),
    "呕吐": ("消化内科", "蒙脱石散"),
    "反酸": ("消化内科", "奥美拉唑"),
    "头痛": ("神经内科", "布洛芬"),
    "头晕": ("神经内科", "甲钴胺"),
    "失眠": ("神经内科", "艾司唑仑"),
    "手麻": ("神经内科", "甲钴胺"),
    "胸闷": ("心血管内科", "阿司匹林"),
    "心悸": ("心血管内科", "阿司匹林"),
    "水肿": ("心血管内科", "阿司匹林"),
    "皮疹": ("皮肤科", "氯雷他定"),
    "瘙痒": ("皮肤科", "氯雷他定"),
    "脱皮": ("皮肤科", "氯雷他定"),
}
SYMPTOM_NAMES: tuple[str, ...] = tuple(SYMPTOMS)

# Filler phrases. None of them may contain an entity name (checked by `check_world`).
OPENERS: tuple[str, ...] = ("患者自述", "患者诉", "病人主诉", "就诊者反映", "患者近日", "主诉：")
PART_CLAUSES: tuple[str, ...] = ("{part}不适，", "{part}隐隐不舒服，", "感觉{part}不舒服，")
DURATIONS: tuple[str, ...] = ("", "", "，持续三天", "，已有两周", "，约一个月", "，反复发作半年")
DRUG_CLAUSES: tuple[str, ...] = (
    "，服用{drug}后未缓解",
    "，自行服用{drug}，效果不明显",
    "，服用{drug}后稍有好转",
    "，吃过{drug}但症状加重",
)

TASKS: tuple[str, ...] = ("DEMO-CLS", "DEMO-STS", "DEMO-NER", "DEMO-GEN")
TASK_TYPES: dict[str, str] = {
    "DEMO-CLS": "cls",
    "DEMO-STS": "matching",
    "DEMO-NER": "ner",
    "DEMO-GEN": "report_generation",
}
STS_CHOICES: list[str] = ["是的", "不是"]
NER_TYPES: tuple[str, ...] = ("症状", "药物", "身体部位")


@dataclass(frozen=True)
class Complaint:
    """A generated complaint sentence and the entities it was built from, in order."""

    text: str
    symptoms: tuple[str, ...]
    drug: str | None
    body_part: str | None


def check_world() -> None:
    """Assert that entity scanning is unambiguous: no name is a substring of another or a filler."""
    names = list(SYMPTOM_NAMES) + list(DRUGS) + list(BODY_PARTS)
    assert len(set(names)) == len(names), "duplicate entity names"
    for a in names:
        for b in names:
            assert a == b or a not in b, f"entity {a!r} is a substring of {b!r}"
    fillers = OPENERS + PART_CLAUSES + DURATIONS + DRUG_CLAUSES + ("，伴有", "和", "、", "。")
    for filler in fillers:
        for name in names:
            assert name not in filler, f"filler {filler!r} contains entity {name!r}"
    for dept, drug in SYMPTOMS.values():
        assert dept in DEPARTMENTS and drug in DRUGS


# --------------------------------------------------------------------------------------------
# Rules: everything a target depends on, recomputable from the input text alone
# --------------------------------------------------------------------------------------------


def find_entities(text: str, names: Iterable[str]) -> list[str]:
    """Return the names occurring in ``text``, ordered by first occurrence (each at most once)."""
    hits = [(text.find(name), name) for name in names if name in text]
    return [name for _, name in sorted(hits)]


def department_for(symptoms: Sequence[str]) -> str:
    """CLS rule: the department of the first symptom."""
    return SYMPTOMS[symptoms[0]][0]


def advice_for(symptoms: Sequence[str]) -> str:
    """GEN rule: department and preferred drug of the first symptom."""
    dept, drug = SYMPTOMS[symptoms[0]]
    return f"建议到{dept}就诊，可服用{drug}，注意休息。"


def ner_target(symptoms: Sequence[str], drugs: Sequence[str], parts: Sequence[str]) -> str:
    """NER rule, PromptCBLUE format: one line per type, empty after the colon when none."""
    lines = ["上述句子中的实体包含："]
    for type_name, items in zip(NER_TYPES, (symptoms, drugs, parts), strict=True):
        lines.append(f"{type_name}实体：{'，'.join(items)}")
    return "\n".join(lines)


def sts_target(symptoms_a: Iterable[str], symptoms_b: Iterable[str]) -> str:
    """STS rule: same symptom set (order and wording ignored)."""
    return "是的" if set(symptoms_a) == set(symptoms_b) else "不是"


def cls_input(complaint: str, options: Sequence[str]) -> str:
    return f"{complaint}\n这位患者应该挂哪个科室？\n选项：{'，'.join(options)}\n答："


def sts_input(complaint_a: str, complaint_b: str) -> str:
    question = f"“{complaint_a}”和“{complaint_b}”描述的是同一组症状吗？"
    return f"{question}\n选项：{'，'.join(STS_CHOICES)}\n答："


def ner_input(complaint: str) -> str:
    return f"实体识别：\n{complaint}\n实体类型：{'，'.join(NER_TYPES)}\n答："


def gen_input(complaint: str) -> str:
    return f"{complaint}\n请给出就诊建议。\n答："


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------


def _join_symptoms(rng: random.Random, symptoms: Sequence[str]) -> str:
    if len(symptoms) == 1:
        return symptoms[0]
    if len(symptoms) == 2:
        a, b = symptoms
        return rng.choice((f"{a}，伴有{b}", f"{a}和{b}", f"{a}、{b}"))
    a, b, c = symptoms
    return rng.choice((f"{a}、{b}，伴有{c}", f"{a}、{b}和{c}", f"{a}，伴有{b}和{c}"))


def make_complaint(rng: random.Random, symptoms: Sequence[str] | None = None) -> Complaint:
    """Generate one complaint; ``symptoms`` fixes the symptoms *and their order* when given."""
    if symptoms is None:
        symptoms = rng.sample(SYMPTOM_NAMES, rng.choice((1, 1, 2, 2, 2, 3)))
    for _ in range(1000):
        part = rng.choice(BODY_PARTS) if rng.random() < 0.4 else None
        drug = rng.choice(DRUGS) if rng.random() < 0.5 else None
        text = rng.choice(OPENERS)
        if part is not None:
            text += rng.choice(PART_CLAUSES).format(part=part)
        text += _join_symptoms(rng, symptoms) + rng.choice(DURATIONS)
        if drug is not None:
            text += rng.choice(DRUG_CLAUSES).format(drug=drug)
        text += "。"
        if MIN_COMPLAINT_CHARS <= len(text) <= MAX_COMPLAINT_CHARS:
            return Complaint(text, tuple(symptoms), drug, part)
    raise RuntimeError(f"cannot build a complaint of acceptable length from {symptoms}")


def _fresh_complaint(
    rng: random.Random, avoid: set[str], symptoms: Sequence[str] | None = None
) -> Complaint:
    """A complaint whose text is not in ``avoid`` (best effort: gives up after many tries)."""
    complaint = make_complaint(rng, symptoms)
    for _ in range(200):
        if complaint.text not in avoid:
            break
        complaint = make_complaint(rng, symptoms)
    return complaint


def different_symptom_set(rng: random.Random, symptoms: Sequence[str]) -> list[str]:
    """A symptom list whose *set* differs from ``symptoms``; mostly a near miss (hard negative)."""
    current = list(symptoms)
    others = [s for s in SYMPTOM_NAMES if s not in current]
    moves = ["swap", "random"]
    if len(current) < 3:
        moves.append("add")
    if len(current) > 1:
        moves.append("drop")
    move = rng.choice(moves)
    if move == "swap":
        current[rng.randrange(len(current))] = rng.choice(others)
    elif move == "add":
        current.insert(rng.randrange(len(current) + 1), rng.choice(others))
    elif move == "drop":
        current.pop(rng.randrange(len(current)))
    else:
        current = rng.sample(SYMPTOM_NAMES, rng.choice((1, 2, 3)))
    if set(current) == set(symptoms):  # "random" may hit the same set by chance
        return different_symptom_set(rng, symptoms)
    rng.shuffle(current)
    return current


def _row(task: str, input_text: str, target: str, choices: list[str] | None) -> dict[str, object]:
    return {
        "input": input_text,
        "target": target,
        "answer_choices": choices,
        "task_type": TASK_TYPES[task],
        "task_dataset": task,
    }


def make_row(task: str, rng: random.Random, avoid: set[str], index: int) -> dict[str, object]:
    """One row of ``task``; ``index`` balances the STS labels (even -> 是的)."""
    if task == "DEMO-STS":
        a = _fresh_complaint(rng, avoid)
        if index % 2 == 0:
            order = list(a.symptoms)
            rng.shuffle(order)
            b = _fresh_complaint(rng, avoid | {a.text}, order)
        else:
            b = _fresh_complaint(rng, avoid | {a.text}, different_symptom_set(rng, a.symptoms))
        if rng.random() < 0.5:
            a, b = b, a
        target = sts_target(a.symptoms, b.symptoms)
        return _row(task, sts_input(a.text, b.text), target, list(STS_CHOICES))

    c = _fresh_complaint(rng, avoid)
    if task == "DEMO-CLS":
        options = list(DEPARTMENTS)
        rng.shuffle(options)
        return _row(task, cls_input(c.text, options), department_for(c.symptoms), options)
    if task == "DEMO-NER":
        drugs = [c.drug] if c.drug else []
        parts = [c.body_part] if c.body_part else []
        target = ner_target(c.symptoms, drugs, parts)
        return _row(task, ner_input(c.text), target, list(NER_TYPES))
    if task == "DEMO-GEN":
        return _row(task, gen_input(c.text), advice_for(c.symptoms), None)
    raise ValueError(f"unknown task {task!r}")


def expected_target(row: dict[str, object]) -> str:
    """Recompute a row's target from its input text alone, by the task's rule."""
    complaints = complaints_of(row)
    symptoms = [find_entities(c, SYMPTOM_NAMES) for c in complaints]
    task = row["task_dataset"]
    if task == "DEMO-CLS":
        return department_for(symptoms[0])
    if task == "DEMO-GEN":
        return advice_for(symptoms[0])
    if task == "DEMO-STS":
        return sts_target(symptoms[0], symptoms[1])
    drugs = find_entities(complaints[0], DRUGS)
    parts = find_entities(complaints[0], BODY_PARTS)
    return ner_target(symptoms[0], drugs, parts)


def complaints_of(row: dict[str, object]) -> list[str]:
    """The complaint sentence(s) embedded in a row's input (recovered from the templates)."""
    text = str(row["input"])
    task = row["task_dataset"]
    if task == "DEMO-STS":
        body = text.split("”描述的是同一组症状吗？")[0]
        a, b = body[1:].split("”和“")
        return [a, b]
    if task == "DEMO-NER":
        return [text.split("\n")[1]]
    return [text.split("\n")[0]]


def build_split(
    split: str, per_task: int, seed: int, avoid: set[str] | None = None
) -> list[dict[str, object]]:
    """All rows of one split, shuffled across tasks, with ``sample_id`` assigned in file order."""
    avoid = set() if avoid is None else avoid
    rows: list[dict[str, object]] = []
    for task in TASKS:
        rng = random.Random(f"{seed}-{split}-{task}")  # str seeds hash with sha512: stable
        seen_inputs: set[str] = set()
        index = 0
        while len(seen_inputs) < per_task:
            row = make_row(task, rng, avoid, index)
            if row["input"] in seen_inputs:
                continue
            seen_inputs.add(str(row["input"]))
            rows.append(row)
            index += 1
    random.Random(f"{seed}-{split}-order").shuffle(rows)
    return [{**row, "sample_id": f"demo-{split}-{i:06d}"} for i, row in enumerate(rows)]


def write_jsonl(path: Path, rows: Iterable[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


ENTITY_PATTERN = re.compile(
    "("
    + "|".join(
        re.escape(name)
        for name in sorted((*SYMPTOM_NAMES, *DRUGS, *BODY_PARTS), key=len, reverse=True)
    )
    + ")"
)


def tokenizer_training_pieces(texts: Iterable[str]) -> list[str]:
    """Cut ``texts`` at entity boundaries so that BPE never learns a token spanning an entity edge.

    The corpus is so templated that plain BPE would fuse frequent neighbours ("胸闷和反酸") into one
    token; the tokens of every entity would then depend on its context and the NER/CLS rules would
    be much harder to learn. Training on pieces keeps every entity a whole, stand-alone token
    sequence while template phrases still compress to a few tokens.
    """
    return [piece for text in texts for piece in ENTITY_PATTERN.split(text) if piece]


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it for ``transformers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Deliberately no bos/eos template: encode() never adds <s> or </s> (transformers 5 stores an
    # empty TemplateProcessing, the same thing).
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def _portable_tokenizer_config(path: Path) -> None:
    """Name the class ``PreTrainedTokenizerFast`` so transformers 4.x loads the folder too.

    transformers 5 writes ``TokenizersBackend``, a name 4.x does not know; 5.x treats
    ``PreTrainedTokenizerFast`` as an alias of the same class.
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def token_stats(
    tokenizer: PreTrainedTokenizerBase, rows: Iterable[dict[str, object]]
) -> dict[str, tuple[float, float]]:
    """Average token counts of input and target per task (no special tokens)."""
    sums: dict[str, list[int]] = {}
    for row in rows:
        acc = sums.setdefault(str(row["task_dataset"]), [0, 0, 0])
        acc[0] += len(tokenizer.encode(str(row["input"]), add_special_tokens=False))
        acc[1] += len(tokenizer.encode(str(row["target"]), add_special_tokens=False))
        acc[2] += 1
    return {task: (a / n, b / n) for task, (a, b, n) in sorted(sums.items())}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def build(out: Path, seed: int = DEFAULT_SEED, vocab_size: int = DEFAULT_VOCAB_SIZE) -> None:
    """Write ``demo/train.jsonl``, ``demo/dev.jsonl`` and ``tokenizer/`` under ``out``."""
    check_world()
    train = build_split("train", TRAIN_PER_TASK, seed)
    train_complaints = {c for row in train for c in complaints_of(row)}
    dev = build_split("dev", DEV_PER_TASK, seed, avoid=train_complaints)
    for row in (*train, *dev):
        assert row["target"] == expected_target(row), row
    write_jsonl(out / "demo" / "train.jsonl", train)
    write_jsonl(out / "demo" / "dev.jsonl", dev)

    corpus = [str(row[key]) for row in train for key in ("input", "target")]
    tokenizer = train_tokenizer(tokenizer_training_pieces(corpus), vocab_size)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    _portable_tokenizer_config(out / "tokenizer" / "tokenizer_config.json")

    print(f"wrote {len(train)} train and {len(dev)} dev rows to {out / 'demo'}")
    print(f"tokenizer: {len(tokenizer)} tokens, ids pad/bos/eos = ", end="")
    print(f"{tokenizer.pad_token_id}/{tokenizer.bos_token_id}/{tokenizer.eos_token_id}")
    for task, (n_in, n_tgt) in token_stats(tokenizer, train).items():
        print(f"  {task:9s} avg tokens: input {n_in:5.1f}  target {n_tgt:5.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output data folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)
    build(args.out, args.seed, args.vocab_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
