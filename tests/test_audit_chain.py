"""The audit chain resists rewriting by someone with write access to the database: rows
are MACed with the audit key, which is not in the database; the head is checkpointed
outside it, so a cut tail or an emptied table is found; a chain from before the key is
sealed by `db upgrade` (issue #15, item 7). SQLite and PostgreSQL."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from callctl.store import bindings, db as db_mod, pool, reveal, tenants
from callctl.store.models import AuditEntry, utcnow
from tests import realnumbers
from tests.test_cli import run
from tests.test_reveal import make_log

X = "+8617100000061"
AGENT, HOTLINE = realnumbers.tenant_line("+8613900000061", "+861058000061")
CUSTOMER = realnumbers.person("+8613800000061")


@pytest.fixture
def bound(engine, tmp_path):
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT])
    pool.add_numbers(engine, "acme", [X])
    reveal.use_checkpoint(tmp_path / "audit-head")
    yield engine, bindings.bind(engine, "acme", CUSTOMER)["id"]
    reveal.use_checkpoint(None)


def rows(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(AuditEntry).order_by(AuditEntry.id))]


def replace_log(engine, new_rows: list[dict]) -> None:
    """Write access to the database: the log emptied and refilled (past PostgreSQL's
    append-only trigger, as its owner or a superuser can)."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        conn.execute(delete(AuditEntry))
        if new_rows:
            conn.execute(insert(AuditEntry), new_rows)


def rewrite(engine, kept: list[dict], start: int, until: int | None = None) -> None:
    """What an attacker without the key can do: renumber the kept rows 1..n and recompute
    the hashes of rows start..until with the published (unkeyed) formula."""
    prev, new_rows = reveal.GENESIS, []
    for number, row in enumerate(kept, 1):
        row = {**row, "id": number}
        if start <= number <= (until or len(kept)):
            row["prev_hash"], row["hash"] = prev, reveal.entry_hash(prev, row)
        prev = row["hash"]
        new_rows.append(row)
    replace_log(engine, new_rows)


@pytest.mark.parametrize("start", [1, 2])
def test_a_removed_row_renumbered_and_rehashed_is_found(bound, start):
    engine, binding = bound
    make_log(engine, binding)
    before = rows(engine)
    rewrite(engine, before[:1] + before[2:], start)  # row 2 gone, 3 and 4 now 2 and 3
    result = reveal.verify(engine)
    assert not result["ok"] and result["bad_row"] == start and "does not match its MAC" in result["problem"]


def test_a_cut_tail_or_an_emptied_table_is_found_by_the_checkpoint(bound, tmp_path):
    engine, binding = bound
    make_log(engine, binding)  # every append advanced the checkpoint: row 4
    assert json.loads((tmp_path / "audit-head").read_text())["id"] == 4
    with Session(engine) as session, session.begin():  # any writer's append, e.g. a preference change
        reveal.append(session, "support:li", "preference_set", None, {"calls": "none"})
    assert json.loads((tmp_path / "audit-head").read_text())["id"] == 5
    replace_log(engine, rows(engine)[:4])
    result = reveal.verify(engine)
    assert (result["ok"], result["bad_row"]) == (False, 5) and "ends at row 4" in result["problem"]
    replace_log(engine, [])
    result = reveal.verify(engine)
    assert (result["ok"], result["bad_row"]) == (False, 1) and "ends at row 0" in result["problem"]
    forged = json.loads((tmp_path / "audit-head").read_text()) | {"id": 0}
    (tmp_path / "audit-head").write_text(json.dumps(forged))  # a checkpoint is signed: not movable
    with pytest.raises(reveal.CheckpointError, match="not signed with the audit key"):
        reveal.verify(engine)


def test_a_chain_from_before_the_key_is_sealed_by_upgrade(bound):
    engine, _binding = bound
    legacy = [{"id": n, "at": utcnow().replace(microsecond=0), "actor": "alice", "action": "reveal_requested",
               "grant_id": None, "detail": json.dumps({"case_reference": f"CLM-{n}"}), "prev_hash": "", "hash": ""}
              for n in (1, 2, 3)]
    rewrite(engine, legacy, 1)  # written by an older callctl: plain SHA-256
    db_mod.upgrade(engine)
    sealed = rows(engine)[-1]
    assert (sealed["id"], sealed["action"], json.loads(sealed["detail"])) == (4, "chain_keyed", {"legacy_rows": 3})
    assert reveal.verify(engine) == {"ok": True, "rows": 4, "head": sealed["hash"]}
    db_mod.upgrade(engine)
    assert len(rows(engine)) == 4  # sealed once
    kept = rows(engine)
    kept[1]["actor"] = "mallory"
    rewrite(engine, kept, 2, until=3)  # a legacy row changed, the legacy hashes redone: the seal pins them
    result = reveal.verify(engine)
    assert (result["ok"], result["bad_row"]) == (False, 4) and "prev_hash" in result["problem"]


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # the store is checked on both above
def test_cli_audit_verify_names_the_first_tampered_row(bound, tmp_path):
    engine, binding = bound
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": engine.url.render_as_string(hide_password=False),
           "CALLCTL_AUDIT_CHECKPOINT": str(tmp_path / "cli-head")}
    cli = lambda *args: run(*args, env=env, cwd=tmp_path)  # noqa: E731
    made = cli("reveal", "request", "--binding", str(binding), "--scenario", "claim", "--case", "CLM-8", "--by", "ann")
    assert made.returncode == 0, made.stderr
    grant = json.loads(made.stdout)["id"]
    assert cli("reveal", "refuse", str(grant), "--by", "ben").returncode == 0
    assert cli("reveal", "approve", str(grant), "--by", "ben").returncode == 1  # decided already: logged
    verified = cli("audit", "verify")
    assert verified.returncode == 0 and verified.stdout.startswith("audit log intact: 3 row(s)")
    kept = tmp_path / "kept-elsewhere"
    kept.write_text(verified.stdout.splitlines()[-1].removeprefix("checkpoint: "))
    before = rows(engine)
    rewrite(engine, before[:1] + before[2:], 2)
    broken = cli("audit", "verify")
    assert broken.returncode == 4 and "audit log TAMPERED: row 2: its content does not match its MAC" in broken.stderr
    replace_log(engine, [])
    (tmp_path / "cli-head").unlink()  # even with this process's checkpoint gone: the copy kept elsewhere
    emptied = cli("audit", "verify", "--checkpoint", str(kept))
    assert emptied.returncode == 4 and "row 1: missing: the log ends at row 0" in emptied.stderr
