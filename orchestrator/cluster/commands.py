"""The ``cluster``, ``submit``, ``jobs`` and ``run-submitted`` commands (argument parsing and printing)."""

from __future__ import annotations

import argparse
import json
from typing import NoReturn

from orchestrator.cluster import jobs, local
from orchestrator.cluster.jobs import run_submitted
from orchestrator.config.hydra_compat import sweep_points
from orchestrator.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one line, exit 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")


def cluster_command(args: list[str]) -> int:
    """``orchestrator cluster up | status | down``: a Ray cluster of several nodes on this machine."""
    parser = _Parser(prog="orchestrator cluster", description="A Ray cluster on this machine, token-authenticated.")
    commands = parser.add_subparsers(dest="action", required=True)
    up = commands.add_parser("up", help="start a head and N-1 worker nodes")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument(
        "--cpus-per-node", type=int, default=None, help="logical CPUs each node offers (default: cores / nodes)"
    )
    up.add_argument("--host", default="127.0.0.1", help="the address nodes bind (non-loopback needs token auth)")
    up.add_argument("--port", type=int, default=6379, help="the head's GCS port")
    up.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and job API, on 127.0.0.1")
    up.add_argument("--no-auth", action="store_true", help="no token authentication (loopback only)")
    up.add_argument(
        "--storage", default=None, help="where submitted runs write their run dirs (default: the checkout's outputs/)"
    )
    for name in ("status", "down"):
        commands.add_parser(name)
    for sub in commands.choices.values():
        sub.add_argument("--name", default="local", help="the cluster's name (conf/cluster/NAME.yaml, cluster=NAME)")
    parsed = parser.parse_args(args)

    if parsed.action == "up":
        state = local.up(
            name=parsed.name,
            nodes=parsed.nodes,
            cpus_per_node=parsed.cpus_per_node,
            host=parsed.host,
            port=parsed.port,
            dashboard_port=parsed.dashboard_port,
            auth=not parsed.no_auth,
            storage=parsed.storage,
        )
        print(
            f"cluster {state.name!r} is up: {len(state.nodes)} nodes x {state.cpus_per_node} CPUs\n"
            f"  dashboard / job API  {state.dashboard_url}\n"
            f"  Ray address          {state.gcs_address}   (launcher.address={state.gcs_address})\n"
            f"  token                {state.token_file or 'none (--no-auth)'}\n"
            f"  submit               orchestrator submit cluster={state.name} job=NAME\n"
            f"  stop                 orchestrator cluster down --name {state.name}",
            flush=True,
        )
        return 0
    if parsed.action == "down":
        stopped = local.down(parsed.name)
        print(f"cluster {parsed.name!r}: " + (f"{stopped} node(s) stopped" if stopped else "is not up"))
        return 0
    report = local.status(parsed.name)
    for key, value in report.items():
        print(f"{key:16} {value}")
    return 0 if report["nodes_alive"] > 0 else 1


def submit_command(args: list[str]) -> int:
    """``orchestrator submit [cluster=NAME] [-m] job=NAME [overrides]``: one Ray job per point."""
    from datetime import datetime

    if any(arg in ("-h", "--help") for arg in args):
        print("usage: orchestrator submit [cluster=NAME] [-m] [--follow] job=NAME [group=option ...] [key=value ...]")
        return 0
    multirun = any(arg in ("-m", "--multirun") for arg in args)
    follow = "--follow" in args
    name = jobs.default_cluster()
    overrides = []
    for arg in args:
        if arg.startswith("cluster="):
            name = arg.partition("=")[2]
        elif arg not in ("-m", "--multirun", "--follow"):
            overrides.append(arg)
    cluster = jobs.resolve_cluster(name)
    points = sweep_points(overrides) if multirun else [overrides]
    group = f"sweep-{datetime.now():%Y%m%d-%H%M%S}" if multirun else None
    submitted = jobs.submit(cluster, points, group=group)
    for submission in submitted:
        print(f"submitted {submission.job_id}  run dir {submission.run_dir}", flush=True)
    if group:
        print(f"group {group} ({len(submitted)} jobs)", flush=True)
    if not follow:
        print(f"follow: orchestrator jobs logs {submitted[-1].job_id} --follow --cluster {name}")
        return 0
    failed = 0
    for submission in submitted:
        jobs.job_logs(cluster, submission.job_id, follow=True)
        status = jobs.wait(cluster, submission.job_id)
        print(f"{submission.job_id}: {status}", flush=True)
        failed += status != "SUCCEEDED"
    return 1 if failed else 0


def jobs_command(args: list[str]) -> int:
    """``orchestrator jobs list | status ID | logs ID [--follow] | stop ID``."""
    parser = _Parser(prog="orchestrator jobs", description="Jobs on a Ray cluster (conf/cluster/NAME.yaml).")
    commands = parser.add_subparsers(dest="action", required=True)
    commands.add_parser("list")
    for name in ("status", "logs", "stop"):
        commands.add_parser(name).add_argument("job_id")
    commands.choices["logs"].add_argument("--follow", "-f", action="store_true")
    for sub in commands.choices.values():
        sub.add_argument("--cluster", default=jobs.default_cluster())
        sub.add_argument("--json", action="store_true")
    parsed = parser.parse_args(args)
    cluster = jobs.resolve_cluster(parsed.cluster)

    if parsed.action == "list":
        rows = jobs.list_jobs(cluster)
        if parsed.json:
            print(json.dumps(rows, indent=1))
            return 0
        print(f"{'id':48} {'status':10} {'job':22} {'started':20} run dir")
        for row in rows:
            print(f"{row['id']:48} {row['status']:10} {row['job']:22} {row['started']:20} {row['run_dir']}")
        return 0
    if parsed.action == "status":
        info = jobs.job_info(cluster, parsed.job_id)
        report = {
            "id": parsed.job_id,
            "status": str(info.status.value),
            "message": info.message,
            "entrypoint": info.entrypoint,
            "metadata": info.metadata,
            "started": jobs.format_time(info.start_time),
            "ended": jobs.format_time(info.end_time),
        }
        if parsed.json:
            print(json.dumps(report, indent=1))
        else:
            for key, value in report.items():
                print(f"{key:11} {value}")
        return 0
    if parsed.action == "logs":
        jobs.job_logs(cluster, parsed.job_id, follow=parsed.follow)
        return 0
    stopped = jobs.stop_job(cluster, parsed.job_id)
    print(f"{parsed.job_id}: {'stop requested' if stopped else 'already ended'}")
    return 0


def run_submitted_command(args: list[str]) -> int:
    return run_submitted(args)
