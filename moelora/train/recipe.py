"""The training recipe, read top to bottom: `train` decides start, resume or done, then
`TrainRecipe.setup` builds the run (processes, data, model, run directory), `train` scores the
base and trains each of the method's stages with checkpoints, `finish` saves the adapter, scores
it and writes the report, and `cleanup` ends the trackers and processes whatever happened.

Launch: `moelora train +experiment=demo` on one device, or through a distributed launcher:
`accelerate launch -m moelora train +experiment=cmedical hardware=...`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from omegaconf import DictConfig

from moelora import atomic, run_lock
from moelora.adapters import inference_stage
from moelora.config import TrainConfig, load_config
from moelora.evaluate.scoring import report_columns, score_model
from moelora.hardware import is_zero3
from moelora.launch import launch_this_command, needs_launch
from moelora.log import get_logger
from moelora.resume import FINISHED_FILE, plan_run
from moelora.signals import StopRequest
from moelora.train.checkpoint import save_final_adapter
from moelora.train.loop import Progress, run_stage
from moelora.train.report import run_info, write_run_report
from moelora.train.setup import BEFORE_FILE, Run, init_adapter, setup_run
from moelora.train.stages import stages_to_train, start_stage

log = get_logger(__name__)


def train(raw_cfg: DictConfig) -> dict:
    """Run the whole recipe; returns what metrics.json holds (a sweep's objective can use it).
    The run directory is locked against a second run for as long as this one runs."""
    cfg: TrainConfig = load_config(raw_cfg)
    run_lock.acquire(cfg.run_dir)
    try:
        plan = plan_run(cfg.run_dir, cfg.trainer.resume)
        if plan.action == "finished":
            log.info(f"trainer.resume=auto: {cfg.run_dir} has finished already; nothing to do")
            return _read_metrics(cfg)
        if cfg.trainer.resume == "auto":
            where = f"resuming from {plan.checkpoint}" if plan.resumes else "starting"
            log.info(f"trainer.resume=auto: {where}")
        if needs_launch(cfg.hardware):
            launch_this_command(cfg.hardware, "train", f"run_dir={cfg.run_dir}")
            return _read_metrics(cfg)
        recipe = TrainRecipe.setup(cfg, raw_cfg, plan.resumes)
        try:
            recipe.train()
            return recipe.finish()
        finally:
            recipe.cleanup()
    finally:
        run_lock.release(cfg.run_dir)


@dataclass
class TrainRecipe:
    """One training run from its built state to its report."""

    run: Run
    progress: Progress = field(default_factory=Progress)

    @classmethod
    def setup(cls, cfg: TrainConfig, raw: DictConfig, resuming: bool) -> TrainRecipe:
        return cls(setup_run(cfg, raw, resuming))

    def train(self) -> None:
        """Score the base (B = 0: the untrained adapted model is the base), start from an
        earlier run's adapter if asked, then train the stages in order, resuming inside the
        checkpoint's stage. A stop signal ends training after the current step with a
        checkpoint. Under ZeRO-3 the base runs only once the first stage has prepared it."""
        run, cfg = self.run, self.run.cfg
        base_pending = self._wants_base_scores()
        if base_pending and not is_zero3(run.accelerator):
            self._score_base(run.model)
            base_pending = False
        if cfg.trainer.init_adapter_from:
            if base_pending:  # by then the earlier adapter would be in place
                log.info(
                    "ZeRO-3 with init_adapter_from: no 'before' column; score the base with "
                    "moelora eval"
                )
                base_pending = False
            init_adapter(run.model, cfg.trainer.init_adapter_from)
        started = time.perf_counter()
        with StopRequest() as stop:
            for index, name in stages_to_train(run):
                stage = start_stage(run, index, name)
                if base_pending:
                    self._score_base(stage.model)
                    base_pending = False
                resume = run.resume_from is not None and index == run.resume_from.stage
                run_stage(run, stage, self.progress, resume, stop)
        self.progress.seconds = time.perf_counter() - started
        run.model.set_stage(inference_stage(cfg.method.name, cfg.eval.force_domain))

    def finish(self) -> dict:
        """Save the adapter, score it on the dev set, write report.md and metrics.json; returns
        what metrics.json holds."""
        run = self.run
        metadata = {"tasks": run.data.registry.to_dict(), "base_model": run.cfg.model.name_or_path}
        save_final_adapter(run.accelerator, run.model, run.run_dir / "adapter", metadata)
        columns = report_columns("before", _read_json(run.run_dir / BEFORE_FILE))
        if run.cfg.eval.enabled:
            columns |= report_columns("after", self._score(run.model, "after"))
            if run.data.validation is not None:  # held-out training rows: to choose settings by
                scored = self._score(run.model, "validation", run.data.validation)
                columns |= report_columns("validation", scored)
        run.accelerator.wait_for_everyone()  # the main process has written the history
        info = run_info(run, self.progress)
        write_run_report(run, info, columns)
        run.accelerator.wait_for_everyone()  # before the process group ends
        return {"info": info, **columns}

    def cleanup(self) -> None:
        """Close the trackers (their last events flushed) and end the process group, also when
        training stopped on an error or a signal."""
        self.run.accelerator.end_training()

    def _wants_base_scores(self) -> bool:
        cfg = self.run.cfg
        done = (self.run.run_dir / BEFORE_FILE).exists()
        return cfg.eval.enabled and cfg.eval.before and not done

    def _score_base(self, model: torch.nn.Module) -> None:
        before = self._score(model, "before")
        if self.run.accelerator.is_main_process:
            atomic.write_json(self.run.run_dir / BEFORE_FILE, before)

    def _score(
        self, model: torch.nn.Module, label: str, rows: Dataset | None = None
    ) -> dict[str, dict]:
        """Scores on the dev set (or `rows`) by reading; predictions_<label>.jsonl in the run
        dir."""
        run = self.run
        cfg, limit = run.cfg, run.cfg.data.max_target_length
        rows = run.data.eval if rows is None else rows
        return score_model(
            model, run.tokenizer, rows, cfg.eval, limit, run.accelerator, label, run.run_dir
        )


def _read_metrics(cfg: TrainConfig) -> dict:
    return _read_json(Path(cfg.run_dir) / FINISHED_FILE)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
