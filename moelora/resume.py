"""Whether a training run starts, resumes or is already done: one decision from what its run
directory holds and `trainer.resume`, made by the CLI before Hydra writes into the folder and by
the recipe before it reads anything, so the two never disagree.

| run_dir holds                         | resume=false | resume=true    | resume=auto    |
|---------------------------------------|--------------|----------------|----------------|
| nothing (or no folder yet)            | start        | refused        | start          |
| a started run, no complete checkpoint | start *      | refused        | start          |
| a complete checkpoint, not finished   | refused      | resume         | resume         |
| a finished run (metrics.json)         | refused      | resume **      | finished       |
| files that are not a moelora run      | refused      | refused        | refused        |

`*` refused when it holds `checkpoints/` or `adapter/` (something a resume could want);
`**` from its last checkpoint, e.g. with a larger trainer.max_steps. A checkpoint counts once its
`trainer_state.json` is written, which happens last, inside a folder renamed into place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moelora.atomic import OLD_MARK, TMP_MARK
from moelora.errors import UserError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"  # written last in a checkpoint: its presence marks it complete
FINISHED_FILE = "metrics.json"  # written last by a run: its presence marks the run finished
# What a started run writes first; a folder with other things in it is not a run of ours.
RUN_MARKERS = ("config.yaml", CHECKPOINTS, "adapter")
# What Hydra and the lock put in a folder before the run itself writes anything.
NOT_CONTENT = (".hydra", ".lock")


def complete_checkpoints(root: Path) -> list[Path]:
    """The checkpoints under `root` that were written to the end, oldest first."""
    if not root.is_dir():
        return []
    found = (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    return sorted(p for p in found if (p / STATE_FILE).is_file())


@dataclass(frozen=True)
class ResumePlan:
    action: str  # start | resume | finished
    checkpoint: Path | None = None  # the newest complete one, when resuming

    @property
    def resumes(self) -> bool:
        return self.action == "resume"


def _content(run_dir: Path) -> list[str]:
    """What the folder holds besides Hydra's and the lock's files and leftover temporaries."""
    return sorted(
        entry.name
        for entry in run_dir.iterdir()
        if entry.name not in NOT_CONTENT
        and not entry.name.endswith(".log")
        and TMP_MARK not in entry.name
        and OLD_MARK not in entry.name
    )


def plan_run(run_dir: str | Path, resume: bool | str) -> ResumePlan:
    """The decision in the module's table; every refusal is one sentence with the fix."""
    folder = Path(run_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"run_dir={run_dir} is a file, not a folder; choose a folder for the run.")
    content = _content(folder) if folder.is_dir() else []
    if content and not any(name in content for name in RUN_MARKERS):
        shown = ", ".join(content[:3]) + (", ..." if len(content) > 3 else "")
        raise UserError(
            f"run_dir={run_dir} holds files that are not a moelora run ({shown}); choose an empty "
            f"or new folder."
        )
    found = complete_checkpoints(folder / CHECKPOINTS)
    checkpoint = found[-1] if found else None
    finished = (folder / FINISHED_FILE).is_file()
    if resume == "auto":
        if finished:
            return ResumePlan("finished")
        return ResumePlan("resume", checkpoint) if checkpoint else ResumePlan("start")
    if resume:
        if checkpoint is None:
            raise UserError(
                f"trainer.resume=true, but {run_dir} has no complete checkpoint; pass "
                f"run_dir=<a run with checkpoints/step-*>, or trainer.resume=auto to start when "
                f"there is none."
            )
        return ResumePlan("resume", checkpoint)
    if any((folder / name).exists() for name in (CHECKPOINTS, "adapter")):
        raise UserError(
            f"run_dir={run_dir} already holds a training run; pass trainer.resume=true (or "
            f"auto) to continue it, or choose a new run_dir."
        )
    return ResumePlan("start")
