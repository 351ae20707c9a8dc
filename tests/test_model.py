"""Pure logic: configs, validation, the matrix compiler, the nft renderer (no root needed)."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest

import pytest_enclave
from pytest_enclave import (
    ALLOWED,
    BLOCKED,
    ConfigError,
    ConnectionConfig,
    EnclaveError,
    NormalPacketDelayDistribution,
    PortSpec,
    ServiceConfig,
    UniformPacketDelayDistribution,
    UpdateServiceConfig,
)
from pytest_enclave.config import check_name, connection_from
from pytest_enclave.matrix import MatrixState, compile_policies, partition_rules
from pytest_enclave.shapers.nftables import render


def test_public_names_are_curated() -> None:
    assert sorted(pytest_enclave.__all__) == sorted(set(pytest_enclave.__all__))
    public = {n for n in vars(pytest_enclave) if not n.startswith("_")} - {"annotations"}
    modules = {n for n in public if type(getattr(pytest_enclave, n)).__name__ == "module"}
    assert set(pytest_enclave.__all__) - {"__version__"} == public - modules
    for name in (
        "Enclave",
        "ServiceConfig",
        "UpdateServiceConfig",
        "ConnectionConfig",
        "UniformPacketDelayDistribution",
        "NormalPacketDelayDistribution",
        "BLOCKED",
        "ALLOWED",
        "EnclaveError",
    ):
        assert name in pytest_enclave.__all__
        assert getattr(pytest_enclave, name) is not None


def test_import_does_not_need_pytest() -> None:
    code = (
        "import sys; import pytest_enclave; "
        "assert 'pytest' not in sys.modules and '_pytest' not in sys.modules, 'pytest'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("value", [-0.1, 100.5, float("nan"), "90", True])
def test_percentages_outside_0_100_are_rejected(value: object) -> None:
    with pytest.raises(ConfigError, match=r"packet_loss_percentage=.* is not allowed"):
        ConnectionConfig(packet_loss_percentage=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "-a", "a-", "a b", "a.b", "x" * 64, "123", "ä", None])
def test_names_that_cannot_be_hostnames_are_rejected(name: object) -> None:
    with pytest.raises(ConfigError, match="becomes a hostname"):
        check_name("service", name)


def test_kurtosis_names_are_allowed() -> None:
    assert check_name("service", "cassandra_node_1") == "cassandra_node_1"
    assert check_name("subnetwork", "main-subnetwork") == "main-subnetwork"


def test_constants_and_kurtosis_distributions() -> None:
    assert BLOCKED.is_blocked and not BLOCKED.is_allowed and ALLOWED.is_allowed
    uniform = UniformPacketDelayDistribution(ms=500)
    assert (uniform.mean_ms, uniform.jitter_ms) == (500, 0)
    normal = NormalPacketDelayDistribution(mean_ms=100, std_dev_ms=10, correlation=25)
    assert normal.distribution == "normal" and normal.correlation == 25
    conn = ConnectionConfig(packet_delay_distribution=uniform)
    assert conn.needs_netem == ("packet_delay_distribution",)
    assert ConnectionConfig(packet_loss_percentage=30).needs_netem == ()
    assert BLOCKED.needs_netem == ()


def test_connection_from_takes_configs_mappings_and_keywords() -> None:
    assert connection_from(BLOCKED) is BLOCKED
    assert connection_from({"packet_loss_percentage": 90.0}).packet_loss_percentage == 90.0
    assert connection_from(packet_loss_percentage=5).packet_loss_percentage == 5.0
    with pytest.raises(ConfigError, match="unknown connection field.*packet_los\\b"):
        connection_from(packet_los=5)
    with pytest.raises(ConfigError, match="reorder_percentage=.*needs a packet delay"):
        ConnectionConfig(reorder_percentage=10)
    with pytest.raises(ConfigError, match="reject=True needs packet_loss_percentage=100"):
        ConnectionConfig(packet_loss_percentage=50, reject=True)


def test_service_config_validation() -> None:
    with pytest.raises(ConfigError, match="cmd='sleep 1' is not allowed: give a list"):
        ServiceConfig(cmd="sleep 1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="port number=70000"):
        ServiceConfig(cmd=["x"], ports={"p": 70000})
    with pytest.raises(ConfigError, match="subnetwork name 'a b'"):
        UpdateServiceConfig(subnetwork="a b")
    config = ServiceConfig(
        cmd=["x"], ports={"p": 80, "q": PortSpec(81, wait=None)}, ready_timeout=timedelta(seconds=3)
    )
    assert config.ports["p"] == PortSpec(80)
    with pytest.raises(ConfigError, match="ready_timeout=-1"):
        ServiceConfig(cmd=["x"], ready_timeout=-1)
    assert issubclass(ConfigError, EnclaveError) and issubclass(ConfigError, ValueError)


def _state(**subnets: str) -> MatrixState:
    return MatrixState(subnetworks=dict(subnets))


def test_compile_same_subnetwork_is_always_free() -> None:
    state = _state(a="main", b="main", c="secondary")
    state = MatrixState(state.subnetworks, default=BLOCKED)
    table = compile_policies(state)
    assert table.get("a", "b") == ALLOWED and table.get("b", "a") == ALLOWED
    assert table.get("a", "c") == BLOCKED and table.get("c", "b") == BLOCKED


def test_compile_overrides_apply_each_way_and_default_to_the_rest() -> None:
    loss = ConnectionConfig(packet_loss_percentage=90)
    state = _state(a="main", b="secondary", c="third").with_override(
        frozenset(("main", "secondary")), loss
    )
    table = compile_policies(state)
    assert table.get("a", "b") == loss and table.get("b", "a") == loss
    assert table.get("a", "c") == ALLOWED  # default
    assert sorted((s, d) for s, d, _ in table.pairs()) == [("a", "b"), ("b", "a")]


def test_compile_directed_rules_win_and_block_one_way() -> None:
    import itertools

    ids = itertools.count(1)
    from pytest_enclave.matrix import DirectedRule

    state = _state(a="main", b="main", c="main")
    state = MatrixState(
        state.subnetworks, rules=(DirectedRule(next(ids), frozenset("a"), frozenset("c")),)
    )
    table = compile_policies(state)
    assert table.get("a", "c") == BLOCKED and table.get("c", "a") == ALLOWED
    rules = partition_rules([{"a"}, {"b", "c"}], ids, "p")
    table = compile_policies(MatrixState(state.subnetworks, rules=rules))
    assert {(s, d) for s, d, _ in table.pairs()} == {("a", "b"), ("a", "c"), ("b", "a"), ("c", "a")}
    # a later loss rule does not weaken a block
    loss = partition_rules([{"a"}, {"b"}], ids, "l", ConnectionConfig(packet_loss_percentage=5))
    table = compile_policies(MatrixState(state.subnetworks, rules=rules + loss))
    assert table.get("a", "b") == BLOCKED


def test_compile_groups_sources_so_work_scales_with_classes() -> None:
    subnets = {f"s{i}": ("main" if i % 2 else "secondary") for i in range(200)}
    state = MatrixState(subnets).with_override(frozenset(("main", "secondary")), BLOCKED)
    table = compile_policies(state)
    assert len(table.classes) == 2
    assert sum(1 for _ in table.pairs()) == 2 * 100 * 100


def test_render_is_one_replacing_transaction() -> None:
    state = _state(a="main", b="secondary").with_override(
        frozenset(("main", "secondary")), ConnectionConfig(packet_loss_percentage=90)
    )
    script = render("t", compile_policies(state), {"a": "198.18.0.2", "b": "198.18.0.3"})
    lines = script.splitlines()
    assert lines[:2] == ["table bridge t", "delete table bridge t"]
    assert "numgen random mod 10000 < 9000 drop" in script
    assert "198.18.0.2 : jump from_0" in script or "198.18.0.2 : jump from_1" in script
    empty = render("t", compile_policies(_state(a="main")), {"a": "198.18.0.2"})
    assert "vmap" not in empty and "policy accept" in empty


def test_readme_plugin_example_is_the_one_examples_runs() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    conftest, test = re.findall(
        r"```python\n(# conftest.py\n.*?)```\n\n```python\n(# test_outage.py\n.*?)```", readme, re.S
    )[0]
    assert (root / "examples/readme/conftest.py").read_text().endswith(conftest)
    assert (root / "examples/readme/test_outage.py").read_text() == test


def test_compiled_table_agrees_with_the_pairwise_definition_on_random_states() -> None:
    """compile_policies groups sources for speed; MatrixState.policy is the plain definition."""
    import itertools
    import random

    rng = random.Random(7)
    configs = [
        ALLOWED,
        BLOCKED,
        ConnectionConfig(packet_loss_percentage=30),
        ConnectionConfig(packet_loss_percentage=90),
    ]
    names = [f"s{i}" for i in range(9)]
    for _ in range(200):
        subnets = {n: rng.choice("abc") for n in names}
        state = MatrixState(subnets, default=rng.choice(configs))
        for pair in itertools.combinations("abc", 2):
            if rng.random() < 0.5:
                state = state.with_override(frozenset(pair), rng.choice(configs))
        ids = itertools.count(1)
        rules = ()
        for _ in range(rng.randrange(3)):
            groups = [rng.sample(names, 2), rng.sample(names, 2)]
            if not set(groups[0]) & set(groups[1]):
                rules += partition_rules(groups, ids, "p", rng.choice(configs[1:]))
        state = MatrixState(state.subnetworks, state.default, state.overrides, rules)
        table = compile_policies(state)
        for src, dst in itertools.permutations(names, 2):
            assert table.get(src, dst) == state.policy(src, dst), (src, dst, state)


def test_loss_below_the_resolution_is_refused_not_ignored() -> None:
    with pytest.raises(ConfigError, match="resolution is 0.01 %"):
        ConnectionConfig(packet_loss_percentage=0.001)
    assert ConnectionConfig(packet_loss_percentage=0.01).packet_loss_percentage == 0.01
