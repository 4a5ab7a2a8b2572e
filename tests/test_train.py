"""End-to-end training on the demo data with a very small model: the loss falls, the run
directory is complete, re-scoring reproduces the report, and resume equals an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moelora.train.recipe import train
from tests.conftest import TINY_SHAPE, compose_config

pytestmark = pytest.mark.slow  # end-to-end runs: `pytest -m 'not slow'` skips them

SMALL = [
    "+experiment=demo",
    *TINY_SHAPE,
    "model.tiny.pretrain_steps=100",
    "model.tiny.pretrain_lr=3e-3",
    "data.max_eval_samples_per_task=4",
    "trainer.batch_size=8",
    "trainer.lr=1e-2",
    "trainer.log_every=5",
    "trainer.eval_every=0",
    "eval.batch_size=16",
    "eval.max_new_tokens=12",
]


def run(tmp: Path, *overrides: str) -> dict:
    return train(compose_config("train", [*SMALL, *overrides], tmp))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, run(run_dir, "trainer.max_steps=80", "method=moelora", "method.num_experts=2")


def test_loss_goes_down(finished_run) -> None:
    _, metrics = finished_run
    info = metrics["info"]
    assert info["train_loss_last"] < 0.7 * info["train_loss_first"]
    assert info["steps"] == 80


def test_run_directory_holds_everything(finished_run) -> None:
    run_dir, metrics = finished_run
    for name in (
        "config.yaml",
        "tasks.json",
        "metrics.json",
        "report.md",
        "predictions_before.jsonl",
        "predictions_after.jsonl",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "train").rglob("events.out.tfevents.*")), "no TensorBoard log"
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert set(saved["after"]["per_task"]) == {"DEMO-CLS", "DEMO-GEN", "DEMO-NER", "DEMO-STS"}
    assert saved["info"]["trainable_parameters"] == metrics["info"]["trainable_parameters"] > 0
    report = (run_dir / "report.md").read_text()
    assert "| DEMO-NER | 4 |" in report and "**overall**" in report
    assert "![training curves](curves.png)" in report and "](routing.png)" in report
    history = [json.loads(line) for line in (run_dir / "history.jsonl").open()]
    first = metrics["info"]["train_loss_first"]
    assert history[0]["train/loss"] == pytest.approx(first, abs=1e-4)
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora" in k or "gate" in k for k in adapter)
    assert not any("embed_tokens" in k or k.endswith("q_proj.weight") for k in adapter)


def test_eval_command_rescores_the_run(finished_run, tmp_path) -> None:
    from moelora.evaluate.command import evaluate_command

    run_dir, metrics = finished_run
    evaluate_command(compose_config("eval", [f"run_dir={run_dir}"], tmp_path))
    rescored = json.loads((tmp_path / "metrics.json").read_text())
    assert rescored["score"]["per_task"] == pytest.approx(metrics["after"]["per_task"])
    # The gates' report for the rows scored here equals the run's own (same rows, same model).
    ours = json.loads((tmp_path / "routing.json").read_text())
    theirs = json.loads((run_dir / "routing.json").read_text())
    ours, theirs = ours["groups"]["all"]["mean_weight"], theirs["groups"]["all"]["mean_weight"]
    assert set(ours) == set(theirs) == set(metrics["after"]["per_task"])
    for task in ours:
        assert ours[task] == pytest.approx(theirs[task], abs=1e-6)
    assert "](routing.png)" in (tmp_path / "report.md").read_text()


def test_eval_takes_data_and_model_settings_over_the_runs(finished_run, tmp_path, capsys) -> None:
    """`moelora eval run_dir=... data.<key>=...` scores the run's adapter on other dev rows;
    a dev set that is not there stops before the model loads."""
    from tests.test_config import in_process

    run_dir, _ = finished_run
    out = tmp_path / "ner"
    scoring = [f"run_dir={run_dir}", "eval.max_new_tokens=4", f"output_dir={out}"]
    done = in_process(capsys, "eval", *scoring, "data.eval_tasks=[DEMO-NER]")
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(json.loads((out / "metrics.json").read_text())["score"]["per_task"]) == {"DEMO-NER"}
    assert len((out / "predictions_eval.jsonl").read_text().splitlines()) == 4
    done = in_process(capsys, "eval", *scoring, "data.root=/nowhere")
    assert done.returncode == 2
    assert "data.root='/nowhere' is not a folder" in done.stderr
    done = in_process(capsys, "eval", *scoring, "model.name_or_path=/nowhere")  # the base has moved
    assert done.returncode == 2 and "/nowhere" in done.stderr
    done = in_process(
        capsys, "eval", *scoring, "data=demo"
    )  # would drop the run's own data settings
    assert done.returncode == 2 and "change single keys instead (data.<key>=...)" in done.stderr
    done = in_process(capsys, "eval", f"run_dir={run_dir}", f"output_dir={run_dir}")
    assert done.returncode == 2 and "holds a training run" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_runs_settings_take_changes_resolved_against_the_run(finished_run) -> None:
    from moelora.rundir import read_run

    run_dir, _ = finished_run
    changes = {"data.eval_files": "${data.train_files}", "eval.max_new_tokens": 3}
    settings = read_run(run_dir, changes)
    assert settings.data.eval_files == settings.data.train_files == ["train.jsonl"]
    assert settings.eval.max_new_tokens == 3 and settings.eval.batch_size == 16  # the run's
    assert settings.method == "moelora" and settings.quantization is None


def test_resume_equals_an_uninterrupted_run(tmp_path) -> None:
    steps = [
        "trainer.max_steps=12",
        "trainer.save_every=6",
        "trainer.keep_checkpoints=0",
        "eval.enabled=false",
        "method=lora",
    ]
    full = tmp_path / "full"
    run(full, *steps)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        full / "checkpoints" / "step-00000006", resumed / "checkpoints" / "step-00000006"
    )
    run(resumed, *steps, "trainer.resume=true")
    from moelora.errors import UserError

    with pytest.raises(UserError, match="method.rank_per_expert differs from"):
        run(full, *steps, "trainer.resume=true", "method.rank_per_expert=4")
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_export_writes_a_peft_adapter_and_a_merged_model(finished_run, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moelora.export import export_command
    from moelora.modeling import load_base_model
    from moelora.rundir import load_run

    run_dir, _ = finished_run
    out = tmp_path / "export"
    cfg = compose_config("export", [f"run_dir={run_dir}", "task=DEMO-NER", "formats=[peft,merged]"])
    cfg.output_dir = str(out)
    export_command(cfg)
    run = load_run(run_dir, cfg.cache_dir, on_cpu=True)
    task_id = run.registry.task_id("DEMO-NER")
    ids = run.tokenizer("实体识别：\n患者自述头痛，伴有发热。\n答：", return_tensors="pt")
    run.model.eval()
    with torch.no_grad():
        ours = run.model(**ids, task_ids=torch.tensor([task_id])).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")(**ids).logits
        base = load_base_model(run.settings.model, run.tokenizer, cfg.cache_dir, on_cpu=True)
        plain = base(**ids).logits
        peft = PeftModel.from_pretrained(base, out / "peft").eval()(**ids).logits
    assert not torch.allclose(plain, ours, atol=1e-3), "the adapter changed nothing"
    torch.testing.assert_close(merged, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(peft, ours, rtol=1e-4, atol=1e-4)


def test_export_of_a_task_gated_run_needs_the_task(finished_run, tmp_path) -> None:
    from moelora.errors import UserError
    from moelora.export import export_command

    run_dir, _ = finished_run
    cfg = compose_config("export", [f"run_dir={run_dir}"])
    cfg.output_dir = str(tmp_path)
    with pytest.raises(UserError, match="pass task=<name>"):
        export_command(cfg)


def test_gradient_accumulation_equals_one_big_batch(tmp_path) -> None:
    common = ["trainer.max_steps=3", "eval.enabled=false", "method=lora", "method.dropout=0"]
    run(tmp_path / "big", *common, "trainer.batch_size=8", "trainer.grad_accum=1")
    run(tmp_path / "accum", *common, "trainer.batch_size=2", "trainer.grad_accum=4")
    a = load_file(tmp_path / "big" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "accum" / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_modula_trains_its_stages_in_order(tmp_path) -> None:
    metrics = run(
        tmp_path,
        "method=modula_res",
        "trainer.max_steps=4",
        "eval.before=false",
        "trainer.save_every=4",
        "trainer.keep_checkpoints=0",
    )
    assert metrics["info"]["steps"] == 12
    stages = [
        json.loads((p / "trainer_state.json").read_text())["stage"]
        for p in sorted((tmp_path / "checkpoints").iterdir())
    ]
    assert stages == [0, 1, 2]
    first, last = (
        load_file(tmp_path / "checkpoints" / name / "adapter_model.safetensors")
        for name in ("step-00000004", "step-00000012")
    )
    universal = [k for k in first if "lora_B_0" in k]
    router = [k for k in first if ".gate.router." in k]
    assert universal and router
    for key in universal:  # frozen after the universal stage
        torch.testing.assert_close(first[key], last[key])
    assert any(not torch.equal(first[k], last[k]) for k in router)


def test_an_existing_run_is_never_overwritten(finished_run) -> None:
    from tests.test_config import moelora

    run_dir, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    result = moelora("train", "+experiment=demo", f"run_dir={run_dir}")
    assert result.returncode == 2
    assert "already holds a training run; pass trainer.resume=true" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_force_domain_scores_modula_through_each_rows_domain_expert(tmp_path) -> None:
    metrics = run(
        tmp_path,
        "method=modula",
        "trainer.max_steps=2",
        "eval.before=false",
        "eval.force_domain=true",
    )
    assert set(metrics["after"]["per_task"]) == {"DEMO-CLS", "DEMO-GEN", "DEMO-NER", "DEMO-STS"}


def test_force_domain_is_refused_for_other_methods(tmp_path) -> None:
    from moelora.errors import UserError

    with pytest.raises(UserError, match="eval.force_domain=true is for modula, modula_res"):
        run(tmp_path, "method=lora", "eval.force_domain=true")


def test_each_epoch_draws_a_new_order_and_resume_skips_within_it() -> None:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from moelora.config import MixtureConfig
    from moelora.data.mixture import MixtureSampler
    from moelora.train.checkpoint import TrainState
    from moelora.train.loop import epoch_batches

    sampler = MixtureSampler(["a"] * 6 + ["b"] * 6, MixtureConfig(), seed=0)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(DataLoader(list(range(12)), batch_size=4, sampler=sampler))

    def order(epoch: int, skip: int = 0) -> list[int]:
        state = TrainState(epoch=epoch, batches_in_epoch=skip)
        return torch.cat(list(epoch_batches(accelerator, loader, state))).tolist()

    first, second = order(0), order(1)
    assert first != second and order(1) == second
    sampler.set_epoch(1)
    assert second == list(sampler)
    assert order(1, skip=1) == second[4:]


def test_export_of_a_modula_run_gives_the_tasks_domain_expert(tmp_path) -> None:
    from peft import PeftModel

    from moelora.export import export_command
    from moelora.modeling import load_base_model
    from moelora.rundir import load_run

    run(tmp_path / "run", "method=modula_res", "trainer.max_steps=2", "eval.enabled=false")
    cfg = compose_config("export", [f"run_dir={tmp_path / 'run'}", "task=DEMO-GEN"])
    cfg.output_dir = str(tmp_path / "export")
    export_command(cfg)
    loaded = load_run(tmp_path / "run", cfg.cache_dir, on_cpu=True)
    loaded.model.set_stage("domain")
    domain = torch.tensor([loaded.registry.domain_id("DEMO-GEN")])
    ids = loaded.tokenizer("患者自述头痛。\n请给出就诊建议。\n答：", return_tensors="pt")
    with torch.no_grad():
        ours = loaded.model.eval()(**ids, domain_ids=domain).logits
        base = load_base_model(loaded.settings.model, loaded.tokenizer, cfg.cache_dir, on_cpu=True)
        peft = PeftModel.from_pretrained(base, tmp_path / "export" / "peft").eval()(**ids).logits
    torch.testing.assert_close(peft, ours, rtol=1e-4, atol=1e-4)


def test_a_local_checkpoint_trains_and_exports_in_its_own_dtype(tmp_path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from moelora.export import export_command
    from moelora.paths import DATA_DIR

    config = AutoConfig.for_model(
        "llama",
        vocab_size=745,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    run(
        tmp_path / "run",
        f"model.name_or_path={tmp_path / 'ckpt'}",
        "model.name=local",
        f"model.tokenizer={DATA_DIR / 'tokenizer'}",
        "model.dtype=auto",
        "trainer.max_steps=1",
        "eval.enabled=false",
    )
    cfg = compose_config("export", [f"run_dir={tmp_path / 'run'}", "formats=[merged]"])
    cfg.output_dir = str(tmp_path / "export")
    export_command(cfg)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged")
    assert next(merged.parameters()).dtype == torch.bfloat16
