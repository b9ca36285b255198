"""The deployment's keys and certificates: a development CA, the SuperLink's certificate, node keys."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

from client.daemon.node_key import make_node_key
from common.data.storefiles import DataError
from server.certs import certificate_hosts, make_dev_pki
from simulations.cli import main


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_dev_pki_signs_a_server_certificate_for_the_hosts_and_loopback(tmp_path):
    paths = make_dev_pki(tmp_path, ["superlink.chain.example", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert certificate_hosts(paths["server_cert"]) == ["superlink.chain.example", "localhost", "10.1.2.3",
                                                       "127.0.0.1", "::1"]
    key = load_pem_private_key(paths["server_key"].read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert [_mode(paths[k]) for k in ("ca_key", "server_key", "ca_cert", "server_cert")] == [0o600, 0o600, 0o644, 0o644]


def test_keys_and_certificates_are_never_overwritten(tmp_path, capsys):
    make_dev_pki(tmp_path)
    before = (tmp_path / "ca.key").read_bytes()
    assert main(["certs", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ca.key: already exists" in err and "Traceback" not in err
    assert (tmp_path / "ca.key").read_bytes() == before
    make_node_key(tmp_path, "S001")
    with pytest.raises(DataError, match="S001: already exists"):
        make_node_key(tmp_path, "S001")


def test_a_node_key_is_what_flower_accepts_for_supernode_authentication(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    private, public = make_node_key(tmp_path, "S007")
    key = load_ssh_private_key(private.read_bytes(), None)  # what flower-supernode loads
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    # `flwr supernode register` reads the .pub; it must be the private key's own public key.
    assert try_load_public_key(public) == public_key_to_bytes(key.public_key())
    assert _mode(private) == 0o600 and _mode(public) == 0o644
