"""MoDULA's "add a domain to an earlier run": the extended task registry keeps the earlier ids,
the second run trains only the new domain expert and the router, and bad requests stop early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moelora.data.tasks import TaskRegistry, check_added_domains
from moelora.errors import UserError
from tests.test_train import run

pytestmark = pytest.mark.slow  # end-to-end runs: `pytest -m 'not slow'` skips them

EARLIER_TASKS = ["data.tasks=[DEMO-CLS,DEMO-STS,DEMO-NER]"]
QUICK = ["trainer.max_steps=4", "eval.enabled=false"]
ADD = ["method.stages=[domain,router]", "method.add_domains=[report_generation]"]


def adapter(run_dir: Path, checkpoint: str | None = None) -> dict[str, torch.Tensor]:
    folder = run_dir / "checkpoints" / checkpoint if checkpoint else run_dir / "adapter"
    return load_file(folder / "adapter_model.safetensors")


def init_from(run_dir: Path) -> str:
    return f"trainer.init_adapter_from='{run_dir}'"


# -- the registry ------------------------------------------------------------------------------
def test_extending_a_registry_keeps_the_earlier_ids_and_appends_new_ones(tmp_path) -> None:
    earlier = TaskRegistry.build({"b-task": "zeta", "c-task": "mid"})
    assert earlier.tasks == ["b-task", "c-task"] and earlier.domains == ["mid", "zeta"]
    new_data = TaskRegistry.build({"a-task": "alpha", "b-task": "zeta", "c-task": "mid"})
    assert new_data.domains == ["alpha", "mid", "zeta"]  # built afresh, the ids would move

    extended = earlier.extend(new_data)
    assert extended.tasks == ["b-task", "c-task", "a-task"]
    assert extended.domains == ["mid", "zeta", "alpha"]
    assert [extended.task_id(t) for t in earlier.tasks] == [0, 1]
    assert [extended.domain_id(t) for t in ("b-task", "c-task", "a-task")] == [1, 0, 2]
    assert extended.tasks_in(["alpha"]) == ["a-task"]

    extended.save(tmp_path / "tasks.json")
    assert TaskRegistry.load(tmp_path / "tasks.json") == extended
    assert json.loads((tmp_path / "tasks.json").read_text())["domains"] == ["mid", "zeta", "alpha"]


def test_a_registry_saved_without_domains_still_loads_in_sorted_order() -> None:
    old = {"tasks": ["a", "b", "c"], "domain_of": {"a": "zeta", "b": "mid", "c": "zeta"}}
    registry = TaskRegistry.from_dict(old)
    assert registry.domains == ["mid", "zeta"]
    assert [registry.domain_id(t) for t in "abc"] == [1, 0, 1]


def test_a_task_that_changed_domain_is_refused() -> None:
    earlier = TaskRegistry.build({"a": "ner"})
    with pytest.raises(UserError, match=r"tasks \['a'\] have other domains"):
        earlier.extend(TaskRegistry.build({"a": "ner"}, {"a": "cls"}))


def test_added_domains_must_be_exactly_the_new_ones() -> None:
    check_added_domains(["a", "b"], {"a", "b", "c"}, ["c"])
    with pytest.raises(UserError, match=r"lacks the earlier run's domains \['b'\]"):
        check_added_domains(["a", "b"], {"a", "c"}, ["c"])
    with pytest.raises(UserError, match=r"names \['a'\], which are not new domains"):
        check_added_domains(["a", "b"], {"a", "b", "c"}, ["a"])
    with pytest.raises(UserError, match=r"new domains \['d'\] that method.add_domains does not"):
        check_added_domains(["a", "b"], {"a", "b", "c", "d"}, ["c"])


# -- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """modula on three demo tasks (three domains: cls, matching, ner)."""
    run_dir = tmp_path_factory.mktemp("earlier")
    run(run_dir, "method=modula", *QUICK, *EARLIER_TASKS)
    return run_dir


def test_adding_a_domain_trains_only_its_expert_and_the_router(earlier_run, tmp_path, capsys):
    run(tmp_path, "method=modula", *QUICK, *ADD, init_from(earlier_run), "trainer.save_every=4")
    printed = capsys.readouterr().out
    assert "domain stage: only the added domains' rows, per task {'DEMO-GEN':" in printed
    assert "keep their init" in printed

    before = json.loads((earlier_run / "tasks.json").read_text())
    after = json.loads((tmp_path / "tasks.json").read_text())
    assert after["tasks"] == [*before["tasks"], "DEMO-GEN"]  # sorted afresh, GEN would be id 1
    assert after["domains"] == [*before["domains"], "report_generation"]

    old, new = adapter(earlier_run), adapter(tmp_path)
    after_domain_stage = adapter(tmp_path, "step-00000004")
    router = [k for k in new if ".gate." in k]
    experts = [k for k in old if ".gate." not in k]
    added = [k for k in new if k.endswith(("lora_A_4", "lora_B_4"))]
    assert router and added and len(experts) == 8 * len(added) // 2  # universal + 3 domains
    for key in experts:  # the universal and earlier domain experts, bit for bit
        assert torch.equal(old[key], new[key]), key
    for key in added:  # trained in the domain stage, frozen in the router stage
        assert torch.equal(after_domain_stage[key], new[key]), key
    assert all(new[k].any() for k in added if k.endswith("lora_B_4")), "the new expert is zero"
    assert all(old[k].shape != new[k].shape for k in router if k.endswith("weight"))
    assert any(not torch.equal(after_domain_stage[k], new[k]) for k in router)


def test_a_name_that_is_not_a_new_domain_is_refused(earlier_run, tmp_path) -> None:
    with pytest.raises(UserError, match=r"names \['ner'\], which are not new domains"):
        run(
            tmp_path,
            "method=modula",
            *QUICK,
            *ADD[:1],
            "method.add_domains=[ner]",
            init_from(earlier_run),
        )
    assert not (tmp_path / "tasks.json").exists()


def test_the_earlier_run_must_fit_this_method(earlier_run, tmp_path) -> None:
    with pytest.raises(UserError, match=r"holds a modula adapter that does not fit .*name="):
        run(tmp_path, *QUICK, "method=modula_res", *ADD, init_from(earlier_run))
    with pytest.raises(UserError, match=r"init_adapter_from=.* has no tasks.json"):
        run(tmp_path, "method=modula", *QUICK, *ADD, init_from(tmp_path / "nowhere"))


def test_add_domains_needs_init_adapter_from(tmp_path) -> None:
    with pytest.raises(UserError, match=r"pass trainer.init_adapter_from=<that run's directory>"):
        run(tmp_path, "method=modula", *QUICK, *ADD)
    with pytest.raises(UserError, match=r"drop universal from method.stages"):
        run(tmp_path, "method=modula", *QUICK, ADD[1], init_from(tmp_path))
