"""A node's persistent identity: its libp2p key (so its peer id survives restarts) and the RSA
key that signs its DHT records (so only it can overwrite them). Both live in one folder."""

from __future__ import annotations

import os
from pathlib import Path

from hivemind.utils.crypto import RSAPrivateKey

P2P_KEY = "p2p.key"
RSA_KEY = "rsa.der"


def identity_paths(folder: str | Path) -> tuple[Path, Path]:
    """(libp2p identity file, RSA record key) inside ``folder``, which is created private."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d / P2P_KEY, d / RSA_KEY


def load_or_create_rsa_key(path: Path) -> RSAPrivateKey:
    """The node's record-signing key, generated on first use and kept on disk (DER, mode 600)."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    if path.is_file():
        try:
            key.__setstate__({"_private_key": path.read_bytes()})  # hivemind's own DER loader
        except ValueError as e:
            raise ValueError(f"identity key {path} is unreadable ({e}); move it away to start a new identity") from None
        return key
    key = RSAPrivateKey()
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(key.to_bytes())
    os.chmod(tmp, 0o600)
    tmp.rename(path)
    return key
