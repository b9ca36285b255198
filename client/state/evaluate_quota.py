"""How many evaluate messages a store answers per run, and on how few members it answers none.

Evaluation metrics are NOT DP (DESIGN §4.3): they are exact functions of the store's test
members under a model the server chose. A server that may send any model and ask again and
again learns more with every answer, so a store that allows local metrics bounds both:

* ``max-evaluations-per-run`` (node config): answers per run; further evaluate messages of
  that run are refused. Default: 20 at a deployed store, no cap in a simulation.
* ``min-evaluation-members`` (node config): no answer computed on fewer members than this.
  Default: 50 at a deployed store, none in a simulation.

The count lives in ``<state-dir>/evaluations.json`` (``{run id: answers}``), read and
rewritten atomically under a lock, so a restart of the store's node does not reset it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from client.state.file_lock import locked
from common.data.storefiles import atomic_write_text
from client.store_policy import PolicyError

QUOTA_FILE = "evaluations.json"
DEPLOYED_MAX_EVALUATIONS = 20
DEPLOYED_MIN_MEMBERS = 50


def _whole(node_config: Mapping[str, Any], key: str, default: int) -> int:
    value = node_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or int(value) != value:
        raise PolicyError(f"node config '{key}' must be a whole number ≥ 0 (0: no limit), got {value!r}")
    return int(value)


def limits(node_config: Mapping[str, Any], deployed: bool) -> tuple[int, int]:
    """(answers per run, minimum members) for this node; 0 means no limit."""
    return (_whole(node_config, "max-evaluations-per-run", DEPLOYED_MAX_EVALUATIONS if deployed else 0),
            _whole(node_config, "min-evaluation-members", DEPLOYED_MIN_MEMBERS if deployed else 0))


def check_members(n_members: int, minimum: int) -> None:
    """Refuse to answer on fewer than ``minimum`` members (PolicyError)."""
    if minimum and n_members < minimum:
        raise PolicyError(f"this store answers evaluations computed on at least {minimum} members "
                          "(node config min-evaluation-members); it has fewer test members")


def take(state_dir: Path, run_id: str, cap: int) -> int:
    """Count one more answer for ``run_id``; PolicyError when the run has had ``cap`` already.
    Returns the answers of the run so far, this one included (0 without a cap: not counted)."""
    if not cap:
        return 0
    path = Path(state_dir) / QUOTA_FILE
    with locked(Path(state_dir) / (QUOTA_FILE + ".lock")):
        try:
            counts = json.loads(path.read_text())
            done = int(counts.get(str(run_id), 0))
        except FileNotFoundError:
            counts, done = {}, 0
        except (OSError, ValueError, TypeError, AttributeError):
            # A damaged count must not reopen the quota: no answer until the operator acts.
            raise PolicyError(f"{path}: unreadable; fix or remove it to answer evaluations again") from None
        if done >= cap:
            raise PolicyError(f"run {run_id} has had {done} evaluation answers from this store, its limit "
                              "(node config max-evaluations-per-run)")
        counts[str(run_id)] = done + 1
        atomic_write_text(path, json.dumps(counts, sort_keys=True) + "\n")
        return done + 1
