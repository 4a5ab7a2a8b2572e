"""Every model family moelora knows (moelora/adapters/families.py) with every method preset, on
tiny random-weight checkpoints built offline. Fast: the default targets are the family's
attention and MLP projections (read from the module tree, not from the table), a few training
steps reach every adapted layer, and a saved adapter reloads to the same logits. Slow: the CLI
trains and scores each family, exports static-gate runs, and plain transformers/PEFT loads of
the exports generate the tokens `moelora predict` gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from moelora.adapters import (
    AdaptedModel,
    AdapterConfig,
    find_targets,
    get_method,
    load_adapter,
    save_adapter,
)
from moelora.adapters.families import FAMILIES
from moelora.config import ModelConfig
from moelora.errors import UserError
from moelora.modeling import load_tokenizer
from tests.conftest import REPO
from tests.test_config import in_process
from tests.tiny_families import (
    METHODS,
    expected_targets,
    method_presets,
    role_of,
    save_custom_code_checkpoint,
    save_tiny_checkpoint,
    tiny_model,
)

FAMILY_TYPES = sorted(FAMILIES)
NUM_TASKS, NUM_DOMAINS = 3, 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy CPU their synchronisation
    makes each step many times slower (as in tests/adapters/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def presets() -> dict[str, AdapterConfig]:
    return method_presets()


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_name_in_the_table_is_a_linear_of_the_family(model_type: str) -> None:
    model = tiny_model(model_type)
    linears = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for role, names in FAMILIES[model_type].items():
        assert set(names) <= linears, (role, names)
        assert all(role_of(model, p) == role for p, _ in _paths_named(model, names))


def _paths_named(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if p.rpartition(".")[2] in names]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_default_targets_are_the_familys_projections(model_type, method, presets) -> None:
    model = tiny_model(model_type)
    expected = expected_targets(model, presets[method])
    assert expected, "the preset names no role"
    assert find_targets(model, presets[method]) == expected


def test_another_familys_names_are_named_in_a_warning(capsys) -> None:
    llama_names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = AdapterConfig.coerce({"name": "lora", "target_modules": llama_names})
    found = find_targets(tiny_model("glm4"), config)  # GLM fuses gate and up: gate_up_proj
    assert not any(path.endswith("gate_up_proj") for path in found)
    assert (
        "warning: method.target_modules names ['gate_proj', 'up_proj'], which no Linear of this "
        "model has (its Linear names: ['down_proj', 'gate_up_proj', 'k_proj', 'lm_head', "
        "'o_proj', 'q_proj', 'v_proj']); those are left out."
    ) in capsys.readouterr().out


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (2, 8), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding, as in generation
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=input_ids.masked_fill(attention_mask == 0, -100),
        task_ids=torch.tensor([0, 2]),
        domain_ids=torch.tensor([1, 0]),
    )


def _train(model: AdaptedModel, batch: dict, steps: int) -> None:
    """A few AdamW steps; after the first backward every adapted layer has a gradient."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        model(**batch).loss.backward()
        if step == 0:
            for name, layer in model.adapted_layers.items():
                grads = [p.grad for n, p in layer.named_parameters() if n.startswith("lora_B")]
                assert any(g is not None and g.abs().sum() > 0 for g in grads), name
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_trains_saves_and_reloads(model_type, method, presets, tmp_path) -> None:
    model = AdaptedModel(tiny_model(model_type), presets[method], NUM_TASKS, NUM_DOMAINS)
    batch = _batch(model.base_model.config.vocab_size)
    _train(model, batch, steps=2)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        trained = model(**inputs).logits
        plain = tiny_model(model_type)(inputs["input_ids"], inputs["attention_mask"]).logits
    assert not torch.allclose(trained, plain, atol=1e-4), "training changed nothing"
    save_adapter(model, tmp_path)
    reloaded, _ = load_adapter(tmp_path, tiny_model(model_type))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, trained)


def test_roles_on_an_unknown_model_type_name_the_fields_to_set(presets) -> None:
    from tests.adapters.adapter_cases import tiny_gpt2

    with pytest.raises(ValueError) as caught:  # molora: target_modules [mlp], dense [attention]
        AdaptedModel(tiny_gpt2(), presets["molora"], NUM_TASKS)
    assert str(caught.value) == (
        "method.dense_targets=['attention'] and method.target_modules=['mlp'] name the roles "
        "attention/mlp, which moelora knows only for the model types "
        f"{', '.join(FAMILY_TYPES)}, not for 'gpt2'; set method.dense_targets and "
        "method.target_modules to this model's Linear names instead (some of ['c_attn', "
        "'c_fc', 'c_proj', 'lm_head'])."
    )


# -- through the CLI --------------------------------------------------------------------------

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
    custom_code_checkpoint: Path, demo_slice: Path, tmp_path: Path, capsys
) -> None:
    refused = train_command(capsys, demo_slice, custom_code_checkpoint, tmp_path / "a")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"moelora train: error: model.name_or_path={custom_code_checkpoint} needs its own "
        "Python code for the model (its config names classes that transformers does not have); "
        "set model.trust_remote_code=true to run that code, if you trust its source."
    )
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
