"""The schema that `callctl db upgrade` builds from sql/ is the schema the models describe."""
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from callctl.store.db import migrations, upgrade
from callctl.store.models import Base


# SQLAlchemy cannot reflect SQLite's expression indexes: they are checked below instead.
@pytest.mark.filterwarnings("ignore:.*expression-based index")
def test_migrated_schema_matches_models(engine):
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = [d for d in compare_metadata(context, Base.metadata)
                if not (d[0] == "remove_table" and d[1].name == "schema_migrations")]
    assert diff == []


def test_call_facts_indexes_as_the_models_say(engine):
    """The indexes the call-time facts rely on (0070), column for column, on both
    databases (on PostgreSQL the comparison above sees them too)."""
    query = ("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
             if engine.dialect.name == "sqlite" else "SELECT indexname, indexdef FROM pg_indexes")
    with engine.connect() as conn:
        ddl = dict(conn.execute(text(query)).all())

    def plain(columns: str) -> str:  # without spaces, casts, table names and parentheses
        for noise in (" ", "::text", "bindings.", "(", ")"):
            columns = columns.replace(noise, "")
        return columns

    for index in Base.metadata.tables["bindings"].indexes:
        if index.name in ("ix_binding_number_status", "ix_binding_party_a_hash", "ix_binding_party_b_hash"):
            stored = ddl[index.name].split(" (", 1)[1].rsplit(")", 1)[0]
            assert plain(stored) == plain(",".join(str(e) for e in index.expressions)), index.name


@pytest.mark.filterwarnings("ignore:.*expression-based index")
def test_partial_unique_index_exists(engine):
    names = {ix["name"] for ix in inspect(engine).get_indexes("bindings")}
    assert "ux_binding_axn_number" in names


def test_upgrade_is_idempotent_and_recorded(engine):
    assert upgrade(engine) == []
    with engine.connect() as conn:
        versions = [r[0] for r in conn.execute(text("SELECT version FROM schema_migrations"))]
    assert versions == [p.stem for p in migrations(engine.dialect.name)]
