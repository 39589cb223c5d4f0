"""Signed tree heads: an Ed25519 signature over the ledger's size and Merkle root.

The private key lives in a PEM file outside the database (by default
``WORKSPACE/keys/ledger-ed25519.pem``, mode 0600, or the path in ``HARMTRACE_LEDGER_KEY``);
whoever can rewrite the database but not read that file cannot produce a head that
verifies. The public key is written beside it (``.pub``, raw 32 bytes as hex) and into every
exported bundle; a verifier should pin it from a copy it trusts.

A head signs the bytes of canonical JSON::

    {"log": "harmtrace-ledger/1", "root": HEX, "size": N, "time": ISO-8601}
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from harmtrace.errors import ConfigError, LedgerError
from harmtrace.hashing import canonical_json
from harmtrace.workspace import atomic_write_bytes, atomic_write_text

__all__ = ["KEY_ENV", "LOG_ID", "LedgerKey", "PublicKey", "TreeHead", "head_message"]

KEY_ENV = "HARMTRACE_LEDGER_KEY"
LOG_ID = "harmtrace-ledger/1"


@dataclass(frozen=True)
class TreeHead:
    """The ledger's size and Merkle root (hex) at ``time``, with its signature (hex or "")."""

    size: int
    root: str
    time: str
    key_id: str
    signature: str

    def as_dict(self) -> dict[str, object]:
        return {"size": self.size, "root": self.root, "time": self.time,
                "key_id": self.key_id, "signature": self.signature}

    @classmethod
    def from_dict(cls, data: dict) -> TreeHead:
        return cls(int(data["size"]), str(data["root"]), str(data["time"]),
                   str(data.get("key_id", "")), str(data.get("signature", "")))


def head_message(size: int, root: str, time: str) -> bytes:
    """The bytes a tree head's signature covers; see the module docstring."""
    return canonical_json({"log": LOG_ID, "size": size, "root": root, "time": time}).encode()


class PublicKey:
    """An Ed25519 public key that checks tree-head signatures."""

    def __init__(self, raw: bytes) -> None:
        try:
            self._key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as err:
            raise LedgerError(
                f"a ledger public key is 32 bytes of Ed25519 key; got {len(raw)} bytes"
            ) from err
        self.raw = raw
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def from_hex(cls, text: str, *, where: str = "the public key") -> PublicKey:
        try:
            return cls(bytes.fromhex(text.strip()))
        except ValueError as err:
            raise LedgerError(
                f"{where} is not 64 hex digits of an Ed25519 public key; pass the "
                "ledger-ed25519.pub file written beside the ledger's key"
            ) from err

    @classmethod
    def load(cls, path: str | Path) -> PublicKey:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise LedgerError(f"cannot read the ledger public key {path}: {err}") from err
        return cls.from_hex(text, where=f"public key file {path}")

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def checks(self, head: TreeHead) -> bool:
        """Whether ``head`` carries a valid signature by this key."""
        if head.key_id != self.key_id:
            return False
        try:
            signature = bytes.fromhex(head.signature)
            self._key.verify(signature, head_message(head.size, head.root, head.time))
        except (ValueError, InvalidSignature):
            return False
        return True


class LedgerKey:
    """The Ed25519 private key that signs tree heads; see the module docstring."""

    def __init__(self, private: Ed25519PrivateKey, path: Path | None = None) -> None:
        self._private = private
        self.path = path
        raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public = PublicKey(raw)

    @classmethod
    def generate(cls) -> LedgerKey:
        """A new key held in memory only (for tests and throw-away ledgers)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path | None = None) -> LedgerKey:
        """The key at ``path`` (default ``$HARMTRACE_LEDGER_KEY``), created there if missing.

        A new key is written with mode 0600 and its public half beside it as ``.pub``.
        """
        path = Path(path or os.environ.get(KEY_ENV) or "")
        if not str(path) or str(path) == ".":
            raise ConfigError(
                f"no ledger key path given; pass one or set {KEY_ENV}=PATH/ledger-ed25519.pem"
            )
        if path.exists():
            return cls._load(path)
        key = cls(Ed25519PrivateKey.generate(), path)
        pem = key._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write_bytes(path, pem)
        os.chmod(path, 0o600)
        atomic_write_text(key.public_path, key.public.hex + "\n")
        return key

    @classmethod
    def _load(cls, path: Path) -> LedgerKey:
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as err:
            raise LedgerError(
                f"ledger key file {path} cannot be read as an unencrypted Ed25519 PEM key "
                f"({err}); restore it from a backup or point {KEY_ENV} at the right file"
            ) from err
        if not isinstance(private, Ed25519PrivateKey):
            raise LedgerError(f"ledger key file {path} holds a key that is not Ed25519")
        return cls(private, path)

    @property
    def public_path(self) -> Path:
        """Where the public key is written: the key path with suffix ``.pub``."""
        if self.path is None:
            raise LedgerError("this ledger key is held in memory only and has no file")
        return self.path.with_suffix(".pub")

    def sign(self, size: int, root: str, time: str) -> TreeHead:
        """A tree head for ``size`` leaves with Merkle root ``root`` (hex), signed now."""
        signature = self._private.sign(head_message(size, root, time)).hex()
        return TreeHead(size, root, time, self.public.key_id, signature)
