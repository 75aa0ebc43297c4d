"""Does this key ring belong to this database? Checked at every start, before any work.

The daemon, the API and every command that touches stored numbers compare the ring's
check values (crypto.KeyRing.checks: an HMAC of a fixed label under each secret) with
the ones in `key_checks`:

- stored and different: `KeyMismatch` naming the secret (never a key); the program
  stops (exit 2). A wrong lookup secret would otherwise miss every caller block and
  every AXB/AXE party; a wrong key under a known id would fail every call.
- not stored yet (the first start after the upgrade that added the table, or a key new
  to the ring): the secret is first tried on what the database already holds (a number
  stored under that key id must decrypt; a stored lookup hash must be the ring's hash of
  its number; the newest audit entry must carry the ring's MAC), then its check value is
  stored. A database with nothing under it yet takes the ring's secret as the right one.
"""
from __future__ import annotations

import hmac

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from callctl.store import crypto
from callctl.store.crypto import AUDIT, LOOKUP, DecryptError, KeyConfigError, KeyRing
from callctl.store.models import KeyCheck

TABLE_MIGRATION = "0085_key_checks"
_WHY = {
    LOOKUP: ("the lookup secret ('lookup=') is not the one this database's lookup hashes were made with: "
             "restore it (after a deliberate change: 'callctl keys rotate --rehash'; docs/keys.md)"),
    AUDIT: ("the audit key is not the one this database's audit log is signed with: restore it (it is "
            "'audit=', or when absent 'lookup=': after replacing 'lookup=' keep the old value as 'audit='; "
            "docs/keys.md)"),
}


class KeyMismatch(KeyConfigError):
    """The ring holds another secret than the one the database was written with."""


def _mismatch(name: str) -> KeyMismatch:
    if name in _WHY:
        return KeyMismatch(_WHY[name])
    key_id = name.split(":", 1)[1]
    return KeyMismatch(f"key '{key_id}' is not the key this database's numbers under '{key_id}' were "
                       "written with: restore the right key file (docs/keys.md)")


def verify(engine: Engine, ring: KeyRing | None = None, *, new_lookup: bool = False) -> list[str]:
    """Raise KeyMismatch unless every secret of the ring matches its stored check value;
    store the check values not stored yet (after probing the data). new_lookup: the
    lookup secret may differ (`keys rotate --rehash` runs; it stores the new one at its
    end, store_lookup). Returns the names whose check value was stored now."""
    ring = ring or crypto.ring()
    with engine.connect() as conn:
        stored = dict(conn.execute(select(KeyCheck.name, KeyCheck.check_value)).all())
    missing = []
    for name, value in ring.checks.items():
        if name not in stored:
            missing.append(name)
        elif not hmac.compare_digest(stored[name], value) and not (name == LOOKUP and new_lookup):
            raise _mismatch(name)
    if not missing:
        return []
    with engine.connect() as conn:
        for name in sorted(missing, key=lambda n: not n.startswith("key:")):  # keys first: probes decrypt
            if not _probe(conn, ring, name, new_lookup):
                raise _mismatch(name)
    with engine.begin() as conn:
        conn.execute(_insert(engine).values([{"name": n, "check_value": ring.checks[n]} for n in missing])
                     .on_conflict_do_nothing())
        stored = dict(conn.execute(select(KeyCheck.name, KeyCheck.check_value)).all())
    for name in missing:  # another process may have stored its own at the same moment
        if not hmac.compare_digest(stored[name], ring.checks[name]) and not (name == LOOKUP and new_lookup):
            raise _mismatch(name)
    return missing


def store_lookup(engine: Engine, ring: KeyRing | None = None) -> None:
    """After `keys rotate --rehash`: the new lookup secret is the database's from now on."""
    ring = ring or crypto.ring()
    with engine.begin() as conn:
        conn.execute(_insert(engine).values(name=LOOKUP, check_value=ring.checks[LOOKUP])
                     .on_conflict_do_update(index_elements=["name"], set_={"check_value": ring.checks[LOOKUP]}))


def _insert(engine: Engine):
    return (postgresql if engine.dialect.name == "postgresql" else sqlite).insert(KeyCheck)


def _probe(conn: Connection, ring: KeyRing, name: str, new_lookup: bool) -> bool:
    """Is the ring's secret `name` consistent with the data written before checks existed?"""
    from callctl.store.reencrypt import _raw, encrypted_columns

    if name == AUDIT:
        from callctl.store.reveal import newest_entry_signed_by

        return newest_entry_signed_by(conn, ring)
    key_ids = [name.split(":", 1)[1]] if name.startswith("key:") else list(ring.keys)
    for table, columns in encrypted_columns():
        for column in columns:
            raw = _raw(table, column)
            for key_id in key_ids:
                prefix = key_id + ":"
                row = conn.execute(select(raw, table.c[f"{column}_hash"])
                                   .where(func.substr(raw, 1, len(prefix)) == prefix).limit(1)).first()
                if row is None:
                    continue
                try:
                    number = ring.open(row[0])
                except DecryptError:
                    return False
                return name != LOOKUP or new_lookup or hmac.compare_digest(row[1] or "", ring.hash(number))
    return True  # nothing stored under it yet
