"""Every model family through the commands, on tiny random-weight checkpoints saved with
save_pretrained: `moelora train` trains and scores each family; static-gate runs export to PEFT
and merged, and plain transformers/PEFT loads of the exports generate the answers `moelora
predict` gives. And a checkpoint with code of its own (ChatGLM-6B's kind): trust_remote_code,
then explicit target names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from moelora.adapters import get_method
from moelora.adapters.families import FAMILIES
from moelora.config import ModelConfig
from moelora.errors import UserError
from moelora.modeling import load_tokenizer
from tests.conftest import REPO
from tests.test_config import in_process
from tests.tiny_families import one_thread, save_custom_code_checkpoint, save_tiny_checkpoint

FAMILY_TYPES = sorted(FAMILIES)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


DEMO_TASKS = {"DEMO-CLS", "DEMO-GEN", "DEMO-NER", "DEMO-STS"}
TASK = "DEMO-NER"  # the task exported and predicted
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def demo_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's first 16 training rows and first dev row of each task, and a test split of
    three DEMO-NER dev rows without their targets (tokenizing the whole demo would take most of
    each run)."""
    folder = tmp_path_factory.mktemp("demo_slice")
    dev = (REPO / "data/demo/dev.jsonl").read_text(encoding="utf-8").splitlines()
    for name, keep in (("train.jsonl", 16), ("dev.jsonl", 1)):
        lines = (REPO / "data/demo" / name).read_text(encoding="utf-8").splitlines()
        _write_rows(folder / name, [json.loads(line) for line in lines], keep)
    test = [{**row, "target": ""} for row in map(json.loads, dev) if row["task_dataset"] == TASK]
    _write_rows(folder / "test.jsonl", test, 3)
    return folder


def _write_rows(path: Path, rows: list[dict], per_task: int) -> None:
    """The first `per_task` rows of each task, as JSON Lines."""
    taken: dict[str, int] = {}
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            taken[row["task_dataset"]] = taken.get(row["task_dataset"], 0) + 1
            if taken[row["task_dataset"]] <= per_task:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def train_command(capsys, data: Path, checkpoint: Path, run_dir: Path, *overrides: str):
    """`moelora train` on the demo slice: 3 steps, scored on one dev row per task."""
    return in_process(
        capsys,
        "train",
        "+experiment=demo",
        f"data.root={data}",
        f"model.name_or_path={checkpoint}",
        f"model.name={checkpoint.name}",
        "trainer.max_steps=3",
        "trainer.batch_size=4",
        "trainer.lr=1e-2",
        "eval.before=false",
        f"eval.max_new_tokens={MAX_NEW_TOKENS}",
        f"run_dir={run_dir}",
        *overrides,
    )


# -- remote code: a checkpoint whose classes live in its own files, as ChatGLM-6B's do -----------


@pytest.fixture
def custom_code_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The toy ChatGLM stand-in, with transformers copying its code under tmp_path instead of
    the user's ~/.cache/huggingface/modules (and forgetting the imported copy afterwards)."""
    import sys

    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield save_custom_code_checkpoint(tmp_path / "chatglm")
    for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
        del sys.modules[name]


def test_custom_code_needs_trust_remote_code_then_target_names(
    custom_code_checkpoint: Path, demo_slice: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Both stop before the tokenizer or the model loads (the targets are checked on the
    model's weightless skeleton)."""
    refused = train_command(capsys, demo_slice, custom_code_checkpoint, tmp_path / "a")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"moelora train: error: model.name_or_path={custom_code_checkpoint} needs its own "
        "Python code for the model (its config names classes that transformers does not have); "
        "set model.trust_remote_code=true to run that code, if you trust its source."
    )
    import moelora.train.setup as setup

    def loads(*args, **kwargs):
        raise AssertionError("the model loaded before the targets were checked")

    monkeypatch.setattr(setup, "load_tokenizer", loads)
    monkeypatch.setattr(setup, "load_base_model", loads)
    trusted = train_command(
        capsys, demo_slice, custom_code_checkpoint, tmp_path / "b", "model.trust_remote_code=true"
    )
    assert trusted.returncode == 2
    last = trusted.stderr.strip().splitlines()[-1]
    assert "not for 'chatglm'; set method.target_modules to this model's Linear names" in last
    assert "['dense', 'dense_4h_to_h', 'dense_h_to_4h', 'lm_head', 'query_key_value']" in last


def test_a_custom_code_tokenizer_needs_trust_remote_code(custom_code_checkpoint: Path) -> None:
    settings = ModelConfig(name="chatglm", name_or_path=str(custom_code_checkpoint))
    with pytest.raises(UserError) as refused:
        load_tokenizer(settings)
    assert str(refused.value) == (
        f"model.name_or_path={custom_code_checkpoint} needs its own Python code for the "
        "tokenizer (its config names classes that transformers does not have); set "
        "model.trust_remote_code=true to run that code, if you trust its source."
    )
    settings.trust_remote_code = True
    assert type(load_tokenizer(settings)).__name__ == "ToyChatGLMTokenizer"


@pytest.mark.slow
def test_custom_code_trains_and_scores_with_its_linear_names(
    custom_code_checkpoint: Path, demo_slice: Path, tmp_path: Path, capsys
) -> None:
    done = train_command(
        capsys,
        demo_slice,
        custom_code_checkpoint,
        tmp_path / "run",
        "model.trust_remote_code=true",
        "method.target_modules=[query_key_value,dense,dense_h_to_4h,dense_4h_to_h]",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["after"]["per_task"]) == DEMO_TASKS


# -- slow: every family through train, export and predict ---------------------------------------

# lora and moelora (one adapter; one per task) on every family; the other methods on the family
# with fused projections (test_commands.py runs them all on the tiny Llama).
CLI_CASES = [(t, m) for t in FAMILY_TYPES for m in ("lora", "moelora")] + [
    ("phi3", m) for m in ("molora", "contrastive", "modula", "modula_res")
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("families")
    return {t: save_tiny_checkpoint(t, folder / t) for t in FAMILY_TYPES}


@torch.no_grad()
def greedy_answers(model: PreTrainedModel, tokenizer, texts: list[str]) -> list[str]:
    """Greedy answers of a plain transformers model: the prompts left-padded in one batch."""
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    output = model.eval().generate(
        **batch,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def export_and_predict(capsys, method: str, run_dir: Path, data: Path, out: Path) -> list[str]:
    """`moelora export` (PEFT and merged) of the task, then `moelora predict`'s answers to the
    test split (per domain expert for modula, as exported)."""
    exported = in_process(
        capsys,
        "export",
        f"run_dir={run_dir}",
        f"task={TASK}",
        "formats=[peft,merged]",
        f"output_dir={out / 'export'}",
    )
    assert exported.returncode == 0, exported.stderr[-2000:]
    forced = ["eval.force_domain=true"] if get_method(method).forced_stage else []
    predicted = in_process(
        capsys,
        "predict",
        f"run_dir={run_dir}",
        f"data.root={data}",
        "data.eval_files=[test.jsonl]",
        f"output_dir={out / 'predict'}",
        *forced,
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    rows = (out / "predict" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(row)["prediction"] for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "method"), CLI_CASES)
def test_cli_trains_scores_exports_and_predicts(
    model_type, method, checkpoints, demo_slice, tmp_path, capsys
) -> None:
    checkpoint, run_dir = checkpoints[model_type], tmp_path / "run"
    done = train_command(capsys, demo_slice, checkpoint, run_dir, f"method={method}")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["after"]["per_task"]) == DEMO_TASKS
    if get_method(method).export_per is None:
        return  # routed per token: nothing to fold (the run scored, so it loaded and generated)
    answers = export_and_predict(capsys, method, run_dir, demo_slice, tmp_path)
    texts = [json.loads(line)["input"] for line in (demo_slice / "test.jsonl").open()]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    ids = tokenizer(texts[0], return_tensors="pt")
    with torch.no_grad():
        plain = base(**ids).logits
        peft = PeftModel.from_pretrained(base, tmp_path / "export" / "peft").eval()
        assert not torch.allclose(peft(**ids).logits, plain, atol=1e-4), "the adapter is empty"
    assert greedy_answers(peft, tokenizer, texts) == answers
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged")
    assert greedy_answers(merged, tokenizer, texts) == answers
