"""The chain operator's signing key: it authorizes runs (common/privacy/run_signature.py).

The private key stays with the operator (whoever may start runs); every store holds the
public key in its own configuration (node config ``operator-public-key``).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.data.storefiles import DataError
from common.exchange.keyfiles import refuse_overwrite, write_private, write_public

PRIVATE_NAME, PUBLIC_NAME = "operator.key", "operator.pub"


def make_operator_key(out: Path) -> tuple[Path, Path]:
    """Write ``out/operator.key`` (PEM, 0600) and ``out/operator.pub``; returns both paths.
    Raises DataError when either exists (keys are never replaced in place)."""
    out = Path(out).expanduser().resolve()
    private, public = out / PRIVATE_NAME, out / PUBLIC_NAME
    refuse_overwrite([private, public])
    key = Ed25519PrivateKey.generate()
    write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    write_public(public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_operator_key(path: Path) -> Ed25519PrivateKey:
    """The operator's private key from a PEM file; DataError naming the file otherwise."""
    path = Path(path).expanduser()
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the operator key ({exc.strerror}); make one with "
                        "'storefed operator-key --out DIR' or pass --operator-key") from None
    except (ValueError, TypeError):
        raise DataError(f"{path}: not an unencrypted PEM private key; make one with 'storefed operator-key'") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise DataError(f"{path}: not an ed25519 key; make one with 'storefed operator-key'")
    return key
