"""dvc.yaml is honest: each stage's `deps` name every chromoseg module its command imports, directly
or indirectly (lazy imports inside functions included), so editing one reruns every stage it feeds.

The import graph is read from the source (AST), starting from the CLI function of each stage's
`chromoseg <subcommand>`; `cli.py` itself is the thin entry point and not a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CLI = SRC / "chromoseg" / "cli.py"


def module_file(name: str) -> Path | None:
    """`chromoseg.data.scale` -> src/chromoseg/data/scale.py (or the package's __init__.py)."""
    base = SRC.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def imported_modules(tree: ast.AST) -> set[str]:
    """chromoseg modules imported anywhere in `tree` (any nesting level, lazy imports included)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "chromoseg")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "chromoseg":
                continue
            out.add(node.module)
            # `from chromoseg import distributed`: the name is a module itself.
            out.update(
                f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")
            )
    return {m for m in out if module_file(m)}


def with_packages(modules: set[str]) -> set[str]:
    """Importing chromoseg.data.scale runs chromoseg/__init__.py and chromoseg/data/__init__.py."""
    out = set(modules)
    for m in modules:
        parts = m.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def closure(start: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(with_packages(start))
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        tree = ast.parse(module_file(m).read_text())
        todo.extend(with_packages(imported_modules(tree)) - seen)
    return seen


def command_function(subcommand: str) -> ast.FunctionDef:
    """The typer function behind `chromoseg <subcommand>` in cli.py."""
    tree = ast.parse(CLI.read_text())
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            if isinstance(dec, ast.Call) and getattr(dec.func, "attr", None) == "command":
                name = dec.args[0].value if dec.args else node.name.replace("_", "-")
                if name == subcommand:
                    return node
    raise AssertionError(f"no `chromoseg {subcommand}` command in {CLI}")


def cli_top_level_imports() -> set[str]:
    """What cli.py imports at module level: loaded before any command runs."""
    tree = ast.parse(CLI.read_text())
    top = ast.Module(
        body=[n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], type_ignores=[]
    )
    return imported_modules(top)


def stage_modules(cmd: str) -> set[str]:
    words = cmd.split()
    assert words[0] == "chromoseg", f"stage command {cmd!r} is not a chromoseg subcommand"
    start = imported_modules(command_function(words[1])) | cli_top_level_imports()
    return closure(start) - {"chromoseg.cli"}


def has_code(path: Path) -> bool:
    """A module with more than a docstring and constants (a package __init__ with its docstring and
    `__version__` changes no result)."""
    body = ast.parse(path.read_text()).body
    inert = (ast.Expr, ast.Assign)
    return any(not (isinstance(n, inert) and isinstance(n.value, ast.Constant)) for n in body)


def missing_deps(stage: dict) -> list[str]:
    deps = {str(Path(d)) for d in stage.get("deps", [])}
    need = {module_file(m).relative_to(ROOT).as_posix() for m in stage_modules(stage["cmd"])}
    need = {p for p in need if has_code(ROOT / p)}
    return sorted(need - deps)


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_every_imported_module(name: str) -> None:
    missing = missing_deps(STAGES[name])
    assert not missing, f"dvc.yaml stage {name!r} imports but does not list in deps: {missing}"


def test_the_check_catches_a_removed_dependency() -> None:
    stage = dict(STAGES["evaluate"])
    stage["deps"] = [d for d in stage["deps"] if d != "src/chromoseg/separate.py"]
    assert missing_deps(stage) == ["src/chromoseg/separate.py"]


def test_lazy_imports_inside_functions_are_followed() -> None:
    # evaluate -> pipeline, whose postprocess imports chromoseg.separate inside the function.
    assert "chromoseg.separate" in stage_modules("chromoseg evaluate")
    assert "chromoseg.geometry" in stage_modules("chromoseg evaluate")


def test_training_and_evaluation_do_not_import_the_http_layer() -> None:
    for stage in ("train", "evaluate"):
        mods = stage_modules(STAGES[stage]["cmd"])
        assert "chromoseg.serving" not in mods and "chromoseg.mlmodel" not in mods, stage
    assert "chromoseg.serving" in stage_modules(STAGES["register"]["cmd"])


def test_inference_settings_rerun_evaluation_and_registration_only() -> None:
    assert "infer" not in STAGES["train"]["params"]
    for stage in ("evaluate", "register"):
        assert "infer" in STAGES[stage]["params"], stage


def test_register_reads_the_test_split_and_the_checkpoint() -> None:
    deps = STAGES["register"]["deps"]
    assert "data/prepared/test.npz" in deps and "models" in deps


def test_no_import_cycles() -> None:
    graph = {}
    for f in (SRC / "chromoseg").rglob("*.py"):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = imported_modules(ast.parse(f.read_text())) - {name}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(n) :], n]))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
