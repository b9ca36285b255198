"""A development certificate authority and the SuperLink's TLS certificate.

For trying the deployment on one machine or a test bench only. In production the SuperLink's
certificate comes from the chain's own PKI (its CA signs it; the stores trust that CA).

``make_dev_pki(out)`` writes, in ``out``:

* ``ca.key`` / ``ca.crt``: a self-signed CA (EC P-384). The stores and the operator's
  ``flwr`` CLI trust ``ca.crt``; ``ca.key`` signs and then belongs offline.
* ``server.key`` / ``server.pem``: the SuperLink's key and certificate, signed by the CA,
  valid for the given host names and IP addresses (and always for loopback, because the
  SuperLink's own ServerApp process connects to it there).

Private keys are written with mode 0600, certificates with 0644; every file atomically.
Existing files are never overwritten: replacing a CA silently would lock every store out.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.exchange.keyfiles import refuse_overwrite, write_private, write_public

CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT = "ca.key", "ca.crt", "server.key", "server.pem"
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: str, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    # Backdated by a minute so that a machine whose clock is slightly behind accepts it.
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days)))


def make_dev_pki(out: Path, hosts: Iterable[str] = (), days: int = 365) -> dict[str, Path]:
    """Write a development CA and a SuperLink certificate for ``hosts`` (plus loopback).

    Returns the paths by role: ``ca_key``, ``ca_cert``, ``server_key``, ``server_cert``.
    Raises common.data.storefiles.DataError when any of the files already exists.
    """
    out = Path(out).expanduser().resolve()
    paths = {"ca_key": out / CA_KEY, "ca_cert": out / CA_CERT,
             "server_key": out / SERVER_KEY, "server_cert": out / SERVER_CERT}
    refuse_overwrite(paths.values())
    names = list(dict.fromkeys([*hosts, *LOOPBACK]))  # keep order, drop repeats

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "storefed development CA")])
    ca_cert = (_builder("storefed development CA", ca_name, ca_key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (_builder(names[0], ca_cert.subject, server_key.public_key(), days)
                   .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))

    write_private(paths["ca_key"], _pem_key(ca_key))
    write_public(paths["ca_cert"], ca_cert.public_bytes(serialization.Encoding.PEM))
    write_private(paths["server_key"], _pem_key(server_key))
    write_public(paths["server_cert"], server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def certificate_hosts(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for (to check what was made)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]
