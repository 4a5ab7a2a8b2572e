"""A method written outside the package: one module's worth of code plus a registered preset
trains, saves, loads and scores through the commands' own code, with no change to moelora. And
the rest of the package never compares method names: it asks the method."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from torch import Tensor, nn

from moelora.adapters import LayerParts, Method, method_names, register_method
from moelora.adapters.config import ExpertConfig, setting
from moelora.adapters.gates import per_row
from moelora.adapters.methods.base import METHOD_REGISTRY
from moelora.adapters.routing import Routing
from moelora.config import register_configs
from moelora.evaluate.command import evaluate_command
from moelora.rundir import load_run
from moelora.train.recipe import train
from tests.conftest import REPO, TINY_SHAPE, compose_config
from tests.test_config import in_process


class ParityGate(nn.Module):
    """All weight on expert (task id mod 2): even tasks share one expert, odd tasks the other."""

    static = True

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        task_ids = routing.state.ids("task_ids", x.shape[0])
        return per_row(F.one_hot(task_ids % 2, 2).float(), x, routing.state)


@dataclass
class ParityConfig(ExpertConfig):
    name: str = setting("parity", "parity")
    num_experts: int = setting("Two experts: even and odd task ids.", 2)


class Parity(Method):
    name = "parity"
    config_class = ParityConfig
    routes_by_task = True
    export_per = "task"

    def layer_parts(self, d_in: int, num_tasks: int, num_domains: int) -> LayerParts:
        rank, scale = self.config.rank_per_expert, self.config.expert_scaling
        return LayerParts([rank, rank], [scale, scale], ParityGate())


@pytest.fixture(scope="module")
def parity_registered() -> None:
    register_method(Parity)
    register_configs()  # its schema, as method_schema/parity
    ConfigStore.instance().store(  # the preset a yaml would give: configs/method/parity.yaml
        group="method", name="parity", node=ParityConfig(rank_per_expert=4, dropout=0.0)
    )


@pytest.mark.slow
def test_a_method_from_outside_trains_saves_loads_and_scores(parity_registered, tmp_path: Path):
    overrides = [
        "+experiment=demo",
        "method=parity",
        *TINY_SHAPE,
        "model.tiny.pretrain_steps=100",
        "model.tiny.pretrain_lr=3e-3",
        "data.max_eval_samples_per_task=2",
        "trainer.max_steps=20",
        "trainer.lr=1e-2",
        "eval.before=false",
        "eval.max_new_tokens=8",
    ]
    run_dir = tmp_path / "run"
    metrics = train(compose_config("train", overrides, run_dir))
    assert metrics["info"]["method"] == "parity"
    assert set(metrics["after"]["per_task"]) == {"DEMO-CLS", "DEMO-GEN", "DEMO-NER", "DEMO-STS"}
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["method"]["name"] == "parity" and saved["method"]["num_experts"] == 2

    # loaded back (as eval and export do), the gate routes by parity: tasks 0 and 2 give the
    # same output, task 1 another
    run = load_run(run_dir, str(tmp_path / "cache"), on_cpu=True)
    assert type(run.model.config) is ParityConfig
    ids = torch.tensor([[5, 6, 7, 8]])
    run.model.eval()
    logits = [run.model(input_ids=ids, task_ids=torch.tensor([t])).logits for t in (0, 1, 2)]
    torch.testing.assert_close(logits[0], logits[2])
    assert not torch.allclose(logits[0], logits[1])

    out = tmp_path / "eval"
    evaluate_command(compose_config("eval", [f"run_dir={run_dir}"], out))
    rescored = json.loads((out / "metrics.json").read_text())
    assert rescored["score"]["per_task"] == pytest.approx(metrics["after"]["per_task"])


def _foreign_field_cases() -> list[tuple[str, str]]:
    """(method, a field of another method that it lacks) for every shipped method."""
    from moelora.adapters import get_method

    fields = {name: set(get_method(name).config_class.__dataclass_fields__) for name in SHIPPED}
    every = set().union(*fields.values())
    return [(name, sorted(every - own)[0]) for name, own in fields.items()]


SHIPPED = ["lora", "moelora", "molora", "contrastive", "modula", "modula_res"]


def _refused(capsys: pytest.CaptureFixture, *args: str) -> list[str]:
    """`moelora <args>` must stop with status 2; returns what it said on stderr."""
    done = in_process(capsys, *args)
    assert done.returncode == 2
    return done.stderr.strip().splitlines()


@pytest.mark.parametrize(("method", "key"), _foreign_field_cases())
def test_another_methods_field_stops_with_one_sentence(method: str, key: str, capsys) -> None:
    (line,) = _refused(capsys, "train", "+experiment=demo", f"method={method}", f"method.{key}=1")
    assert line.startswith(f"moelora train: error: method.{key} is not a setting of method ")
    assert f" {method};" in line


def test_lora_with_top_k_names_both(capsys) -> None:
    assert _refused(capsys, "train", "+experiment=demo", "method=lora", "method.top_k=3") == [
        "moelora train: error: method.top_k is not a setting of method lora; remove it or "
        "choose a method that has it (contrastive, molora)."
    ]


def test_no_method_name_is_compared_outside_the_methods_package() -> None:
    names = set(SHIPPED) | set(method_names())
    offenders = []
    for path in sorted((REPO / "moelora").rglob("*.py")):
        if "methods" in path.relative_to(REPO / "moelora").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            for operand in operands:
                items = (
                    operand.elts
                    if isinstance(operand, ast.Tuple | ast.List | ast.Set)
                    else [operand]
                )
                if any(isinstance(i, ast.Constant) and i.value in names for i in items):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_the_recipe_names_no_stage() -> None:
    """Stages belong to their method (`Method.stage_rows`, `enter_stage`): no module of the
    training recipe compares a stage's name."""
    stages = {name for method in METHOD_REGISTRY.values() for name in method.stage_names}
    named = [
        f"{path.name}:{node.lineno}"
        for path in sorted((REPO / "moelora" / "train").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Compare)
        and any(isinstance(o, ast.Constant) and o.value in stages for o in node.comparators)
    ]
    assert named == []
