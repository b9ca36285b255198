"""Shared fixtures: small generated chains, built once per test session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.ingest import prepare_store
from common.data.storefiles import write_chain
from common.data.synth import ChainSpec, generate_chain

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def small_spec() -> ChainSpec:
    return ChainSpec(stores=3, members=900, items=400, categories=12, brands=40, seed=3)


@pytest.fixture(scope="session")
def small_chain_dir(tmp_path_factory, small_spec):
    out = tmp_path_factory.mktemp("chain") / "chain"
    write_chain(generate_chain(small_spec), out)
    return out


@pytest.fixture(scope="session")
def small_store(small_chain_dir):
    """The first store of the small chain, prepared for training."""
    data, _ = prepare_store(small_chain_dir / "stores" / "S001", small_chain_dir)
    return data


@pytest.fixture
def task_identity():
    """Messages need the task identity a SuperNode's runtime sets in its process (node 7)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="session")
def deployment_binaries():
    """Flower's binaries where storefed starts them: else skip, or in CI fail (tests/deploy_harness.py)."""
    from deploy_harness import require_deployment_binaries

    require_deployment_binaries()


@pytest.fixture(scope="session")
def shared_deployment(tmp_path_factory, deployment_binaries):
    """One real deployment for tests/test_deploy_security.py and tests/test_deploy.py (tests/deploy_scenario.py)."""
    from deploy_scenario import shared_deployment as scenario

    yield from scenario(tmp_path_factory.mktemp("deployment"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
