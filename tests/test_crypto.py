"""Real numbers at rest: encrypted in the tables, found by hash, keys rotated."""
from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text

from callctl.service import CallService
from callctl.store import bindings, crypto, db as db_mod, pool, tenants
from callctl.store.crypto import DecryptError, KeyConfigError, KeyRing, new_key
from callctl.store.models import Binding, Block
from callctl.store.reencrypt import key_usage, reencrypt
from callctl.store.spool import CdrSpool

A, AGENT, HOTLINE, X1 = "+8613800000001", "+8613900000001", "+861058000000", "+8617100000001"
STRANGER = "+8613700000002"  # a harasser's number, blocked by caller
CALLCTL = Path(sys.executable).with_name("callctl")
LOOKUP = f"lookup={new_key()}"
K1, K2 = f"k1={new_key()}", f"k2={new_key()}"
ALL_DAY = "00:00-24:00"  # calling hours must not make these tests depend on the time of day


@pytest.fixture
def ring():
    """Install rings by text for one test; the session's ring comes back after it."""
    before = crypto.ring()

    def use(text: str, current: str = "") -> KeyRing:
        installed = KeyRing.parse(text, current)
        crypto.install(installed)
        return installed

    yield use
    crypto.install(before)


@pytest.fixture
def acme(engine):
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours=ALL_DAY)
    pool.add_numbers(engine, "acme", [X1])
    return engine


def add_caller_block(engine, caller: str) -> None:
    with engine.begin() as conn:
        conn.execute(insert(Block), {
            "tenant_id": 1, "scope": "caller", "direction": "both", "reason": "harassment",
            "created_by": "pytest", "caller": caller, "starts_at": datetime.now(timezone.utc) - timedelta(seconds=5)})


def raw_rows(engine) -> str:
    """Every stored value of the two tables holding numbers, as text."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM bindings")).all() + conn.execute(text("SELECT * FROM blocks")).all()
    return repr(rows)


def test_numbers_are_ciphertext_in_the_tables_and_plain_in_python(acme, tmp_path):
    binding = bindings.bind(acme, "acme", A)
    add_caller_block(acme, STRANGER)
    stored = raw_rows(acme)
    assert A not in stored and STRANGER not in stored and A[3:] not in stored
    with acme.connect() as conn:
        party_a, party_a_hash = conn.execute(text("SELECT party_a, party_a_hash FROM bindings")).one()
        caller, caller_hash = conn.execute(text("SELECT caller, caller_hash FROM blocks")).one()
        assert conn.scalar(select(Binding.party_a)) == A  # the model decrypts
    assert party_a.startswith("test:") and caller.startswith("test:")
    assert party_a_hash == crypto.number_hash(A) and caller_hash == crypto.number_hash(STRANGER)
    assert binding["customer"] == "+86138****0001"
    if acme.dialect.name == "sqlite":
        acme.dispose()  # checkpoint the WAL: the whole file, WAL included, has no number
        files = b"".join(p.read_bytes() for p in tmp_path.glob("callctl.db*"))
        assert A[1:].encode() not in files and STRANGER[1:].encode() not in files
        assert b"test:" in files


def test_caller_block_is_found_by_hash_at_call_time(acme, tmp_path):
    bindings.bind(acme, "acme", A)
    service = CallService(acme, CdrSpool(tmp_path / "spool"))
    assert service.route(X1, A)[1].action == "bridge"
    add_caller_block(acme, A)  # a customer's own number blocked (harassing the tenant)
    assert service.route(X1, A)[1].reason == "blocked"
    assert service.route(X1, AGENT)[1].action == "bridge"


def test_encrypted_columns_refuse_sql_comparison():
    with pytest.raises(TypeError, match="number_hash"):
        select(Binding).where(Binding.party_a == A)
    with pytest.raises(TypeError, match="number_hash"):
        select(Block).where(Block.caller.in_([A]))
    select(Binding).where(Binding.party_b.is_(None))  # IS NULL is all SQL may ask


def test_ciphertexts_are_randomised_authenticated_and_name_their_key(ring):
    one = ring(f"{LOOKUP} {K1}")
    a, b = one.seal(A), one.seal(A)
    assert a != b and a.startswith("k1:") and one.open(a) == one.open(b) == A
    key_id, _, body = a.partition(":")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    with pytest.raises(DecryptError, match="fails authentication"):
        one.open(f"{key_id}:{flipped}")
    with pytest.raises(DecryptError, match="k9"):
        one.open("k9:" + body)
    other = KeyRing.parse(f"{LOOKUP} k1={new_key()}")
    with pytest.raises(DecryptError, match="fails authentication"):
        other.open(a)  # same id, different key
    assert KeyRing.parse(f"{LOOKUP} {K2}").hash(A) == one.hash(A)  # the hash follows the lookup secret only
    assert KeyRing.parse(f"lookup={new_key()} {K1}").hash(A) != one.hash(A)


@pytest.mark.parametrize("text, message", [
    ("", "no 'lookup=' secret"),
    (f"{K1}", "no 'lookup=' secret"),
    (f"{LOOKUP}", "no encryption key"),
    (f"{LOOKUP} k1=notbase64!", "not valid base64"),
    (f"{LOOKUP} k1=AAAA", "must be 32 bytes, not 3"),
    (f"{LOOKUP} {K1} {K1}", "listed twice"),
    (f"{LOOKUP} {K1[3:]}", "entries must be ID=BASE64KEY"),
    (f"{LOOKUP} bad/id=AAAA", "entries must be ID=BASE64KEY"),
])
def test_bad_key_rings_are_named(text, message):
    with pytest.raises(KeyConfigError, match=message) as caught:
        KeyRing.parse(text)
    assert K1[3:] not in str(caught.value) and LOOKUP[7:] not in str(caught.value)  # no key in messages


def test_current_key_is_the_last_listed_or_the_named_one():
    assert KeyRing.parse(f"{LOOKUP}\n{K1}\n# old above\n{K2}").current == "k2"
    assert KeyRing.parse(f"{LOOKUP},{K1},{K2}", current="k1").current == "k1"
    with pytest.raises(KeyConfigError, match="current key 'k3' is not in the ring"):
        KeyRing.parse(f"{LOOKUP} {K1}", current="k3")


def test_rotation_rewrites_under_the_current_key_and_the_old_key_can_go(acme, ring, tmp_path):
    ring(f"{LOOKUP} {K1}")
    bindings.bind(acme, "acme", A)
    add_caller_block(acme, AGENT)
    assert key_usage(acme) == {"k1": 2}
    ring(f"{LOOKUP} {K1} {K2}")  # k2 added: current for writes, k1 still read
    service = CallService(acme, CdrSpool(tmp_path / "spool"))
    assert service.route(X1, A)[1].action == "bridge"  # rows under k1 still read
    assert reencrypt(acme, batch=1) == {"bindings": 1, "blocks": 1, "blacklist": 0}
    assert key_usage(acme) == {"k2": 2}
    assert reencrypt(acme) == {"bindings": 0, "blocks": 0, "blacklist": 0}  # nothing left to do
    hashes = raw_hashes(acme)
    ring(f"{LOOKUP} {K2}")  # k1 removed from the ring
    decision = service.route(X1, AGENT)[1]
    assert decision.reason == "blocked"  # the caller block, found by its (stable) hash
    add_caller_block(acme, "+8613700000009")
    with acme.connect() as conn:
        assert conn.scalar(select(Binding.party_a)) == A
        assert sorted(conn.scalars(select(Block.caller))) == ["+8613700000009", AGENT]
    assert raw_hashes(acme)[:2] == hashes


def raw_hashes(engine) -> list:
    with engine.connect() as conn:
        return [conn.scalar(text("SELECT party_a_hash FROM bindings")),
                conn.scalar(text("SELECT caller_hash FROM blocks ORDER BY id LIMIT 1"))]


def test_rehash_after_a_new_lookup_secret(acme, ring, tmp_path):
    ring(f"{LOOKUP} {K1}")
    bindings.bind(acme, "acme", A)
    add_caller_block(acme, AGENT)
    ring(f"lookup={new_key()} {K1}")
    service = CallService(acme, CdrSpool(tmp_path / "spool"))
    assert service.route(X1, AGENT)[1].action == "bridge"  # stale hash: the block is not found
    assert reencrypt(acme, rehash=True) == {"bindings": 1, "blocks": 1, "blacklist": 0}
    assert service.route(X1, AGENT)[1].reason == "blocked"


def test_a_row_under_a_removed_key_is_a_clear_error(acme, ring):
    ring(f"{LOOKUP} {K1}")
    bindings.bind(acme, "acme", A)
    ring(f"{LOOKUP} {K2}")
    with pytest.raises(DecryptError, match="'k1' which is not in the key ring"), acme.connect() as conn:
        conn.scalar(select(Binding.party_a))
    assert key_usage(acme) == {"k1": 1}  # `callctl keys list` shows what is stranded


def test_upgrade_encrypts_numbers_stored_before_encryption(tmp_path, monkeypatch):
    engine = db_mod.make_engine(f"sqlite:///{tmp_path}/old.db")
    every = db_mod.migrations
    monkeypatch.setattr(db_mod, "migrations", lambda dialect: every(dialect)[:1])  # 0001 only
    db_mod.upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tenants (name, hotline) VALUES ('acme', '+861058000000')")
        conn.exec_driver_sql("INSERT INTO virtual_numbers (e164, tenant_id, state) VALUES ('+8617100000001', 1, 'bound')")
        conn.exec_driver_sql(f"INSERT INTO bindings (tenant_id, number_id, mode, party_a) VALUES (1, 1, 'AXN', '{A}')")
        conn.exec_driver_sql("INSERT INTO blocks (tenant_id, scope, direction, caller, reason, created_by, starts_at)"
                             f" VALUES (1, 'caller', 'both', '{AGENT}', 'old', 'x', '2026-01-01 00:00:00')")
    monkeypatch.setattr(db_mod, "migrations", every)
    assert "0010_numbers_encrypted" in db_mod.upgrade(engine)
    assert A not in raw_rows(engine) and AGENT not in raw_rows(engine)
    assert key_usage(engine) == {"test": 2}
    with engine.connect() as conn:
        assert conn.scalar(select(Binding.party_a)) == A
        assert conn.scalar(select(Binding.party_a_hash)) == crypto.number_hash(A)
        assert conn.scalar(select(Block.caller_hash)) == crypto.number_hash(AGENT)
    engine.dispose()


def cli(*args, env, cwd):
    return subprocess.run([str(CALLCTL), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def test_cli_generate_rotate_list_with_a_key_file(tmp_path):
    keys = tmp_path / "callctl.keys"
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": f"sqlite:///{tmp_path}/callctl.db",
           "CALLCTL_KEY_FILE": str(keys)}
    run = lambda *args: cli(*args, env=env, cwd=tmp_path)
    done = run("db", "upgrade")
    assert done.returncode == 2 and "key file" in done.stderr and "callctl keys generate" in done.stderr
    assert run("keys", "generate", "--id", "old").returncode == 0
    assert oct(keys.stat().st_mode & 0o777) == "0o600"
    assert run("db", "upgrade").returncode == 0
    assert run("tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT).returncode == 0
    assert run("pool", "add", "--tenant", "acme", X1).returncode == 0
    assert run("bind", "--tenant", "acme", "--customer", A).returncode == 0
    assert run("keys", "generate", "--id", "new").returncode == 0
    listed = run("keys", "list").stdout
    assert "old" in listed and "new  current (writes)  0" in listed
    rotated = run("keys", "rotate")
    assert rotated.returncode == 0 and "under key 'new': blacklist 0, bindings 1, blocks 0" in rotated.stdout
    keys.write_text("\n".join(line for line in keys.read_text().splitlines() if not line.startswith("old=")))
    listed = run("keys", "list").stdout
    assert "new  current (writes)  1" in listed and "old" not in listed
    assert A not in (tmp_path / "callctl.db").read_bytes().decode("latin-1")
    again = run("keys", "generate", "--id", "new").stderr.strip()
    assert again.startswith("callctl: key error:") and "has a key 'new' already (" in again  # then the config read
    keys.chmod(0o644)
    done = run("keys", "list")
    assert done.returncode == 2 and "readable by others (mode 644); chmod 600" in done.stderr


def test_daemon_with_a_bad_key_stops_at_startup(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": f"sqlite:///{tmp_path}/callctl.db",
           "CALLCTL_AGI_LISTEN": "127.0.0.1:0", "CALLCTL_KEYS": "lookup=AAAA k1=AAAA"}
    done = cli("serve", "asterisk", env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("callctl: key error: CALLCTL_KEYS: key 'lookup' must be 32 bytes, not 3 (")
