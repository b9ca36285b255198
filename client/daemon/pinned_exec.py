"""A store daemon's ClientApp executor: runs the storefed INSTALLED at the store, never a run's code.

Flower 1.41's SuperNode, in its default ``subprocess`` isolation, starts a SuperExec that
launches ``flwr-clientapp`` for each message; that process installs the run's FAB
(``install_from_fab``) and imports the ClientApp from it, so whoever can start a run
chooses the code that reads the store's files. Started with ``--isolation process``, the
SuperNode launches nothing: it queues each message as a task on its Runtime API
(loopback) and waits for an executor to acquire it. This module is that executor:

1. acquire a ClientApp task from the SuperNode's Runtime API (what flower-superexec does);
2. pull its message, context, run and FAB (what flwr-clientapp does) — the FAB as bytes only;
3. check the FAB (client/daemon/fab_check.py): storefed, at a wire-compatible version,
   and the very FAB whose hash the operator signed; else refuse with the reason;
4. answer with ``client.client_app.app`` imported from this process's own installation,
   which verifies the run's signature before it reads any data (client/run_authorization.py);
5. push the reply and the task's status back.

Tasks run one at a time in this process, so a store's prepared data stays cached across
rounds; an exception inside the app becomes a Flower error reply, as with flwr-clientapp.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib import metadata

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from client.client_app import app as installed_app
from client.store import store_label
from common.config import ConfigError
from common.exchange import wire
from client.daemon.fab_check import FabRefused, check_fab


def installed_version() -> str:
    """The storefed version installed at this store (what its pinned code is)."""
    return metadata.version("storefed")


def _client(address: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    # Loopback only: the Runtime API of a store's SuperNode is never exposed beyond the host.
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def _log(text: str) -> None:
    print(f"storefed store-exec: {text}", file=sys.stderr, flush=True)


def run_task(address: str, token: str, version: str) -> str:
    """Answer one acquired task; returns what happened ("answered", "refused: …", "failed: …")."""
    client = _client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    context, status, details, outcome = None, SubStatus.COMPLETED, "", "answered"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        try:
            check_fab(fab.hash_str, fab.content, context.run_config, version)
            reply = installed_app(message=message, context=context)
        except (FabRefused, ConfigError) as exc:  # not our app, or settings the installed app does not take
            store = store_label(context.node_config)
            outcome = f"refused: {exc}"
            _log(f"store {store} refuses run {context.run_id}: {exc}")
            reply = Message(Error(code=wire.REFUSE_CODE, reason=wire.refuse_reason(store, str(exc))),
                            reply_to=message)
        except Exception as exc:  # pylint: disable=broad-exception-caught  # as flwr-clientapp: an error reply
            status, details, outcome = SubStatus.FAILED, f"{type(exc).__name__}: {exc}", f"failed: {exc}"
            _log(f"the ClientApp raised {type(exc).__name__}: {exc}")
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason=f"{type(exc)}:<'{exc}'>"), reply_to=message)
        push_message(client, reply, context)
    finally:
        if heartbeat.is_running:
            heartbeat.stop()
        push_task_output(client=client, context=context, sub_status=status, details=details)
        client.close()
    return outcome


def serve(address: str, poll_s: float = 0.5) -> None:
    """Acquire and answer ClientApp tasks from the SuperNode at ``address`` until stopped."""
    version = installed_version()
    _log(f"serving storefed {version} (installed) for the SuperNode at {address}")
    client = _client(address)
    while True:
        try:
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[str(TaskType.CLIENT_APP)]))
        except Exception as exc:  # pylint: disable=broad-exception-caught  # SuperNode restarting: wait
            _log(f"SuperNode not reachable ({type(exc).__name__}); retrying")
            time.sleep(2.0)
            continue
        if res.HasField("task") and res.token:
            try:
                run_task(address, res.token, version)
            except Exception as exc:  # pylint: disable=broad-exception-caught  # keep serving
                _log(f"task {res.task.task_id} could not be answered: {type(exc).__name__}: {exc}")
            continue
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="storefed store-exec", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True,
                        help="the store's SuperNode Runtime API, host:port (flower-supernode --port)")
    args = parser.parse_args(argv)
    try:
        serve(args.runtime_api_address)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
