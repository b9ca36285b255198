"""`storefed generate`, `node-key`, `operator-key` and `bench privacy` through the command line,
checked against what the files must hold and against dp-accounting computed here."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from simulations.cli import main


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` by relative path, with the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path, capsys):
    small = ["--stores", "2", "--members", "120", "--items", "200", "--json"]
    assert main(["generate", "--out", str(tmp_path / "a"), "--seed", "4", *small]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert main(["generate", "--out", str(tmp_path / "b"), "--seed", "4", *small]) == 0
    assert main(["generate", "--out", str(tmp_path / "c"), "--seed", "5", *small]) == 0
    capsys.readouterr()
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert {"catalog.csv", "stores/S001/store.json", "stores/S001/members.csv", "stores/S001/transactions.csv",
            "stores/S002/transactions.csv"} <= set(a)
    assert a == b  # every file, byte for byte
    assert set(c) == set(a) and c["catalog.csv"] != a["catalog.csv"]
    assert all(c[f] != a[f] for f in a if f.endswith("transactions.csv"))
    # The summary describes the files written.
    assert summary["out"] == str((tmp_path / "a").resolve()) and summary["stores"] == 2
    skus = (tmp_path / "a" / "catalog.csv").read_text().strip().splitlines()
    assert summary["skus"] == len(skus) - 1 == 200
    lines = sum(len((tmp_path / "a" / f).read_text().strip().splitlines()) - 1 for f in a if f.endswith("transactions.csv"))
    assert summary["lines"] == lines


def test_node_key_writes_an_owner_only_p384_key_and_its_openssh_public_key(tmp_path, capsys):
    assert main(["node-key", "--out", str(tmp_path / "keys"), "--name", "S004", "--json"]) == 0
    paths = json.loads(capsys.readouterr().out)
    private, public = Path(paths["private_key"]), Path(paths["public_key"])
    assert (private, public) == ((tmp_path / "keys" / "S004").resolve(), (tmp_path / "keys" / "S004.pub").resolve())
    assert _mode(private) == 0o600 and _mode(public) == 0o644
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    text = public.read_text()
    assert text.endswith(" storefed-S004\n")
    pub = serialization.load_ssh_public_key(text.rsplit(" ", 1)[0].encode())
    assert pub.public_numbers() == key.public_key().public_numbers()
    # Never replaced in place, and a name that is not a plain file name is refused.
    before = private.read_bytes()
    assert main(["node-key", "--out", str(tmp_path / "keys"), "--name", "S004"]) == 2
    assert main(["node-key", "--out", str(tmp_path / "keys"), "--name", "../S005"]) == 2
    assert private.read_bytes() == before and not (tmp_path / "S005").exists()


def test_operator_key_writes_an_owner_only_ed25519_pair_that_signs_and_verifies(tmp_path, capsys):
    assert main(["operator-key", "--out", str(tmp_path / "op"), "--json"]) == 0
    paths = json.loads(capsys.readouterr().out)
    private, public = Path(paths["private_key"]), Path(paths["public_key"])
    assert (private.name, public.name) == ("operator.key", "operator.pub")
    assert _mode(private) == 0o600 and _mode(public) == 0o644
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    pub = serialization.load_pem_public_key(public.read_bytes())
    assert isinstance(key, Ed25519PrivateKey) and isinstance(pub, Ed25519PublicKey)
    pub.verify(key.sign(b"run 7"), b"run 7")  # the pair belongs together (raises otherwise)
    before = private.read_bytes()
    assert main(["operator-key", "--out", str(tmp_path / "op")]) == 2
    assert private.read_bytes() == before


def test_bench_privacy_json_matches_dp_accounting_computed_here(capsys, monkeypatch):
    import dp_accounting as dpa

    from simulations.bench import privacy as bench_privacy

    # One quick setting instead of the six slow ones (the six are checked in test_privacy).
    settings = [(1.0, 0.05, 10, 3)]
    monkeypatch.setattr(bench_privacy, "SETTINGS", settings)
    assert main(["bench", "privacy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["delta"] == 1e-6 and len(out["cases"]) == 1
    for (sigma, q, steps, rounds), case in zip(settings, out["cases"]):
        assert (case["sigma"], case["q"], case["steps"], case["rounds"]) == (sigma, q, steps, rounds)
        event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps * rounds)
        reference = dpa.pld.PLDAccountant().compose(event).get_epsilon(1e-6)
        rdp = dpa.rdp.RdpAccountant().compose(event).get_epsilon(1e-6)
        assert case["epsilon_pld"] == pytest.approx(reference, rel=1e-9)
        assert reference <= case["epsilon_prv"] <= reference + 0.02
        # Opacus' RDP and dp-accounting's RDP use different orders: within 2 %, never below PLD.
        assert case["epsilon_rdp"] == pytest.approx(rdp, rel=0.02) and case["epsilon_rdp"] >= reference
        assert case["ratio"] == pytest.approx(case["epsilon_prv"] / case["epsilon_pld"], rel=1e-12)


def test_generate_refuses_impossible_sizes_in_one_line(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "x"), "--stores", "2", "--members", "120", "--items", "80"]) == 2
    assert "items" in capsys.readouterr().err
