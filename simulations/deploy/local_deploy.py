"""`storefed local-deploy up|down`: server/README.md "Deploy to stores" on loopback, with real processes.

``up`` does what a chain does by hand, in the same order: a generated chain; a CA and the
SuperLink's certificate; a key pair per store (registered with ``flwr supernode register``);
the operator's signing key; a SuperLink with TLS and SuperNode authentication; per store a
SuperNode in ``process`` isolation plus storefed's executor (client/daemon/pinned_exec.py), which
runs the storefed installed here, never a run's code, with the operator's public key in the
store's node config. It writes ``DIR/deployment.json``; ``down`` stops, by pid (and start
time), every process ``up`` started and every process those started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.data.storefiles import DataError, atomic_write_text
from simulations.deploy.processes import BIN, Processes, free_port, start_time, stop_recorded, wait_for

FEDERATION = "chain"
DEPLOYMENT_FILE = "deployment.json"


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process and command of a deployment."""
    return {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}


def superlink_argv(port: int, pki: dict[str, Path], database: Path) -> list[str]:
    """The SuperLink: TLS on its one port, and only registered SuperNodes may connect."""
    return [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", str(pki["ca_cert"]), "--ssl-certfile", str(pki["server_cert"]),
            "--ssl-keyfile", str(pki["server_key"]), "--enable-supernode-auth", "--database", str(database)]


def supernode_argv(superlink: str, ca_cert: Path, private_key: Path, runtime_port: int, node_config: str) -> list[str]:
    """A store's SuperNode in process isolation: it runs no ClientApp itself; storefed's
    executor (store_exec_argv) answers its tasks with the installed code."""
    return [str(BIN / "flower-supernode"), "--superlink", superlink, "--root-certificates", str(ca_cert),
            "--auth-supernode-private-key", str(private_key), "--isolation", "process",
            "--host", "127.0.0.1", "--port", str(runtime_port), "--node-config", node_config]


def store_exec_argv(runtime_port: int) -> list[str]:
    return [sys.executable, "-m", "client.daemon.pinned_exec", "--runtime-api-address", f"127.0.0.1:{runtime_port}"]


def store_node_config(store_dir: Path, catalog: Path, operator_public_key: Path) -> str:
    return f"store-dir='{store_dir}' catalog='{catalog}' operator-public-key='{operator_public_key}'"


def register_stores(env: dict[str, str], keys: dict[str, Path]) -> dict[str, int]:
    """``flwr supernode register`` for each store's public key, all at once; store → node id."""
    running = {store: subprocess.Popen(
        [str(BIN / "flwr"), "supernode", "register", str(public), FEDERATION, "--name", store, "--format", "json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for store, public in keys.items()}
    ids = {}
    for store, reg in running.items():
        stdout, stderr = reg.communicate(timeout=300)  # each CLI start costs seconds, more on a busy host
        if reg.returncode != 0 or "{" not in stdout:
            raise DataError(f"registering store {store}'s key failed: {(stdout + stderr).strip()[-400:]}")
        ids[store] = int(json.loads(stdout[stdout.index("{"):])["node-id"])
    return ids


def up(out: Path, stores: int = 3, seed: int = 1, members: int | None = None, items: int = 300,
       timeout_s: float = 120.0) -> dict[str, Any]:
    """Bring the deployment up in ``out`` (which must not hold one) and return deployment.json's content."""
    from client.daemon.node_key import make_node_key
    from common.data.storefiles import write_chain
    from common.data.synth import ChainSpec, generate_chain
    from server.certs import make_dev_pki
    from server.operator_key import make_operator_key

    out = Path(out).expanduser().resolve()
    if (out / DEPLOYMENT_FILE).exists():
        raise DataError(f"{out / DEPLOYMENT_FILE}: a deployment is already there; "
                        f"run 'storefed local-deploy down --dir {out}' first, or choose another --dir")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: not empty; keys and certificates are never replaced, so choose an empty --dir")
    if stores < 1:
        raise DataError("--stores must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    chain = out / "chain"
    spec = ChainSpec(stores=stores, members=members or 150 * stores, items=items, categories=8, brands=20, seed=seed)
    write_chain(generate_chain(spec), chain)
    store_ids = sorted(p.name for p in (chain / "stores").iterdir() if p.is_dir())
    pki = make_dev_pki(out / "certs")
    keys = {s: make_node_key(out / "store-keys", s) for s in store_ids}
    operator_private, operator_public = make_operator_key(out / "operator")
    server = out / "server"  # the server holds only the chain's public catalog
    server.mkdir(exist_ok=True)
    shutil.copy(chain / "catalog.csv", server / "catalog.csv")

    home = out / "flwr-home"  # the operator's FLWR_HOME (and the SuperLink's)
    home.mkdir(exist_ok=True)
    port = free_port()
    atomic_write_text(home / "config.toml",
                      f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
                      f'address = "127.0.0.1:{port}"\nroot-certificates = "{pki["ca_cert"]}"\n')
    env = flower_env(home)
    procs = Processes(out / "logs", env)
    record: dict[str, Any] = {
        "federation": FEDERATION, "flwr_home": str(home), "superlink": f"127.0.0.1:{port}",
        "run_config": f"data-dir='{server}' stores={len(store_ids)} fraction-evaluate=0.0 node-wait-s=60.0",
        "operator_key": str(operator_private), "operator_public_key": str(operator_public),
        "ca_cert": str(pki["ca_cert"]), "chain": str(chain), "logs": str(out / "logs"), "stores": {},
    }
    try:
        link = procs.start("superlink", superlink_argv(port, pki, home / "superlink.db"))
        record["superlink_pid"] = link.pid
        wait_for(lambda: "Uvicorn running on https://" in link.text() or link.popen.poll() is not None,
                 timeout_s, "the SuperLink to listen")
        if link.popen.poll() is not None:
            raise DataError(f"the SuperLink exited; see {link.log}")
        record["node_ids"] = register_stores(env, {s: keys[s][1] for s in store_ids})
        for store in store_ids:
            store_dir = chain / "stores" / store
            runtime_port = free_port()
            node_home = out / "nodes" / store
            node_home.mkdir(parents=True, exist_ok=True)
            node = procs.start(store, supernode_argv(f"127.0.0.1:{port}", pki["ca_cert"], keys[store][0], runtime_port,
                                                     store_node_config(store_dir, chain, operator_public)),
                               env={"FLWR_HOME": str(node_home)})
            executor = procs.start(f"{store}-exec", store_exec_argv(runtime_port))
            record["stores"][store] = {"store_dir": str(store_dir), "state_dir": str(store_dir / "state"),
                                       "pid": node.pid, "exec_pid": executor.pid, "runtime_port": runtime_port,
                                       "log": str(node.log), "exec_log": str(executor.log)}
        wait_for(lambda: all("SuperNode ID:" in procs.procs[s].text() for s in store_ids), timeout_s,
                 "the stores' SuperNodes to connect")
        wait_for(lambda: all("serving storefed" in procs.procs[f"{s}-exec"].text() for s in store_ids), timeout_s,
                 "the stores' executors to start")
    except BaseException:
        procs.stop_all()
        raise
    record["processes"] = {str(p.pid): start_time(p.pid) for p in procs.procs.values()}
    atomic_write_text(out / DEPLOYMENT_FILE, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def down(out: Path) -> list[int]:
    """Stop every process of the deployment in ``out``; returns the pids still alive (none)."""
    path = Path(out).expanduser().resolve() / DEPLOYMENT_FILE
    try:
        record = json.loads(path.read_text())
    except OSError:
        raise DataError(f"{path}: no deployment there (nothing to stop)") from None
    except ValueError:
        raise DataError(f"{path}: not a deployment.json written by 'storefed local-deploy up'") from None
    left = stop_recorded({int(pid): started for pid, started in record.get("processes", {}).items()})
    if not left:
        path.rename(path.with_name(DEPLOYMENT_FILE + ".down"))  # `up` may run again in this directory
    return left

