"""Key rotation at rest: re-encrypt stored numbers under the current key, in batches.

Every EncryptedNumber column of the model is covered (with its `<column>_hash`), so a
column added later rotates without changes here. Each batch is one transaction that
locks its rows; daemons keep routing meanwhile (they read every key in the ring).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable

from sqlalchemy import String, and_, case, func, inspect, or_, select, type_coerce, update
from sqlalchemy.engine import Engine

from callctl.store import crypto
from callctl.store.models import Base, EncryptedNumber

_E164 = re.compile(r"\+[1-9][0-9]{1,14}")


def encrypted_columns() -> list[tuple]:
    """(table, [number column names]) for every table holding encrypted numbers."""
    found = []
    for table in Base.metadata.sorted_tables:
        names = [c.name for c in table.columns if isinstance(c.type, EncryptedNumber)]
        if names:
            found.append((table, names))
    return found


def _raw(table, name):
    return type_coerce(table.c[name], String)  # the stored text, not decrypted


def reencrypt(
    engine: Engine,
    batch: int = 1000,
    only_plaintext: bool = False,
    rehash: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Rewrite every stored number not under the current key (or, with only_plaintext,
    every number stored before encryption) under the current key, with its lookup hash
    recomputed. rehash=True rewrites all rows (after the lookup secret changed).
    Returns rows rewritten per table."""
    ring = crypto.ring() if not only_plaintext else None
    done: dict[str, int] = {}
    present = set(inspect(engine).get_table_names())  # a schema part-way through its migrations
    for table, names in encrypted_columns():
        if table.name not in present:
            continue
        if only_plaintext:
            stale = [and_(table.c[n].is_not(None), ~_raw(table, n).contains(":")) for n in names]
        elif rehash:
            stale = [table.c[n].is_not(None) for n in names]
        else:
            prefix = ring.current + ":"
            stale = [
                and_(table.c[n].is_not(None), func.substr(_raw(table, n), 1, len(prefix)) != prefix)
                for n in names
            ]
        count, last_id = 0, None
        while True:
            with engine.begin() as conn:
                query = select(table.c.id, *[_raw(table, n).label(n) for n in names]).where(or_(*stale))
                if last_id is not None:
                    query = query.where(table.c.id > last_id)
                rows = conn.execute(query.order_by(table.c.id).limit(batch).with_for_update()).all()
                if not rows:
                    break
                for row in rows:
                    values = {}
                    for n in names:
                        number = _plain(getattr(row, n), table.name, n, row.id)
                        values[n] = number  # EncryptedNumber seals it under the current key
                        values[f"{n}_hash"] = None if number is None else crypto.number_hash(number)
                    conn.execute(update(table).where(table.c.id == row.id).values(values))
                last_id = rows[-1].id
                count += len(rows)
            if progress:
                progress(table.name, count)
        done[table.name] = count
    return done


def _plain(stored: str | None, table: str, column: str, row_id) -> str | None:
    if stored is None:
        return None
    if crypto.key_id_of(stored) is None:
        if not _E164.fullmatch(stored):
            raise crypto.DecryptError(f"{table}.{column} of row {row_id} is neither a ciphertext nor a number")
        return stored  # written before encryption
    return crypto.ring().open(stored)


def key_usage(engine: Engine) -> dict[str, int]:
    """Stored numbers per key id ('plaintext' for numbers written before encryption):
    a key may leave the ring once it counts zero."""
    usage: Counter = Counter()
    with engine.connect() as conn:
        for table, names in encrypted_columns():
            for n in names:
                raw = _raw(table, n)
                colon = func.instr(raw, ":") if engine.dialect.name == "sqlite" else func.strpos(raw, ":")
                key = case((colon > 0, func.substr(raw, 1, colon - 1)), else_="plaintext")
                rows = conn.execute(select(key, func.count()).where(table.c[n].is_not(None)).group_by(key))
                for key_id, count in rows:
                    usage[key_id] += count
    return dict(usage)
