"""The task registry: task name -> id (for task gates) and task -> domain (for MoDULA), built from
the training data and saved in the run directory so eval and export use the same ids.

Ids are positions in `tasks` and `domains`. A fresh registry sorts both; one extended from an
earlier run (MoDULA's `add_domains`) keeps the earlier order and appends, so the earlier run's
experts keep their indices."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moelora import atomic
from moelora.errors import DamagedFile, UserError


@dataclass
class TaskRegistry:
    tasks: list[str]
    domain_of: dict[str, str] = field(default_factory=dict)
    domains: list[str] = field(default_factory=list)  # empty: sorted(set(domain_of.values()))

    def __post_init__(self) -> None:
        if not self.domains:
            self.domains = sorted(set(self.domain_of.values()))
        unlisted = sorted(set(self.domain_of.values()) - set(self.domains))
        if unlisted or len(set(self.domains)) != len(self.domains):
            raise UserError(
                f"the task registry's domains {self.domains} do not list each domain of its "
                f"tasks once (missing: {unlisted}); the tasks.json is damaged."
            )

    @classmethod
    def from_rows(cls, rows, domains: dict[str, str] | None = None) -> TaskRegistry:
        """The registry of the tasks in `rows` (a Dataset with task_dataset and task_type)."""
        types = dict(zip(rows["task_dataset"], rows["task_type"], strict=True))
        return cls.build(types, domains)

    @classmethod
    def build(
        cls, task_types: dict[str, str], domains: dict[str, str] | None = None
    ) -> TaskRegistry:
        """Tasks sorted by name; each task's domain is `domains[task]`, else its task_type."""
        domains = domains or {}
        unknown = sorted(set(domains) - set(task_types))
        if unknown:
            raise UserError(
                f"data.domains names tasks that are not in the training data: {unknown}; "
                f"use names from {sorted(task_types)}."
            )
        tasks = sorted(task_types)
        return cls(tasks, {t: domains.get(t) or task_types[t] or "default" for t in tasks})

    def extend(self, new: TaskRegistry) -> TaskRegistry:
        """This (an earlier run's) registry plus the tasks and domains of `new`: earlier tasks and
        domains keep their ids, new ones are appended in `new`'s order."""
        moved = {
            t: self.domain_of[t]
            for t in new.tasks
            if t in self.domain_of and self.domain_of[t] != new.domain_of[t]
        }
        if moved:
            raise UserError(
                f"tasks {sorted(moved)} have other domains than in the earlier run, where they "
                f"were {moved}; map them back with data.domains."
            )
        tasks = self.tasks + [t for t in new.tasks if t not in self.domain_of]
        domains = self.domains + [d for d in new.domains if d not in self.domains]
        return TaskRegistry(tasks, {**self.domain_of, **new.domain_of}, domains)

    def task_id(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise UserError(
                f"task '{task}' is not one the model was trained on; known tasks: {self.tasks}."
            ) from None

    def domain_id(self, task: str) -> int:
        return self.domains.index(self.domain_of[task])

    def tasks_in(self, domains: Iterable[str]) -> list[str]:
        """The tasks of these domains, in id order."""
        wanted = set(domains)
        return [t for t in self.tasks if self.domain_of[t] in wanted]

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "domain_of": self.domain_of, "domains": self.domains}

    @classmethod
    def from_dict(cls, data: dict) -> TaskRegistry:
        """Also reads registries saved before "domains" was stored (their order was sorted)."""
        return cls(list(data["tasks"]), dict(data["domain_of"]), list(data.get("domains", [])))

    def save(self, path: Path) -> None:
        atomic.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> TaskRegistry:
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DamagedFile(path, atomic.error_words(err), "restore it from the run.") from None


def check_added_domains(
    earlier: Sequence[str], present: Collection[str], add_domains: Sequence[str]
) -> None:
    """MoDULA's `add_domains` against an earlier run: the training data (domains `present`) must
    still hold every earlier domain (the router is retrained on all of them), and `add_domains`
    must list exactly the domains the earlier run did not have."""
    missing = [d for d in earlier if d not in present]
    if missing:
        raise UserError(
            f"the training data lacks the earlier run's domains {missing}; keep their tasks in "
            f"data.tasks, since the router is retrained on every domain."
        )
    if not add_domains:
        return
    new = sorted(set(present) - set(earlier))
    wrong = [d for d in add_domains if d not in new]
    if wrong:
        raise UserError(
            f"method.add_domains names {wrong}, which are not new domains of the training data; "
            f"its new domains are {new} (the earlier run has {list(earlier)})."
        )
    unlisted = [d for d in new if d not in add_domains]
    if unlisted:
        raise UserError(
            f"the training data has new domains {unlisted} that method.add_domains does not "
            f"list; add them to method.add_domains or drop their tasks from data.tasks."
        )
