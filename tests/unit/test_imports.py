"""The package's layers, read from the source: no import cycle, no import of a higher layer, and a
package module imported inside a function only where it pulls in a heavy dependency (and says so)."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator

import orchestrator

PACKAGE = Path(orchestrator.__file__).parent

# Bottom first. A module may import its own layer and the layers below it, never one above. A module is
# in the layer of the most specific pattern it matches (``fnmatch``, a package's pattern covering its
# modules; at equal depth a name beats a wildcard).
LAYERS = (
    ("orchestrator", "errors", "fsutil", "logs", "rundir"),  # the standard library only
    ("checkpoints",),  # manifest, digests, allow-listed unpickling: knows no config, strategy or model
    ("config.schema",),  # the typed Config's dataclasses: knows nothing of the package above it
    # Each strategy's and each launcher's spec: its config class, checkpoint format, memory model, checks.
    ("strategies", "launchers"),
    ("config",),  # composition and the machine checks: knows no data, model or strategy engine
    ("distributed", "data", "models", "tracking"),
    ("strategies.base", "strategies.blocks", "strategies.weights", "strategies.*.engine"),  # torch engines
    ("train",),
    ("report",),  # reads run dirs' files
    ("launch",),  # the driver of one run
    ("cluster",),
    ("experiments", "export", "search"),  # commands made of runs
    ("cli", "__main__"),
)
# Third-party packages that take seconds to import, or that a command may not have installed: the
# one reason to import a package module inside a function.
HEAVY = {"torch", "deepspeed", "ray", "wandb", "transformers", "peft", "tokenizers", "sklearn", "safetensors"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported orchestrator module
    local: bool  # inside a function
    line: int
    text: str  # the statement, and the line above it


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _scan() -> tuple[dict[str, set[str]], list[Import]]:
    """Each module's top-level third-party imports, and every import of a package module."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    third_party: dict[str, set[str]] = {name: set() for name in paths}
    imports: list[Import] = []
    for name, path in paths.items():
        lines = path.read_text().splitlines()
        for node, local in _import_nodes(ast.parse(path.read_text()), local=False):
            for target in _targets(node, name, paths):
                if target.startswith("orchestrator"):
                    text = "\n".join(lines[node.lineno - 2 : node.end_lineno])
                    imports.append(Import(name, target, local, node.lineno, text))
                elif not local:
                    third_party[name].add(target.split(".")[0])
    return third_party, imports


def _import_nodes(node: ast.AST, *, local: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement that runs, and whether it is inside a function."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _import_nodes(child, local=True)
        elif isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            continue  # annotations only: never executed
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local
        else:
            yield from _import_nodes(child, local=local)


def _targets(node: ast.Import | ast.ImportFrom, module: str, paths: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if paths[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    found = []
    for alias in node.names:  # `from package import module` imports the module
        candidate = f"{base}.{alias.name}"
        found.append(candidate if candidate in paths else base)
    return [_known(target, paths) for target in found]


def _known(target: str, paths: dict[str, Path]) -> str:
    while target not in paths and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def _layer(module: str) -> int:
    name = module.split(".", 1)[1] if "." in module else module
    matches = [
        ((pattern.count(".") + 1, "*" not in pattern), index)
        for index, patterns in enumerate(LAYERS)
        for pattern in patterns
        if fnmatch(name, pattern) or fnmatch(name, pattern + ".*")
    ]
    if not matches:
        raise AssertionError(f"{module}: in no layer of LAYERS; add its package there")
    return max(matches)[1]


def test_no_module_imports_a_higher_layer() -> None:
    _, imports = _scan()
    upward = [f"{i.source}:{i.line} imports {i.target}" for i in imports if _layer(i.target) > _layer(i.source)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle() -> None:
    _, imports = _scan()
    graph: dict[str, set[str]] = {}
    for i in imports:
        if i.source != i.target:
            graph.setdefault(i.source, set()).add(i.target)
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                walk(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    assert not cycles, "\n".join(cycles)


def test_package_modules_are_imported_inside_functions_only_for_a_heavy_dependency() -> None:
    third_party, imports = _scan()
    top_level: dict[str, set[str]] = {}
    for i in imports:
        if not i.local:
            top_level.setdefault(i.source, set()).add(i.target)

    def heavy(module: str, seen: set[str]) -> bool:
        if module in seen:
            return False
        seen.add(module)
        parents = [".".join(module.split(".")[:n]) for n in range(2, module.count(".") + 1)]
        return bool(third_party.get(module, set()) & HEAVY) or any(
            heavy(other, seen) for other in [*parents, *top_level.get(module, ())]
        )

    problems = []
    for i in imports:
        if not i.local:
            continue
        if "# lazy:" not in i.text:
            problems.append(f"{i.source}:{i.line}: a function-local import without a '# lazy: <reason>' comment")
        elif not heavy(i.target, set()):
            problems.append(f"{i.source}:{i.line}: {i.target} imports nothing heavy: import it at the top")
    assert not problems, "\n".join(problems)


def test_composing_checking_and_reading_specs_import_no_torch_or_ray() -> None:
    """The driver's light path (compose, the machine checks, estimate's tables, checkpoint formats) stays
    light: a strategy's engine, and torch with it, is imported only when a strategy is built or a checkpoint
    read; a launcher's, and Ray with it, only when workers start."""
    code = (
        "import sys\n"
        "from orchestrator.config.checks import check_environment\n"
        "from orchestrator.config.compose import compose, to_config\n"
        "from orchestrator.strategies import strategy_specs, checkpoint_format\n"
        "for launcher in ('local', 'ray'):\n"
        "    config = to_config(compose(['strategy=zero3', f'launcher={launcher}', 'launcher.num_workers=1']))\n"
        "    check_environment(config)\n"
        "specs = strategy_specs()\n"
        "assert checkpoint_format('fsdp2') == 'dcp'\n"
        "print(sorted(m for m in ('torch', 'deepspeed', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
