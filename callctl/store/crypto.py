"""Real numbers at rest: AES-GCM ciphertexts that name their key, found by keyed hash.

A key ring holds several AES-256 keys by id (one current, used for writes; all usable
for reads, so rotation needs no downtime) and one lookup secret. A stored number is
`<key id>:<base64url(nonce | ciphertext | tag)>`; the key id is also authenticated data,
so a ciphertext cannot be passed off as another key's. Equality lookups (blocks by
caller, a customer's bindings) use HMAC-SHA256 under a key derived from the lookup
secret: it is not rotated with the encryption keys, so hashes stay stable and unique
indexes over them keep working (docs/keys.md).

Key ring text (CALLCTL_KEYS, or the key file): `id=base64` entries separated by blanks,
commas or newlines; `#` starts a comment. `lookup=...` is the lookup secret; `audit=...`
(optional) keys the audit chain, which otherwise derives its key from the lookup secret;
every other entry is an encryption key; the current one is `keys.current` or the last
listed.

Each secret has a check value (`checks`): an HMAC of a fixed label under it, which tells
whether a ring holds the same secrets as the ones a database was written with without
revealing them (callctl/store/keycheck.py compares them at startup).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LOOKUP = "lookup"
AUDIT = "audit"
KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
ENV_KEYS = "CALLCTL_KEYS"
_LOOKUP_INFO = b"callctl number lookup hmac-sha256 v1"
_AUDIT_INFO = b"callctl audit chain hmac-sha256 v1"
_CHECK_LABEL = b"callctl key check v1 "


class KeyConfigError(Exception):
    """The key ring is missing or unusable; the message says what to fix, never a key."""


class DecryptError(Exception):
    """A stored number could not be decrypted (unknown key id, or tampered/corrupt)."""


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def _check(name: str, secret: bytes) -> str:
    return hmac.new(secret, _CHECK_LABEL + name.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class KeyRing:
    keys: dict[str, AESGCM]
    current: str
    lookup_key: bytes
    audit_key: bytes = b""
    # "key:<id>", "lookup", "audit" -> check value (see the module's doc)
    checks: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, current: str = "", source: str = ENV_KEYS) -> "KeyRing":
        entries: dict[str, bytes] = {}
        for token in _tokens(text):
            key_id, sep, value = token.partition("=")
            if not sep or not KEY_ID.fullmatch(key_id):
                raise KeyConfigError(f"{source}: entries must be ID=BASE64KEY (ID: 1-32 of A-Z a-z 0-9 _ -)")
            if key_id in entries:
                raise KeyConfigError(f"{source}: key '{key_id}' is listed twice")
            try:
                raw = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise KeyConfigError(f"{source}: key '{key_id}' is not valid base64") from None
            if len(raw) != KEY_BYTES:
                raise KeyConfigError(f"{source}: key '{key_id}' must be {KEY_BYTES} bytes, not {len(raw)}")
            entries[key_id] = raw
        if LOOKUP not in entries:
            raise KeyConfigError(f"{source}: no '{LOOKUP}=' secret (it keys the number lookup hashes)")
        lookup = entries.pop(LOOKUP)
        audit = entries.pop(AUDIT, lookup)
        if not entries:
            raise KeyConfigError(f"{source}: no encryption key besides '{LOOKUP}'")
        current = current or list(entries)[-1]
        if current not in entries:
            raise KeyConfigError(f"{source}: the current key '{current}' is not in the ring")
        derive = lambda secret, info: HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)
        checks = {f"key:{k}": _check(f"key:{k}", v) for k, v in entries.items()}
        checks.update({LOOKUP: _check(LOOKUP, lookup), AUDIT: _check(AUDIT, audit)})
        return cls({k: AESGCM(v) for k, v in entries.items()}, current, derive(lookup, _LOOKUP_INFO),
                   derive(audit, _AUDIT_INFO), checks)

    def seal(self, plaintext: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self.keys[self.current].encrypt(nonce, plaintext.encode(), self.current.encode())
        return f"{self.current}:{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, token: str) -> str:
        key_id, sep, body = token.partition(":")
        aead = self.keys.get(key_id)
        if not sep or aead is None:
            raise DecryptError(
                f"stored number under key '{key_id[:32]}' which is not in the key ring"
                if sep else "stored number is not a callctl ciphertext (run 'callctl db upgrade')"
            )
        try:
            raw = base64.urlsafe_b64decode(body)
            return aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], key_id.encode()).decode()
        except (InvalidTag, binascii.Error, ValueError):
            raise DecryptError(f"stored number under key '{key_id}' fails authentication") from None

    def hash(self, e164: str) -> str:
        return hmac.new(self.lookup_key, e164.encode(), hashlib.sha256).hexdigest()


def _tokens(text: str) -> list[str]:
    return re.sub(r"#[^\n]*", "", text).replace(",", " ").split()


def key_id_of(token: str) -> str | None:
    """The key id a stored number names, None for anything that is not a ciphertext."""
    key_id, sep, _ = token.partition(":")
    return key_id if sep and KEY_ID.fullmatch(key_id) else None


def read_key_file(path: str | os.PathLike) -> str:
    # A relative path is read from the working directory: say which file that was.
    file = Path(path).absolute()
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise KeyConfigError(
            f"key file {file} does not exist (create one with 'callctl keys generate', "
            f"or set {ENV_KEYS})"
        ) from None
    except OSError as exc:
        raise KeyConfigError(f"key file {file} cannot be read ({exc.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyConfigError(f"key file {file} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise KeyConfigError(f"key file {file} is not a key file (not text: docs/keys.md)") from None
    except OSError as exc:
        raise KeyConfigError(f"key file {file} cannot be read ({exc.strerror})") from None


def load_ring(key_file: str, current: str = "", environ=os.environ) -> KeyRing:
    """The ring from $CALLCTL_KEYS if set, else from the key file."""
    if environ.get(ENV_KEYS):
        return KeyRing.parse(environ[ENV_KEYS], current, ENV_KEYS)
    return KeyRing.parse(read_key_file(key_file), current, str(key_file))


def append_key(path: str | os.PathLike, key_id: str) -> None:
    """Add a new encryption key (it becomes current: the last listed) to a key file,
    created 0600 with a lookup secret if new."""
    if not KEY_ID.fullmatch(key_id) or key_id in (LOOKUP, AUDIT):
        raise KeyConfigError(f"key id '{key_id}': use 1-32 of A-Z a-z 0-9 _ -, not '{LOOKUP}' or '{AUDIT}'")
    file = Path(path)
    text = read_key_file(file) if file.exists() else ""
    ring_ids = {t.partition("=")[0] for t in _tokens(text)}
    if key_id in ring_ids:
        raise KeyConfigError(f"key file {file} has a key '{key_id}' already")
    lines = [] if text else ["# callctl number keys (docs/keys.md). Never commit or share this file.",
                             f"{LOOKUP}={new_key()}"]
    lines.append(f"{key_id}={new_key()}")
    file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as out:
        out.write(("" if not text or text.endswith("\n") else "\n") + "\n".join(lines) + "\n")


# The process's ring: installed at startup (CLI, daemon); library users and tests that
# did not install one get it from the configuration on first use.
_ring: KeyRing | None = None


def install(ring: KeyRing | None) -> None:
    global _ring
    _ring = ring


def ring() -> KeyRing:
    global _ring
    if _ring is None:
        from callctl import config

        cfg = config.load()
        _ring = load_ring(cfg.keys.file, cfg.keys.current)
    return _ring


def number_hash(e164: str) -> str:
    """The lookup hash of an E.164 number: compare `*_hash` columns with this."""
    return ring().hash(e164)
