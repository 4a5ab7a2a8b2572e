"""Hardware presets: DeepSpeed settings from the trainer, the launch commands, the refusals, and
QLoRA's 4-bit base under every method (bitsandbytes NF4 runs on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from moelora.adapters import AdaptedModel
from moelora.config import HardwareConfig, TrainerConfig, load_config
from moelora.data.pipeline import prepare_data
from moelora.errors import UserError
from moelora.evaluate.command import evaluate_command
from moelora.evaluate.scoring import eval_loss
from moelora.hardware import deepspeed_config, fill_model_sizes
from moelora.launch import launch, launch_command, needs_launch
from moelora.modeling import load_base_model, load_tokenizer
from moelora.rundir import load_run
from moelora.train.recipe import train
from tests.adapters.adapter_cases import (
    CASES,
    DENSE_ROUTING,
    NUM_DOMAINS,
    NUM_TASKS,
    make_config,
    randomize_adapters,
)
from tests.conftest import TINY_SHAPE, compose_config

PRESETS = ["cpu", "gpu", "ddp", "zero2", "zero2_offload", "zero3", "zero3_offload", "qlora_4bit"]


def hardware(name: str, *overrides: str) -> HardwareConfig:
    cfg = compose_config("train", [f"hardware={name}", *overrides])
    return OmegaConf.to_object(cfg.hardware)  # type: ignore[return-value]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_and_validates(name: str) -> None:
    cfg = load_config(compose_config("train", [f"hardware={name}"], Path("unused")))
    assert cfg.hardware.name == name
    if name.startswith("zero"):
        zero = cfg.hardware.deepspeed["zero_optimization"]
        assert zero["stage"] == int(name[4])
        assert ("offload_optimizer" in zero) == name.endswith("offload")
    assert (cfg.hardware.quantization == "nf4") == (name == "qlora_4bit")


def test_deepspeed_auto_values_come_from_the_trainer_and_the_model() -> None:
    trainer = TrainerConfig(batch_size=3, grad_accum=4, max_grad_norm=0.5)
    config = deepspeed_config(hardware("zero3"), trainer, "bf16", processes=8)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 3 * 4 * 8
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    fill_model_sizes(config, 128)
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 128 * 128
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 128 * 128)
    assert zero["stage3_param_persistence_threshold"] == 1280
    assert "auto" not in str(config)


def test_a_deepspeed_value_that_contradicts_the_trainer_stops() -> None:
    hw = hardware("zero2", "hardware.deepspeed.gradient_accumulation_steps=2")
    with pytest.raises(UserError, match="hardware.deepspeed.gradient_accumulation_steps=2"):
        deepspeed_config(hw, TrainerConfig(grad_accum=1), "no", processes=2)


def test_launch_commands_for_each_launcher() -> None:
    overrides = ["+experiment=demo", "run_dir=old", "trainer.lr=1e-3"]
    env, argv = launch_command(
        hardware("ddp", "hardware.cpu=true"), "train", overrides, "run_dir=runs/a"
    )
    assert env == {"ACCELERATE_USE_CPU": "1"}  # DDP over gloo without GPUs
    assert argv[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in argv
    assert argv[argv.index("--num_processes") + 1] == str(hardware("ddp").num_processes)
    assert argv[-5:] == [
        "moelora",
        "train",
        "+experiment=demo",
        "trainer.lr=1e-3",
        "run_dir=runs/a",
    ]

    env, argv = launch_command(
        hardware("zero3", "hardware.num_processes=4"), "train", overrides, "run_dir=r"
    )
    assert env == {} and "--use_deepspeed" in argv  # ACCELERATE_USE_CPU would drop DeepSpeed
    assert argv[argv.index("--num_processes") + 1] == "4"

    _, argv = launch_command(
        hardware("zero2", "hardware.num_processes=2", "hardware.launcher=torchrun"),
        "eval",
        [],
        "output_dir=o",
    )
    assert argv[:2] == ["torchrun", "--nproc_per_node=2"]
    assert argv[-4:] == ["-m", "moelora", "eval", "output_dir=o"]

    _, argv = launch_command(
        hardware("zero2", "hardware.num_processes=2", "hardware.launcher=deepspeed"),
        "train",
        [],
        "run_dir=r",
    )
    assert argv[:3] == ["deepspeed", "--num_gpus", "2"]
    assert argv[-5:] == ["--no_local_rank", "--module", "moelora", "train", "run_dir=r"]


def test_several_machines_print_one_command_per_machine(capsys) -> None:
    hw = hardware("zero3", "hardware.num_processes=8", "hardware.num_machines=2")
    launch(hw, "train", ["+experiment=cmedical"], "run_dir=/shared/runs/a")
    printed = capsys.readouterr().out
    for rank in (0, 1):
        line = next(s for s in printed.splitlines() if s.strip().startswith(f"machine {rank}:"))
        assert f"--machine_rank {rank}" in line and "--num_processes 16" in line
        assert "--main_process_ip $MAIN_IP" in line and "run_dir=/shared/runs/a" in line
        assert "--deepspeed_multinode_launcher standard" in line  # not pdsh over ssh
    torchrun = hardware("ddp", "hardware.num_machines=2", "hardware.launcher=torchrun")
    launch(torchrun, "train", [], "run_dir=r")
    assert "--master_addr $MAIN_IP" in capsys.readouterr().out  # expanded by the shell


def test_only_a_process_outside_a_launch_launches(monkeypatch) -> None:
    assert not needs_launch(hardware("cpu"))
    assert needs_launch(hardware("ddp", "hardware.num_processes=2"))
    assert needs_launch(hardware("zero3_offload", "hardware.num_processes=1"))  # DeepSpeed
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not needs_launch(hardware("ddp", "hardware.num_processes=2"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["hardware.strategy=fsdp"], "hardware.strategy='fsdp' is unknown"),
        (["hardware.launcher=mpirun"], "hardware.launcher='mpirun' is unknown"),
        (["hardware=zero2", "hardware.quantization=nf4"], "cannot be partitioned by DeepSpeed"),
        (["hardware=zero2", "method=modula"], "run MoDULA's stages as separate runs"),
        (["hardware=ddp", "hardware.num_processes=2"], "start it with the moelora command"),
    ],
)
def test_contradictory_hardware_settings_stop_with_one_sentence(
    overrides: list[str], message: str, tmp_path
) -> None:
    with pytest.raises(UserError, match=message):
        train(compose_config("train", ["+experiment=demo", *overrides], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny_setup():
    cfg = load_config(
        compose_config(
            "train",
            [
                "+experiment=demo",
                *TINY_SHAPE,
                "model.tiny.pretrain_steps=0",
                "method.dropout=0",
            ],
            Path("unused"),
        )
    )
    return cfg, load_tokenizer(cfg.model)


def _quantized_and_reference(cfg, tokenizer):
    """The NF4 base, and an fp32 copy holding exactly the weights the NF4 layers dequantize to."""
    quantized = load_base_model(cfg.model, tokenizer, cfg.cache_dir, True, "nf4", "cpu")
    reference = load_base_model(cfg.model, tokenizer, cfg.cache_dir, True)
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 2 * 7  # every projection of both blocks
    for name, layer in layers.items():
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        reference.get_submodule(name).weight.data.copy_(weight)
    return quantized, reference


@pytest.fixture(scope="module")
def nf4_bases(tiny_setup):
    """The NF4 base and its dequantized twin, loaded once for the method table."""
    return _quantized_and_reference(*tiny_setup)


@pytest.fixture
def adapt(nf4_bases, one_thread):
    """Wrap a shared base with a method's adapters; the base's own Linears are put back after
    the test (adapters wrap in place), so the next method starts from the same base."""
    wrapped = []

    def wrap(base, case: str, **fields) -> AdaptedModel:
        model = AdaptedModel(base, make_config(case, **fields), NUM_TASKS, NUM_DOMAINS)
        wrapped.append(model)
        return model

    yield wrap
    for model in wrapped:
        for name, layer in model.adapted_layers.items():
            model.base_model.set_submodule(name, layer.base_layer)


def _nf4_batch(tokenizer) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, len(tokenizer), (4, 12), generator=generator)
    rows = torch.arange(4)
    return dict(input_ids=ids, labels=ids, task_ids=rows % NUM_TASKS, domain_ids=rows % NUM_DOMAINS)


@pytest.mark.parametrize("case", CASES)
def test_qlora_adapters_on_nf4_match_the_dequantized_model(
    tiny_setup, nf4_bases, adapt, case
) -> None:
    """The loss and every adapter gradient on the NF4 base equal those on its dequantized fp32
    twin (relative 1e-5), also after an eval-mode pass without gradients (scoring before
    training), which on an AVX512-BF16 CPU made bitsandbytes repack its layers into a layout
    that passes no gradient (`moelora.modeling.keep_4bit_differentiable`)."""
    quantized, reference = (adapt(base, case) for base in nf4_bases)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for (_, p), (_, q) in zip(
            quantized.named_adapter_parameters(), reference.named_adapter_parameters(), strict=True
        ):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            q.copy_(p)
    batch = _nf4_batch(tiny_setup[1])
    with torch.no_grad():
        quantized.eval()(**batch)
    losses = []
    for model in (quantized, reference):
        torch.manual_seed(0)  # the contrastive loss samples its tokens
        losses.append(model.train()(**batch).loss)
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    for (name, p), (_, q) in zip(
        quantized.named_adapter_parameters(), reference.named_adapter_parameters(), strict=True
    ):
        if q.grad is not None:
            assert (p.grad - q.grad).norm() <= 1e-5 * q.grad.norm() + 1e-12, name


@pytest.fixture(scope="module")
def bf16_nf4_base(tiny_setup):
    """The same NF4 base computing in bf16, as `hardware=qlora_4bit` loads it on a GPU."""
    cfg, tokenizer = tiny_setup
    return load_base_model(cfg.model, tokenizer, cfg.cache_dir, True, "nf4", "cpu", torch.bfloat16)


@pytest.mark.parametrize("case", CASES)
def test_qlora_in_bf16_matches_fp32_within_the_stated_tolerance(
    tiny_setup, nf4_bases, bf16_nf4_base, adapt, case
) -> None:
    """QLoRA as a GPU runs it (NF4 computing in bf16, the forward under bf16 autocast) against
    the NF4 base computing in fp32, with the same adapters: tests/test_precision.py's
    tolerances (loss relative 1e-3, gradients cosine >= 0.995 and relative norm <= 0.1; token
    routers dense, for the reason given there)."""
    dense = DENSE_ROUTING.get(case, {})
    models = [adapt(base, case, **dense).train() for base in (nf4_bases[0], bf16_nf4_base)]
    randomize_adapters(models[0])
    with torch.no_grad():
        for (_, p), (_, q) in zip(*(m.named_adapter_parameters() for m in models), strict=True):
            q.copy_(p)
    batch = _nf4_batch(tiny_setup[1])
    results = []
    for model, dtype in zip(models, (torch.float32, torch.bfloat16), strict=True):
        torch.manual_seed(0)  # the contrastive loss samples its tokens
        with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        grads = [
            p.grad.flatten() for _, p in model.named_adapter_parameters() if p.grad is not None
        ]
        results.append((loss.detach().float(), torch.cat(grads)))
    (loss32, grads32), (loss16, grads16) = results
    torch.testing.assert_close(loss16, loss32, rtol=1e-3, atol=0)
    assert torch.cosine_similarity(grads16, grads32, dim=0) >= 0.995
    assert (grads16 - grads32).norm() <= 0.1 * grads32.norm()


def _base_tensors(model: AdaptedModel) -> dict[str, torch.Tensor]:
    """Every base parameter (the packed 4-bit weights included) and each NF4 layer's scales.
    (`state_dict()` re-packs the double-quantised scales on each call, so it is not used.)"""
    adapter = {n for n, _ in model.named_adapter_parameters()}
    tensors = {
        n: p.detach().as_subclass(torch.Tensor).clone()
        for n, p in model.named_parameters()
        if n not in adapter
    }
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            tensors[f"{name}.absmax"] = module.weight.quant_state.absmax.clone()
    return tensors


@pytest.mark.parametrize("case", CASES)
def test_qlora_training_lowers_the_loss_and_changes_only_the_adapters(
    tiny_setup, nf4_bases, adapt, case
) -> None:
    model = adapt(nf4_bases[0], case)
    batch = _nf4_batch(tiny_setup[1])
    with torch.no_grad():  # scoring before training
        model.eval()(**batch)
    frozen = _base_tensors(model)
    adapters = {n: p.detach().clone() for n, p in model.named_adapter_parameters()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    after = _base_tensors(model)
    assert frozen.keys() == after.keys()
    for name, tensor in frozen.items():
        assert torch.equal(tensor, after[name]), f"{name} changed"
    changed = {n for n, p in model.named_adapter_parameters() if not torch.equal(p, adapters[n])}
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)


@pytest.mark.slow
def test_qlora_preset_trains_and_evals_on_4bit(tmp_path, capsys) -> None:
    overrides = [
        "+experiment=demo",
        "hardware=qlora_4bit",
        *TINY_SHAPE,
        "model.tiny.pretrain_steps=0",
        "data.max_eval_samples_per_task=2",
        "trainer.batch_size=8",
        "trainer.max_steps=20",
        "trainer.lr=1e-2",
        "trainer.log_every=5",
        "trainer.gradient_checkpointing=true",
        "eval.max_new_tokens=6",
    ]
    run_dir = tmp_path / "run"
    cfg = compose_config("train", overrides, run_dir)
    metrics = train(cfg)
    info = metrics["info"]
    assert info["train_loss_last"] < info["train_loss_first"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    # The run loads back onto its 4-bit base: the eval loss training measured at its end.
    def reloaded_eval_loss(quantization: str | None) -> float:
        run = load_run(run_dir, cfg.cache_dir, True, quantization)
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in run.model.modules()) == bool(
            quantization
        )
        rows = prepare_data(run.settings.data, run.tokenizer, run.registry).eval
        return round(eval_loss(run.model, rows, load_config(cfg), Accelerator(cpu=True)), 4)

    assert reloaded_eval_loss("nf4") == info["final_eval_loss"] != reloaded_eval_loss(None)

    # `moelora eval` scores the run on its 4-bit base, as training's final scoring did.
    scoring = ["eval.max_new_tokens=6", f"run_dir={run_dir}"]
    evaluate_command(compose_config("eval", [*scoring, "hardware=qlora_4bit"], tmp_path / "q"))
    assert json.loads((tmp_path / "q" / "metrics.json").read_text())["score"] == metrics["after"]
    evaluate_command(compose_config("eval", scoring, tmp_path / "full"))
    assert "trained on a nf4 base and is scored on a full-precision one" in capsys.readouterr().out


def test_eval_refuses_deepspeed_before_loading(tmp_path) -> None:
    cfg = compose_config("eval", ["hardware=zero3", f"run_dir={tmp_path}"], tmp_path)
    with pytest.raises(UserError, match="use hardware=ddp"):
        evaluate_command(cfg)


def test_slurm_launcher_config_composes_on_submitit() -> None:
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason="optional extra: pip install -e '.[slurm]'"
    )
    from hydra import compose, initialize_config_dir

    from moelora.paths import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.nodes == 1 and launcher.tasks_per_node == 1 and launcher.gpus_per_node == 8
