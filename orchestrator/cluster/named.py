"""Named clusters: ``conf/cluster/NAME.yaml`` says where a cluster's job API is and where its token is.

A file holds ``address`` (the head's dashboard URL, which serves the Job Submission API),
``token_file`` (null: the token ``orchestrator cluster up --name NAME`` stored on this machine) and
``storage`` (a path every node mounts, where runs write their run dirs; or a URI each run is mirrored
to with ``trainer.storage``; null: this checkout's ``outputs/``, which only a cluster on this machine
can use).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator.config.compose import CONF_DIR
from orchestrator.errors import UserError

CLUSTER_DIR = CONF_DIR / "cluster"
DEFAULT_CLUSTER = "local"


@dataclass(frozen=True, kw_only=True)
class Cluster:
    name: str
    address: str
    token_file: Optional[Path]  # None: a cluster without token auth
    storage: Optional[str] = None


def user_config_dir() -> Path:
    """orchestrator's per-user directory: $ORCHESTRATOR_CONFIG_DIR, else $XDG_CONFIG_HOME/orchestrator."""
    if os.environ.get("ORCHESTRATOR_CONFIG_DIR"):
        return Path(os.environ["ORCHESTRATOR_CONFIG_DIR"])
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "orchestrator"


def state_dir(name: str) -> Path:
    """Where ``cluster up --name NAME`` keeps its token, its node processes' pids and their logs."""
    return user_config_dir() / "clusters" / name


def default_token_file(name: str) -> Path:
    return state_dir(name) / "token"


def available() -> list[str]:
    return sorted(path.stem for path in CLUSTER_DIR.glob("*.yaml"))


def load_cluster(name: str) -> Cluster:
    """The cluster ``conf/cluster/NAME.yaml`` describes.

    Raises:
        UserError: no such file, or a key that is missing or unknown.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = CLUSTER_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(
            f"cluster={name}: no such cluster; choose one of: {', '.join(available())} (files under {CLUSTER_DIR})"
        )
    try:
        fields = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except OmegaConfBaseException as exc:
        raise UserError(f"{path}: {str(exc).splitlines()[0]}") from None
    allowed = {"address", "token_file", "storage"}
    unknown = set(fields) - allowed
    if unknown:
        raise UserError(f"{path}: unknown key {sorted(unknown)[0]!r}; allowed keys: {', '.join(sorted(allowed))}")
    address = fields.get("address")
    if not isinstance(address, str) or not address.startswith(("http://", "https://")):
        raise UserError(f"{path}: address must be the head's job API URL (http://HOST:8265), got {address!r}")
    token_file = fields.get("token_file")
    return Cluster(
        name=name,
        address=address.rstrip("/"),
        storage=fields.get("storage"),
        token_file=Path(token_file).expanduser() if token_file else default_token_file(name),
    )


def read_token(cluster: Cluster) -> str:
    """The cluster's token, from a file only its owner may read.

    Raises:
        UserError: no token file, or one that others can read.
    """
    path = cluster.token_file
    assert path is not None
    if not path.is_file():
        hint = (
            f"is it up? `orchestrator cluster up --name {cluster.name}`"
            if path == default_token_file(cluster.name)
            else "set token_file in the cluster's YAML"
        )
        raise UserError(f"cluster={cluster.name}: no token at {path} ({hint})")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"cluster={cluster.name}: token file {path} is readable by others; chmod 600 {path}")
    token = path.read_text().strip()
    if not token:
        raise UserError(f"cluster={cluster.name}: token file {path} is empty")
    return token


def write_token(path: Path, token: str) -> None:
    """Writes ``token`` with mode 0600 from the first byte (never readable by others), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, token.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
