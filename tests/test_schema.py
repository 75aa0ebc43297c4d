"""The schema that `callctl db upgrade` builds from sql/ is the schema the models describe."""
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from callctl.store.db import migrations, upgrade
from callctl.store.models import Base


def test_migrated_schema_matches_models(engine):
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = [d for d in compare_metadata(context, Base.metadata)
                if not (d[0] == "remove_table" and d[1].name == "schema_migrations")]
    assert diff == []


def test_partial_unique_index_exists(engine):
    names = {ix["name"] for ix in inspect(engine).get_indexes("bindings")}
    assert "ux_binding_axn_number" in names


def test_upgrade_is_idempotent_and_recorded(engine):
    assert upgrade(engine) == []
    with engine.connect() as conn:
        versions = [r[0] for r in conn.execute(text("SELECT version FROM schema_migrations"))]
    assert versions == [p.stem for p in migrations(engine.dialect.name)]
