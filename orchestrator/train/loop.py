"""The training loop: one for every strategy and every launcher.

``Trainer.fit`` reads top to bottom: step, log, evaluate, checkpoint, until ``trainer.max_steps`` or
early stopping. Everything that depends on how the model is built, replicated or sharded sits behind
the Strategy; everything that depends on how workers were started sits in the launcher. All ranks
make every decision (skip a step, stop early, save) from values that are identical on all of them.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from orchestrator.checkpoints import manifest
from orchestrator.config.schema import Config, OnNonFinite
from orchestrator.data import load_data
from orchestrator.data.sampler import StreamSampler, eval_indices
from orchestrator.distributed import DistContext
from orchestrator.errors import TrainingError, UserError, first_line
from orchestrator.models import build_model, describe_model, meta_device, model_blocks, pretrained_weights
from orchestrator.models.lora import lora_for
from orchestrator.models.recipe import InMemoryWeights, ModelRecipe, WeightSource, state_shapes
from orchestrator.rundir import STOPPED_BY_SEARCH, RunDir
from orchestrator.strategies import build_strategy, read_model_weights
from orchestrator.strategies.base import FP16_OVERFLOW, StepOutcome
from orchestrator.tracking.resources import ResourceSampler, peak_memory_bytes
from orchestrator.tracking.tracker import Tracker
from orchestrator.tracking.wandb_run import WandbRun, run_metadata
from orchestrator.train.checkpoint import Checkpointer, first_valid
from orchestrator.train.losses import build_loss
from orchestrator.train.optim import build_optimizer, lr_at
from orchestrator.train.profile import StepProfiler, trace_files
from orchestrator.train.storage import RunStorage, Uploads
from orchestrator.train.throughput import mfu, peak_flops_per_device

# fp16 loss scaling skips an overflowing step and halves the scale; this many in a row means the
# gradients are not finite at any scale, which the non-finite policy then handles.
MAX_OVERFLOWS_IN_A_ROW = 25

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TrainState:
    """What a checkpoint holds besides model, optimizer and RNG: enough to continue exactly."""

    step: int = 0
    tokens_seen: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)
    first_eval_loss: float | None = None
    last_eval_loss: float | None = None
    best_eval_loss: float | None = None
    last_eval_accuracy: float | None = None  # classifiers only
    evals_since_best: int = 0
    stopped_early: bool = False
    stopped_by_search: bool = False  # a search's scheduler stopped the trial (on_eval)
    nonfinite_skips: int = 0
    nonfinite_in_a_row: int = 0
    overflow_skips: int = 0
    overflows_in_a_row: int = 0
    wandb_run_id: str | None = None  # logger=wandb: a resumed run continues the same W&B run


class Trainer:
    """Builds a job's pieces in one worker process and trains.

    Args:
        config: the validated job config.
        run_dir: the run directory (shared by all ranks).
        dist: this worker's ranks and device (process group already initialized).
        restarts: how many times the launcher restarted the workers; a restart resumes this run.
        on_checkpoint: called on every rank after each complete checkpoint, with its directory and
            step (Ray Train registers it, so a restart knows where the run stands).
        on_eval: a search trial's: called on rank 0 after each eval with the step and the eval's metrics;
            its answer (False: the search stops the run here) is shared with every rank.
    """

    def __init__(
        self,
        config: Config,
        *,
        run_dir: Path,
        dist: DistContext,
        restarts: int,
        on_checkpoint: Callable[[Path, int], None] | None = None,
        on_eval: Callable[[int, dict[str, float]], bool] | None = None,
    ) -> None:
        self.config, self.run_dir, self.dist, self.restarts = config, run_dir, dist, restarts
        self.on_checkpoint, self.on_eval = on_checkpoint, on_eval
        trainer = config.trainer
        self.data = load_data(config.data)
        spec = self.data.spec
        self.loss = build_loss(trainer, spec, data_name=config.data.name)
        with meta_device():
            reference = build_model(config.model, spec)  # sizes and shapes, nothing allocated
        recipe = ModelRecipe(
            build=partial(build_model, config.model, spec),
            blocks=partial(model_blocks, config.model),
            initial_state=self._initial_state(trainer.init_from, reference),
            freeze=tuple(trainer.freeze),
            adapters=lora_for(config.model),
        )
        with meta_device():
            recipe.finish(reference)  # the model as it trains: with its adapters
        self.model_info = describe_model(config.model, spec, reference)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.strategy = build_strategy(config, dist=dist)
        self.strategy.setup(recipe, build_optimizer=partial(build_optimizer, config.optim))
        torch.manual_seed(config.seed + 1 + dist.rank)  # but different dropout masks per rank

        self.sampler = StreamSampler(
            len(self.data.train),
            micro_batch_size=trainer.micro_batch_size,
            rank=dist.rank,
            world_size=dist.world_size,
            seed=config.seed,
        )
        self.eval_batches = eval_indices(
            len(self.data.val),
            batches=trainer.eval_batches,
            micro_batch_size=trainer.micro_batch_size,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        self.checkpointer = Checkpointer(
            RunDir(run_dir).checkpoints,
            dist=dist,
            strategy=self.strategy,
            strategy_name=config.strategy.name,
            keep=trainer.checkpoint.keep,
            model_shapes=state_shapes(reference),
            background=trainer.checkpoint.async_save,
        )
        self.storage = RunStorage(trainer.storage) if trainer.storage else None
        self.uploads = Uploads(trainer.storage, run_dir) if trainer.storage and dist.is_main else None
        self.state = TrainState()
        self.resumed_from: int | None = None
        self.tokens_per_step = trainer.global_batch_size * spec.tokens_per_sample
        self.peak_flops = peak_flops_per_device(dist.device, trainer.precision, override_tflops=trainer.peak_tflops)
        self.resources = ResourceSampler(dist.device)
        self.step_times: list[float] = []
        self.last_loss: float | None = None

    # ------------------------------------------------------------------------------------ the loop

    def _save(self) -> None:
        self._commit(wait=True)  # at most one save in flight
        directory = self.checkpointer.save(self.state.step, asdict(self.state))
        if directory is not None:
            self._saved(directory)

    def _commit(self, *, wait: bool) -> None:
        """Completes a save written in the background, if every rank has written it (``wait``: once it has)."""
        directory = self.checkpointer.commit(wait=wait)
        if directory is not None:
            self._saved(directory)

    def _saved(self, directory: Path) -> None:
        if self.uploads is not None:
            self.uploads.submit(directory, keep=[d.name for d in manifest.checkpoint_dirs(self.checkpointer.root)])
        if self.on_checkpoint is not None:
            self.on_checkpoint(directory, manifest.checkpoint_step(directory))

    def fit(self) -> dict[str, Any]:
        """Trains to the end; returns the run summary (``failed`` with the reason for a training error)."""
        trainer = self.config.trainer
        started = time.perf_counter()
        try:
            self._resume()
        except UserError as exc:
            return self._summary(wall_s=0.0, error=str(exc))
        if self._finished():  # what the checkpoint knows of the run: a driver that died at the end wrote no summary
            return {**self._summary(wall_s=0.0), "already_complete": True}
        tracker = Tracker(
            self.run_dir,
            enabled=self.dist.is_main,
            max_steps=trainer.max_steps,
            resume_step=self.resumed_from,
            progress=self.config.logger.progress,
            wandb=self._wandb_run(),
        )
        profiler = StepProfiler.create(
            trainer.profile,
            run_dir=self.run_dir,
            rank=self.dist.rank,
            device=self.dist.device,
            next_step=self.state.step + 1,
        )
        error = None
        try:
            if trainer.eval_every and trainer.eval_at_start and self.state.step == 0:
                self._evaluate(tracker)
            last_saved = self.resumed_from
            while not self._finished():
                if profiler is not None:
                    profiler.begin_step(self.state.step + 1)
                metrics = self._train_step()
                step = self.state.step
                if profiler is not None:
                    profiler.end_step(step)
                self._commit(wait=False)
                if step % trainer.log_every == 0 or step == trainer.max_steps:
                    tracker.log_step(step, metrics)
                if step % self.config.logger.resources_every == 0 or step == 1:
                    tracker.log_resources(step, self.dist.gather_objects(self.resources.sample()) or [])
                if trainer.eval_every and step % trainer.eval_every == 0:
                    self._evaluate(tracker)
                if trainer.checkpoint.every and step % trainer.checkpoint.every == 0:
                    self._save()
                    last_saved = step
            if trainer.eval_every and self.state.step % trainer.eval_every != 0:
                self._evaluate(tracker)
            if trainer.checkpoint.at_end and last_saved != self.state.step:
                self._save()
        except TrainingError as exc:
            error = str(exc)
        except BaseException:
            tracker.close(None)
            raise
        finally:
            if profiler is not None:
                profiler.close()  # a window the run's end cut short: the steps that ran
        if profiler is not None and profiler.steps:  # the same steps on every rank
            self.dist.barrier()  # every rank's trace is written
            tracker.save_traces(trace_files(self.run_dir))
        try:
            self._commit(wait=True)  # the run ends with its last save complete
        except TrainingError as exc:
            error = error or str(exc)
        summary = self._summary(wall_s=time.perf_counter() - started, error=error or self._diverged())
        tracker.close(summary)
        if self.uploads is not None:
            self.uploads.submit()  # the final records
            if not self.uploads.close(timeout_s=trainer.storage_timeout_s):
                log.warning(
                    "trainer.storage=%s: copies not done within trainer.storage_timeout_s=%g s were "
                    "stopped; the storage may lack the newest checkpoint (the run dir has everything)",
                    self.uploads.uri,
                    trainer.storage_timeout_s,
                )
        return summary

    def _wandb_run(self) -> WandbRun | None:
        """Rank 0's W&B run (logger=wandb), under the id the checkpoint keeps (a new one on a fresh start)."""
        if self.config.logger.name != "wandb":
            return None
        if self.state.wandb_run_id is None:
            import uuid

            self.state.wandb_run_id = self.dist.broadcast_object(uuid.uuid4().hex[:12] if self.dist.is_main else None)
        if not self.dist.is_main:
            return None
        config = self.config
        resolved = RunDir(self.run_dir).config
        return WandbRun(
            self.run_dir,
            run_id=self.state.wandb_run_id,
            settings=config.logger,
            name=f"{self.run_dir.parent.name}/{self.run_dir.name}",
            config={
                **(yaml.safe_load(resolved.read_text()) if resolved.exists() else {}),
                "run": run_metadata(
                    world_size=self.dist.world_size,
                    strategy=config.strategy.name,
                    launcher=config.launcher.name,
                    device=self.dist.device,
                ),
            },
        )

    def _finished(self) -> bool:
        state = self.state
        return state.step >= self.config.trainer.max_steps or state.stopped_early or state.stopped_by_search

    def _train_step(self) -> dict[str, Any]:
        started = time.perf_counter()
        loss, data_time = self._forward_backward()
        lr = lr_at(
            self.config.scheduler,
            base_lr=self.config.optim.lr,
            step=self.state.step,
            max_steps=self.config.trainer.max_steps,
        )
        outcome = self._update(loss, lr=lr)
        state = self.state
        state.step += 1
        state.tokens_seen += self.tokens_per_step
        state.sampler = self.sampler.state_dict()
        step_time = time.perf_counter() - started
        self.step_times.append(step_time)
        self.last_loss = loss
        tokens_per_s = self.tokens_per_step / step_time
        metrics: dict[str, Any] = {
            "loss": loss,
            "lr": lr,
            "grad_norm": outcome.grad_norm,
            "step_time_s": step_time,
            "data_time_s": data_time,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_worker": tokens_per_s / self.dist.world_size,
            "samples_per_s": self.config.trainer.global_batch_size / step_time,
            "tokens": state.tokens_seen,
            "epoch": self.sampler.epoch,
            "mem_peak_bytes": peak_memory_bytes(self.dist.device),
        }
        utilization = mfu(
            flops_per_token=self.model_info.flops_per_token,
            tokens_per_s=tokens_per_s,
            peak_flops=self.peak_flops,
            num_devices=self.dist.world_size,
        )
        if utilization is not None:
            metrics["mfu"] = utilization
        if outcome.skipped:
            metrics["skipped"] = outcome.skipped
        return metrics

    def _forward_backward(self) -> tuple[float, float]:
        """Forward and backward over the step's micro-batches; the mean loss over all ranks, and data time."""
        strategy, accum = self.strategy, self.config.grad_accum_steps
        data_time = 0.0
        loss_sum = torch.zeros((), device=self.dist.device)
        for micro_step in range(accum):
            fetch_started = time.perf_counter()
            inputs, targets = self._to_device(self.data.train_batch(self.sampler.next_draw()))
            data_time += time.perf_counter() - fetch_started
            with strategy.accumulate(sync=micro_step == accum - 1):
                with strategy.autocast():
                    loss = self.loss(strategy.model(inputs), targets)
                strategy.backward(loss)
            loss_sum += loss.detach()
        loss_mean = self.dist.all_reduce_sum(loss_sum / accum) / self.dist.world_size
        return loss_mean.item(), data_time  # the step's host sync

    def _update(self, loss: float, *, lr: float) -> StepOutcome:
        """The optimizer update, unless the loss or the gradients are not finite."""
        state = self.state
        if math.isfinite(loss):
            outcome = self.strategy.step(lr=lr, max_norm=self.config.trainer.grad_clip, guard=self._grad_norm_ok)
        else:
            self._reject(f"non-finite loss ({loss})")
            self.strategy.discard_gradients()
            outcome = StepOutcome(grad_norm=math.nan, applied=False, skipped=f"non-finite loss ({loss})")
        problem = outcome.skipped
        if outcome.skipped == FP16_OVERFLOW:
            state.overflow_skips += 1
            state.overflows_in_a_row += 1
            if state.overflows_in_a_row < MAX_OVERFLOWS_IN_A_ROW:
                return outcome  # the loss scaler's business: neither a non-finite skip nor a good step
            problem = f"fp16 gradients overflowed {state.overflows_in_a_row} steps in a row"
            self._reject(problem)
        else:
            state.overflows_in_a_row = 0
        if problem is None:
            state.nonfinite_in_a_row = 0
            return outcome
        # trainer.on_nonfinite=skip skipped it: a few in a row are a spike, many are a run that diverged.
        in_a_row, limit = state.nonfinite_in_a_row + 1, self.config.trainer.max_consecutive_skips
        if in_a_row > limit:
            raise TrainingError(
                f"{problem} at step {state.step + 1}, {in_a_row} non-finite steps in a row (more than "
                f"trainer.max_consecutive_skips={limit}): the run has diverged; lower optim.lr"
            )
        state.nonfinite_skips += 1
        state.nonfinite_in_a_row = in_a_row
        return outcome

    def _grad_norm_ok(self, grad_norm: float) -> bool:
        if math.isfinite(grad_norm):
            return True
        self._reject(f"non-finite gradient norm ({grad_norm})")
        return False

    def _reject(self, problem: str) -> None:
        """Applies ``trainer.on_nonfinite`` to a step that must not be applied: raise, or let it be skipped."""
        if self.config.trainer.on_nonfinite is OnNonFinite.error:
            raise TrainingError(
                f"{problem} at step {self.state.step + 1}, before the optimizer step; set "
                f"trainer.on_nonfinite=skip to skip such steps, or lower optim.lr"
            )

    def _diverged(self) -> str | None:
        """Why a run that reached its end cannot count as completed: its last loss is not finite; else None."""
        for name, value in (("training loss", self.last_loss), ("eval loss", self.state.last_eval_loss)):
            if value is not None and not math.isfinite(value):
                return (
                    f"the final {name} is not finite ({value}) at step {self.state.step}: the run has diverged; "
                    f"lower optim.lr"
                )
        return None

    @torch.no_grad()
    def _evaluate(self, tracker: Tracker) -> None:
        """Mean loss (and a classifier's accuracy) over the fixed eval batches of all ranks, never augmented;
        sets ``stopped_early`` when patience runs out."""
        model = self.strategy.model
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.dist.device)  # loss sum, targets, hits
        for indices in self.eval_batches:
            inputs, targets = self._to_device(self.data.val.get_batch(indices))
            with self.strategy.autocast():
                outputs = model(inputs)
            totals[0] += self.loss(outputs, targets, reduction="sum").double()
            totals[1] += targets.numel()
            if self.loss.hits is not None:
                totals[2] += self.loss.hits(outputs, targets)
        model.train()
        loss_sum, count, hits = self.dist.all_reduce_sum(totals).tolist()
        eval_loss = loss_sum / count
        state, patience = self.state, self.config.trainer.early_stopping
        tracker.log_eval(state.step, eval_loss)
        state.last_eval_loss = eval_loss
        if self.loss.hits is not None:
            state.last_eval_accuracy = hits / count
            tracker.message(f"step {state.step}: eval accuracy {state.last_eval_accuracy:.2%}")
        if state.first_eval_loss is None:
            state.first_eval_loss = eval_loss
        if state.best_eval_loss is None or eval_loss < state.best_eval_loss - patience.min_delta:
            state.best_eval_loss, state.evals_since_best = eval_loss, 0
        else:
            state.evals_since_best += 1
        state.stopped_early = bool(patience.patience) and state.evals_since_best >= patience.patience
        if state.stopped_early:
            tracker.message(
                f"early stopping at step {state.step}: eval loss has not improved for "
                f"{patience.patience} evaluations (best {state.best_eval_loss:.4f})"
            )
        if self.on_eval is not None:
            accuracy = state.last_eval_accuracy
            metrics = {"eval_loss": eval_loss, **({"eval_accuracy": accuracy} if accuracy is not None else {})}
            go_on = self.dist.broadcast_object(self.on_eval(state.step, metrics) if self.dist.is_main else None)
            if not go_on and not self._finished():
                state.stopped_by_search = True
                tracker.message(f"stopped by the search's scheduler at step {state.step}")

    # ---------------------------------------------------------------------------------- plumbing

    def _to_device(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        if self.dist.device.type == "cuda":
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs.to(self.dist.device, non_blocking=True), targets.to(self.dist.device, non_blocking=True)

    def _initial_state(self, path: str | None, reference: nn.Module) -> Callable[[], WeightSource] | None:
        """The weights to start from: ``trainer.init_from``'s checkpoint (resolved and verified now, read when
        the strategy asks), or ``model.pretrained``'s files (read a tensor at a time), or None."""
        if not path:
            source = pretrained_weights(self.config.model, reference)
            return None if source is None else lambda: source
        directory = first_valid(lambda: manifest.candidates(path, key="trainer.init_from"), dist=self.dist)
        if directory is None:
            raise UserError(f"trainer.init_from={path}: no valid checkpoint there")
        written_by = manifest.read_manifest(directory).strategy
        return lambda: InMemoryWeights(
            read_model_weights(directory, written_by=written_by), key=f"trainer.init_from={path}"
        )

    def _resume(self) -> None:
        resume = self.config.trainer.resume_from
        if self.storage is not None and (not resume.never or self.restarts > 0):
            self._fetch_from_storage(self.storage)
        directory = self.checkpointer.find_resume(resume, restarted=self.restarts > 0)
        if directory is not None:
            self.state = TrainState(**self.checkpointer.restore(directory))
            try:
                self.sampler.load_state_dict(self.state.sampler)
            except ValueError as exc:
                raise UserError(f"checkpoint {directory} does not fit this data: {exc}") from None
            self.resumed_from = self.state.step
            if self.dist.is_main:
                print(f"resumed from {directory} (step {self.state.step})", flush=True)
        self.checkpointer.prepare(start_step=self.state.step)

    def _fetch_from_storage(self, storage: RunStorage) -> None:
        """Rank 0 fetches trainer.storage's newest checkpoint where the run dir has none as new."""
        outcome: tuple[str | None, str | None] = (None, None)
        if self.dist.is_main:
            try:
                outcome = (storage.fetch_newer(self.run_dir), None)
            except Exception as exc:  # every rank raises it below, none is left waiting
                outcome = (
                    None,
                    f"trainer.storage={storage.uri}: cannot fetch its checkpoints ({first_line(exc)})",
                )
        fetched, error = self.dist.broadcast_object(outcome)
        if error is not None:
            raise UserError(error)
        if fetched is not None and self.dist.is_main:
            print(f"fetched {fetched} from {storage.uri}", flush=True)

    def _summary(self, *, wall_s: float, error: str | None = None) -> dict[str, Any]:
        # The first step of a process pays for warm-up (allocator, kernel selection): leave it out.
        steady = self.step_times[1:] or self.step_times
        step_time = statistics.median(steady) if steady else None
        tokens_per_s = self.tokens_per_step / step_time if step_time else None
        memory = self.strategy.memory()
        summary = {
            "status": "failed" if error else STOPPED_BY_SEARCH if self.state.stopped_by_search else "completed",
            "steps": self.state.step,
            "final_loss": self.last_loss,
            "first_eval_loss": self.state.first_eval_loss,
            "final_eval_loss": self.state.last_eval_loss,
            "best_eval_loss": self.state.best_eval_loss,
            "final_eval_accuracy": self.state.last_eval_accuracy,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_worker": tokens_per_s / self.dist.world_size if tokens_per_s else None,
            "step_time_s_median": step_time,
            "mfu": mfu(
                flops_per_token=self.model_info.flops_per_token,
                tokens_per_s=tokens_per_s or 0.0,
                peak_flops=self.peak_flops,
                num_devices=self.dist.world_size,
            ),
            "tokens_seen": self.state.tokens_seen,
            "world_size": self.dist.world_size,
            "strategy": self.config.strategy.name,
            "device": self.dist.device.type,
            "restarts": self.restarts,
            "resumed_from_step": self.resumed_from,
            "stopped_early": self.state.stopped_early,
            "nonfinite_skips": self.state.nonfinite_skips,
            "overflow_skips": self.state.overflow_skips,
            "num_params": self.model_info.num_params,
            "num_trainable_params": self.model_info.num_trainable_params,
            "flops_per_token": self.model_info.flops_per_token,
            "peak_flops_per_device": self.peak_flops,
            "param_bytes": memory.param_bytes,
            "grad_bytes": memory.grad_bytes,
            "optimizer_bytes": memory.optimizer_bytes,
            "master_bytes": memory.master_bytes,
            "peak_mem_bytes": peak_memory_bytes(self.dist.device),
            "train_wall_s": wall_s,
        }
        if error:
            summary["error"] = error
        return summary
