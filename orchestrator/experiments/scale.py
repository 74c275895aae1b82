"""``orchestrator scale``: a job's throughput and memory across worker counts and strategies.

One short run per (strategy, worker count) point, through the job's launcher, each in its own run
dir under the experiment dir. Weak scaling keeps the per-worker batch (the global batch grows with
the workers); strong scaling keeps the global batch (gradient accumulation shrinks, and a worker
count that does not divide it is a point that cannot run). Per point, from the run's own records:

- step time: the median of ``step_time_s`` over the steps after ``scale.warmup_steps``;
- tokens/s = tokens per step / step time, and per worker = tokens/s / workers;
- scaling efficiency = tokens/s per worker / the same at the strategy's smallest completed worker
  count (weak scaling: T(n0) / T(n); strong: T(n0) x n0 / (T(n) x n), T the step time);
- MFU from the model's FLOPs per token and the device's peak (where known);
- peak memory per rank (GPU: peak allocated; CPU: peak RSS), from every rank's resource records.

A point whose config is rejected, or whose run fails (an OOM, a crash), is recorded with its error
and the sweep goes on. The tables (``scale.csv``, ``scale.json``, ``scale.md``) and plots
(``throughput.svg``, ``efficiency.svg``, ``memory.svg``) are rewritten after every point, so a
sweep in progress can be read; ``orchestrator report`` on the experiment dir shows them with the
runs. Run again, the same command skips every point whose run completed with the same config.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

from omegaconf import OmegaConf

from orchestrator.cluster import jobs
from orchestrator.config.compose import CONF_DIR, compose, override_value, to_config
from orchestrator.config.schema import Config, JobKind, ScaleMode
from orchestrator.errors import UserError, first_line
from orchestrator.launch import run_job
from orchestrator.launch.prepared import PreparedJob, prepare
from orchestrator.launch.ray import ray_session
from orchestrator.launchers.ray import RayLauncherConfig
from orchestrator.report import write_report
from orchestrator.report.scale import COLUMNS, markdown_table, write_outputs
from orchestrator.rundir import REPLACED_DIR, REPORT_FILE, RunDir, RunSummary
from orchestrator.tracking.jsonl import read_jsonl
from orchestrator.tracking.wandb_run import log_experiment


@dataclass
class Point:
    strategy: str
    workers: int
    global_batch_size: int
    config: Config | None = None
    resolved: str | None = None  # the resolved config, as the run saves it (config.yaml)
    job: PreparedJob | None = None  # once prepared
    error: str | None = None  # why it cannot run; None when it can

    @property
    def name(self) -> str:
        return f"{self.strategy}-w{self.workers}"


def scale_command(args: list[str]) -> int:
    """Runs the experiment here, or with ``cluster=NAME`` submits it to that cluster as one Ray job.

    Exit status 0 when every point completed, 1 when one failed or could not run.
    """
    cluster = next((arg.partition("=")[2] for arg in args if arg.startswith("cluster=")), None)
    overrides = [arg for arg in args if not arg.startswith("cluster=") and arg != "--follow"]
    base = to_config(compose(overrides))
    settings = base.scale
    if base.job.kind is JobKind.script:
        raise UserError(
            "job.kind=script: orchestrator scale times orchestrator's own training loop, and a "
            "script job's steps are the script's"
        )
    _check_strategies(settings.strategies)
    job = override_value(overrides, "job") or "default"
    mode = settings.mode.value
    group = base.logger.group or f"scale-{job}-{mode}"
    if cluster is not None:
        return _submit(
            cluster,
            overrides,
            job=job,
            group=group,
            output_dir=settings.output_dir or f"scale/{job}-{mode}",
            follow="--follow" in args,
        )
    return run_experiment(
        base,
        overrides,
        job=job,
        group=group,
        out_dir=Path(settings.output_dir or Path("outputs") / "scale" / f"{job}-{mode}"),
    )


def run_experiment(base: Config, overrides: list[str], *, job: str, group: str, out_dir: Path) -> int:
    """Every point of ``base.scale`` in turn, in this process (each run through the job's launcher)."""
    settings, mode = base.scale, base.scale.mode.value
    points = [
        plan_point(base, overrides, strategy=strategy, workers=workers, group=group)
        for strategy in settings.strategies
        for workers in sorted(settings.workers)
    ]
    for point in points:  # every point is checked before the first one runs
        if point.config is not None and point.resolved is not None:
            try:
                point.job = prepare(point.config, resolved_yaml=point.resolved, job_name=job)
            except UserError as exc:
                point.config, point.error = None, str(exc)
    if all(point.error for point in points):
        raise UserError(f"no point of the experiment can run; {points[0].name}: {points[0].error}")

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "job": job,
        "mode": mode,
        "steps": settings.steps,
        "warmup_steps": settings.warmup_steps,
        "group": group,
        "overrides": overrides,
    }
    write_outputs(out_dir, meta, [measure(point, out_dir, warmup_steps=settings.warmup_steps) for point in points])
    with _launcher_session(base):
        for point in points:
            if point.error is None and not _completed(point, out_dir):
                _run_point(point, out_dir, steps=settings.steps)
            rows = [measure(p, out_dir, warmup_steps=settings.warmup_steps) for p in points]
            write_outputs(out_dir, meta, rows)

    print(markdown_table(rows, mode=mode), flush=True)
    if base.logger.name == "wandb":
        location = log_experiment(
            out_dir,
            settings=base.logger,
            group=group,
            name=f"{group}/summary",
            rows=rows,
            columns=list(COLUMNS[:-2]),
            meta=meta,
        )
        if location:
            print(f"W&B: {location}", flush=True)
    report = _write_report(out_dir)
    print(f"scale dir: {out_dir}" + (f"\nreport: {report}" if report else ""), flush=True)
    return 0 if all(row["status"] == "completed" for row in rows) else 1


def _submit(name: str, overrides: list[str], *, job: str, group: str, output_dir: str, follow: bool) -> int:
    """The experiment as one Ray job on the cluster: its driver runs there, each point a Ray Train run there,
    the experiment dir on the cluster's shared storage (a relative ``scale.output_dir`` is under it)."""
    cluster = jobs.resolve_cluster(name)
    storage = jobs.shared_storage(cluster, purpose="orchestrator scale")
    out_dir = output_dir if Path(output_dir).is_absolute() else f"{storage}/{output_dir}"
    arguments = [o for o in overrides if not o.startswith("scale.output_dir=")] + [f"scale.output_dir={out_dir}"]
    job_id = jobs.submit_experiment(cluster, "scale", arguments, job=job, metadata={"run_dir": out_dir, "group": group})
    print(f"submitted {job_id}  experiment dir {out_dir}", flush=True)
    return jobs.follow_or_hint(cluster, job_id, follow_it=follow)


def plan_point(base: Config, overrides: list[str], *, strategy: str, workers: int, group: str) -> Point:
    """The point's config: the job at ``workers`` x ``strategy``, or the reason it cannot run."""
    settings, trainer = base.scale, base.trainer
    if settings.mode is ScaleMode.weak:  # the job's per-worker batch, at every worker count
        global_batch = trainer.global_batch_size // base.launcher.num_workers * workers
    else:
        global_batch = trainer.global_batch_size
        if global_batch % (trainer.micro_batch_size * workers):
            return Point(
                strategy,
                workers,
                global_batch,
                error=(
                    f"scale.mode=strong keeps trainer.global_batch_size={global_batch}, which {workers} workers x "
                    f"trainer.micro_batch_size={trainer.micro_batch_size} do not divide"
                ),
            )
    point = Point(strategy, workers, global_batch)
    point_overrides = [
        *overrides,
        f"strategy={strategy}",
        f"launcher.num_workers={workers}",
        f"trainer.global_batch_size={global_batch}",
        f"trainer.max_steps={settings.steps}",
        f"scheduler.warmup_steps={min(base.scheduler.warmup_steps, settings.steps)}",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.early_stopping.patience=0",
        "trainer.checkpoint.every=0",
        "trainer.checkpoint.at_end=false",
        "trainer.resume=never",
        "trainer.storage=null",
        f"logger.resources_every={settings.steps}",  # step 1 and the last: peak memory is a high-water mark
        "logger.progress=false",
        f"logger.group={group}",
        "logger.job_type=scale",
    ]
    try:
        cfg = compose(point_overrides)
        point.config = to_config(cfg)  # checked against the machine when prepared, with every other point
    except UserError as exc:
        point.config, point.error = None, str(exc)
        return point
    point.resolved = OmegaConf.to_yaml(cfg, resolve=True)
    return point


def measure(point: Point, out_dir: Path, *, warmup_steps: int) -> dict[str, Any]:
    """The point's row, from its run dir's records (a point that has not run has only its status)."""
    run_dir = out_dir / point.name
    row: dict[str, Any] = {key: None for key in COLUMNS}
    row.update(
        strategy=point.strategy, workers=point.workers, global_batch_size=point.global_batch_size, run_dir=point.name
    )
    if point.error is not None:
        return {**row, "status": "invalid", "error": point.error, "run_dir": None}
    assert point.config is not None
    row["grad_accum_steps"] = point.config.grad_accum_steps
    summary = _read_summary(run_dir)
    if summary is None:
        return {**row, "status": "pending"}
    row["status"], row["error"] = summary.status, summary.error
    files = RunDir(run_dir)
    steps = [r for r in read_jsonl(files.metrics) if r.get("step_time_s") is not None]
    timed = [r["step_time_s"] for r in steps if r["step"] > warmup_steps]
    if row["status"] != "completed":
        return row
    if not timed:
        return {**row, "error": f"no step after scale.warmup_steps={warmup_steps} in {files.metrics}"}
    step_time = statistics.median(timed)
    tokens_per_step = steps[0]["tokens"] / steps[0]["step"]
    tokens_per_s = tokens_per_step / step_time
    peak_flops = summary.peak_flops_per_device
    peaks = peak_memory_per_rank(read_jsonl(files.resources))
    row.update(
        step_time_s=step_time,
        tokens_per_s=tokens_per_s,
        tokens_per_s_per_worker=tokens_per_s / point.workers,
        mfu=(
            summary.flops_per_token * tokens_per_s / (peak_flops * point.workers)
            if peak_flops and summary.flops_per_token is not None
            else None
        ),
        peak_mem_bytes=max(peaks.values()) if peaks else summary.peak_mem_bytes,
        peak_mem_bytes_per_rank=[peaks[rank] for rank in sorted(peaks)],
        model_state_bytes=summary.model_state_bytes or None,
    )
    return row


def peak_memory_per_rank(resources: list[dict[str, Any]]) -> dict[int, int]:
    """Each rank's peak: allocated GPU memory where it has a GPU, else resident memory."""
    peaks: dict[int, int] = {}
    for record in resources:
        value = record.get("gpu_mem_peak_bytes", record.get("rss_peak_bytes"))
        if value is not None:
            peaks[record["rank"]] = max(peaks.get(record["rank"], 0), value)
    return peaks


# ------------------------------------------------------------------------------------------ outputs


# ------------------------------------------------------------------------------------------ running


def _run_point(point: Point, out_dir: Path, *, steps: int) -> None:
    assert point.job is not None
    run_dir = out_dir / point.name
    if run_dir.exists():  # a failed or older run of this point: kept aside, not overwritten
        aside = out_dir / REPLACED_DIR / f"{point.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.parent.mkdir(exist_ok=True)
        shutil.move(str(run_dir), aside)
    print(
        f"scale: {point.name} ({point.workers} worker(s), {point.strategy}, global batch "
        f"{point.global_batch_size}, {steps} steps)",
        flush=True,
    )
    try:
        summary = run_job(point.job, run_dir=run_dir, print_summary=False)
    except Exception as exc:  # noqa: BLE001 - one point's failure (UserError included) is a result, not the end
        summary = RunSummary(status="failed", error=first_line(exc))
        run_dir.mkdir(parents=True, exist_ok=True)
        summary.write(RunDir(run_dir).summary)
    if not summary.completed:
        print(f"scale: {point.name} failed: {summary.error}", file=sys.stderr, flush=True)


def _completed(point: Point, out_dir: Path) -> bool:
    """The point's run completed before, with the config it would run now."""
    run_dir = out_dir / point.name
    summary = _read_summary(run_dir)
    config_file = RunDir(run_dir).config
    return (
        summary is not None and summary.completed and config_file.exists() and config_file.read_text() == point.resolved
    )


def _read_summary(run_dir: Path) -> RunSummary | None:
    """The point's summary; None while it runs, or when it was killed before writing one."""
    try:
        return RunSummary.read(RunDir(run_dir).summary)
    except UserError:  # missing, or cut short
        return None


def _launcher_session(base: Config) -> ContextManager[None]:
    """One Ray for the whole sweep under ``launcher=ray`` (each point would otherwise start its own)."""
    if not isinstance(base.launcher, RayLauncherConfig):
        return nullcontext()
    return ray_session(base.launcher)


def _write_report(out_dir: Path) -> str | None:
    try:
        return str(write_report([out_dir], out_dir / REPORT_FILE))
    except Exception as exc:  # noqa: BLE001 - the tables are written: a report that cannot be drawn is a warning
        print(f"warning: the HTML report could not be written ({first_line(exc)})", file=sys.stderr, flush=True)
        return None


def _check_strategies(names: list[str]) -> None:
    known = sorted(path.stem for path in (CONF_DIR / "strategy").glob("*.yaml"))
    for name in names:
        if name not in known:
            raise UserError(f"scale.strategies: unknown strategy {name!r}; choose from {', '.join(known)}")
