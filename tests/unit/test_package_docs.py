"""Every package says what it offers: its `__init__` opens with a docstring naming its public names (or the
modules to import them from), and every name its `__all__` lists can be imported from it."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _package_inits() -> dict[str, Path]:
    """Each package of pyproject's list that has an `__init__.py` (data folders are namespace packages)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {name: ROOT / folder for name, folder in config["package-dir"].items()}
    found = {}
    for package in config["packages"]:
        base = max((n for n in roots if package == n or package.startswith(n + ".")), key=len)
        init = roots[base].joinpath(*package[len(base):].strip(".").split(".")) / "__init__.py" \
            if package != base else roots[base] / "__init__.py"
        if init.exists():
            found[package] = init
    return found


def _bound_names(tree: ast.Module) -> tuple[set[str], list[str]]:
    """The names an `__init__` binds (imports, also under TYPE_CHECKING; defs; assignments; keys of a lazy
    map) and its `__all__`, read from the source: importing every package would load the whole project."""
    bound: set[str] = set()
    exported: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                bound.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
                if isinstance(target, ast.Name) and target.id == "__all__":
                    exported = list(ast.literal_eval(node.value))
            if isinstance(node.value, ast.Dict):
                keys = node.value.keys
                bound.update(k.value for k in keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
    return bound, exported


def test_every_package_init_states_its_public_names() -> None:
    inits = _package_inits()
    assert {"hivemesh", "hivemesh.v1", "hivemesh.mesh", "hivemesh.sdk", "hivemesh.controlplane"} <= set(inits)
    for name, init in inits.items():
        tree = ast.parse(init.read_text())
        assert len((ast.get_docstring(tree) or "").split()) >= 8, f"say what {name} offers in its __init__ docstring"
        bound, exported = _bound_names(tree)
        missing = [n for n in exported if n not in bound]
        assert not missing, f"{name}.__all__ names what it does not have: {missing}"

def _readme_folders() -> dict[str, tuple[str, str]]:
    """The README's folder table: folder -> (import name, what), from its `| folder | import name | what |` rows."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| folder | import name | what |")
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        folder, name, what = (cell.strip() for cell in line.strip("|").split("|"))
        rows[folder.strip("`")] = (name.strip("`"), what)
    return rows


def test_the_readme_folder_table_matches_the_layout() -> None:
    rows = _readme_folders()
    generated = {"build", "dist", "certs"}  # certs/: what `hivemesh certs init` writes; may not exist yet
    on_disk = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
               and not p.name.endswith(".egg-info") and p.name not in generated}
    listed = {folder.rstrip("/") for folder in rows if "/" not in folder.rstrip("/")}
    assert on_disk <= listed, f"add to the README's folder table: {sorted(on_disk - listed)}"
    assert listed - on_disk <= generated, f"the README lists folders that do not exist: {listed - on_disk}"
    # The import names are the package-dir mapping of pyproject.toml.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for name, folder in config["package-dir"].items():
        if name != "hivemesh":
            assert rows[f"{folder}/"][0] == name, folder
    assert rows["protos/"][0] == "hivemesh.v1"
    # Every subpackage (and every test tier) is named in its parent folder's row, or has a row of its own.
    for parent in ("mesh", "sdk", "controlplane", "agents", "tests"):
        for sub in sorted(p for p in (ROOT / parent).iterdir() if (p / "__init__.py").exists()):
            own = f"{parent}/{sub.name}/"
            assert own in rows or f"`{sub.name}/`" in rows[f"{parent}/"][1], f"README: name {own} in its row"


def _readme_error_names() -> list[str]:
    """The exception names the README's error table lists (`| exception | status | reason |`)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| exception | status | reason |")
    names: list[str] = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        first = line.strip("|").split("|")[0]
        names += [part.strip("` ") for part in first.split("`") if part.strip().endswith("Error")]
    return names


def test_every_error_the_readme_names_and_every_mesh_error_is_importable_from_the_sdk() -> None:
    """The README's error table sits under `from hivemesh.sdk import ...`: each class it names, and every
    HivemeshError a call can raise, is there (they lived only in hivemesh.mesh.errors, an internal module)."""
    import inspect

    import hivemesh.sdk as sdk
    from hivemesh.mesh import errors

    named = _readme_error_names()
    assert len(named) >= 25 and "PolicyDeniedError" in named and "AgentUnavailableError" in named, named
    defined = {name for name, cls in vars(errors).items()
               if inspect.isclass(cls) and issubclass(cls, errors.HivemeshError) and cls.__module__ == errors.__name__}
    missing = sorted(n for n in {*named, *defined} if getattr(sdk, n, None) is not getattr(errors, n, object()))
    assert not missing, f"not importable from hivemesh.sdk: {missing}"
    assert not [n for n in defined if n not in sdk.__all__], "every error is in hivemesh.sdk.__all__"
