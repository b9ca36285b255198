"""A store's SuperNode key pair: its identity towards the SuperLink.

Flower 1.41 authenticates a SuperNode by an EC key on a NIST curve in OpenSSH format: the
SuperNode signs each request with the private key (``--auth-supernode-private-key``); the
chain registers the public key (``flwr supernode register KEY.pub``), and a SuperLink
started with ``--enable-supernode-auth`` refuses every node whose key it does not know.

The private key is made at the store and never leaves it; only ``<name>.pub`` goes to the
chain's operator.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.config import ConfigError
from common.exchange.keyfiles import refuse_overwrite, write_private, write_public


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """Write ``out/<name>`` (private, 0600) and ``out/<name>.pub``; returns both paths.

    EC P-384, the curve Flower's documentation uses for SuperNode keys. Raises
    common.data.storefiles.DataError when either file already exists, ConfigError for a bad name.
    """
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"node key name {name!r}: use a plain file name such as the store id")
    out = Path(out).expanduser().resolve()
    private, public = out / name, out / f"{name}.pub"
    refuse_overwrite([private, public])
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()))
    openssh = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_public(public, openssh + f" storefed-{name}\n".encode())
    return private, public
