"""What a non-editable install ships: every package of the source tree and the
migrations, and every third-party module callctl imports as a runtime dependency."""
import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_package_and_migration_folder_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    in_tree = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "callctl").rglob("__init__.py")}
    assert in_tree <= listed, f"packages missing from pyproject.toml: {sorted(in_tree - listed)}"
    migrations = {f"callctl.sql.{d.name}" for d in (REPO / "sql").iterdir() if any(d.glob("*.sql"))}
    assert migrations <= listed and all(config["package-data"][m] == ["*.sql"] for m in migrations)


def third_party_imports() -> dict[str, set[str]]:
    """Top-level modules imported anywhere in callctl/ (lazy imports in functions too)
    that are neither the standard library nor callctl itself -> the files importing them."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "callctl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top != "callctl" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def undeclared(pyproject: str) -> dict[str, list[str]]:
    """Modules callctl imports whose installed distribution is not one of the [project]
    dependencies of this pyproject text (test extras do not count: a plain install
    lacks them) -> the files that import them."""
    declared = {_normal(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec).group())
                for spec in tomllib.loads(pyproject)["project"]["dependencies"]}
    providers = packages_distributions()
    return {module: sorted(files) for module, files in sorted(third_party_imports().items())
            if not declared & {_normal(d) for d in providers.get(module, [])}}


def test_every_third_party_import_is_a_declared_runtime_dependency():
    """A plain `pip install callctl` must give every command what it imports (httpx was
    once only in the test extras: every webhook command failed on a plain install)."""
    imports = third_party_imports()
    assert {"sqlalchemy", "httpx", "panoramisk"} <= set(imports)  # the scan sees lazy imports too
    missing = undeclared((REPO / "pyproject.toml").read_text())
    assert not missing, f"imported by callctl/ but not in [project] dependencies: {missing}"
