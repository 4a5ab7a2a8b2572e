"""The task registry: task name -> id (for task gates) and task -> domain (for MoDULA), built from
the training data and saved in the run directory so eval and export use the same ids."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from moelora.errors import UserError


@dataclass
class TaskRegistry:
    tasks: list[str]
    domain_of: dict[str, str] = field(default_factory=dict)

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

    @property
    def domains(self) -> list[str]:
        return sorted(set(self.domain_of.values()))

    def task_id(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise UserError(
                f"task '{task}' is not one the model was trained on; known tasks: {self.tasks}."
            ) from None

    def domain_id(self, task: str) -> int:
        return self.domains.index(self.domain_of[task])

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "domain_of": self.domain_of}

    @classmethod
    def from_dict(cls, data: dict) -> TaskRegistry:
        return cls(list(data["tasks"]), dict(data["domain_of"]))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TaskRegistry:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
