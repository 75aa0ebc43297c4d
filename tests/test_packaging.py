"""What a non-editable install ships: every package of the source tree and the migrations."""
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_package_and_migration_folder_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    in_tree = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "callctl").rglob("__init__.py")}
    assert in_tree <= listed, f"packages missing from pyproject.toml: {sorted(in_tree - listed)}"
    migrations = {f"callctl.sql.{d.name}" for d in (REPO / "sql").iterdir() if any(d.glob("*.sql"))}
    assert migrations <= listed and all(config["package-data"][m] == ["*.sql"] for m in migrations)
