"""Shared fixtures: small generated chains, built once per test session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.ingest import prepare_store
from common.storefiles import write_chain
from common.synth import ChainSpec, generate_chain

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
def rng():
    return np.random.default_rng(0)
