"""The netns backend and the nftables shaper with real namespaces and real packets.

What every backend must do is in test_conformance.py (run on netns and docker); here is what
is particular to the library's netns path: matrix semantics, placeholders, errors, and
cleanup on Ctrl-C (the 90 % scenario over 2,000 datagrams per direction is there too).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from helpers import (
    ROOT,
    add_probes,
    host_state,
    ours,
    sh,
)

from pytest_enclave import (
    BLOCKED,
    CapabilityError,
    ConfigError,
    ConnectionConfig,
    Enclave,
    LogLine,
    ServiceConfig,
    ServiceError,
    UniformPacketDelayDistribution,
    UnknownNameError,
    UpdateServiceConfig,
    probe,
)
from pytest_enclave.caps import has_netem
from pytest_enclave.measure import loss_matrix

pytestmark = pytest.mark.skipif(not ROOT, reason="needs root for network namespaces")


@pytest.fixture
def enclave():
    with Enclave() as e:
        yield e


@pytest.fixture
def trio(enclave: Enclave) -> Enclave:
    add_probes(enclave, "n1", "n2", "n3")
    return enclave


def test_within_a_subnetwork_nothing_is_lost(trio: Enclave) -> None:
    trio.set_connection(config=BLOCKED)  # the default: only crossing pairs would suffer
    loss = loss_matrix(trio, ["n1", "n2", "n3"], 2000)
    assert loss and all(v == 0.0 for v in loss.values()), loss


def test_blocked_passes_nothing_and_heal_restores(trio: Enclave) -> None:
    trio.update_service("n3", UpdateServiceConfig(subnetwork="secondary"))
    fault = trio.set_connection(("main", "secondary"), BLOCKED)
    loss = loss_matrix(trio, ["n1", "n2", "n3"], 500)
    assert loss[("n1", "n3")] == loss[("n3", "n1")] == loss[("n2", "n3")] == 1.0
    assert loss[("n1", "n2")] == 0.0
    trio.heal()
    # undoing a fault that heal() already removed must not bring it back
    fault.undo()
    loss = loss_matrix(trio, ["n1", "n3"], 500)
    assert loss[("n1", "n3")] == loss[("n3", "n1")] == 0.0


def test_default_connection_applies_to_pairs_without_override(trio: Enclave) -> None:
    for name, sub in (("n2", "b"), ("n3", "c")):
        trio.update_service(name, UpdateServiceConfig(subnetwork=sub))
    trio.set_connection(("main", "b"), ConnectionConfig(packet_loss_percentage=0.0))
    trio.set_connection(config=BLOCKED)
    loss = loss_matrix(trio, ["n1", "n2", "n3"], 300)
    assert loss[("n1", "n2")] == 0.0  # override
    assert loss[("n1", "n3")] == loss[("n2", "n3")] == 1.0  # default
    trio.remove_connection(("main", "b"))
    assert loss_matrix(trio, ["n1", "n2"], 300)[("n1", "n2")] == 1.0


def test_partition_groups_and_the_unlisted_rest(trio: Enclave) -> None:
    with trio.partition(["n1"], ["n2"]):  # n3 is the third group
        loss = loss_matrix(trio, ["n1", "n2", "n3"], 300)
        assert all(v == 1.0 for v in loss.values()), loss
    with trio.isolate("n2"):
        loss = loss_matrix(trio, ["n1", "n2", "n3"], 300)
        assert loss[("n1", "n3")] == 0.0 and loss[("n2", "n1")] == loss[("n3", "n2")] == 1.0
    assert all(v == 0.0 for v in loss_matrix(trio, ["n1", "n2", "n3"], 300).values())


def _bridge_reject_supported() -> bool:
    ns = f"pe-rejectcheck-{os.getpid()}"
    script = (
        "table bridge t {\n chain f {\n type filter hook forward priority 0;\n"
        " meta l4proto tcp reject with tcp reset\n }\n}\n"
    )
    sh(f"ip netns add {ns}")
    try:
        return (
            subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "-c", "-f", "-"],
                input=script,
                text=True,
                capture_output=True,
            ).returncode
            == 0
        )
    finally:
        sh(f"ip netns del {ns}")


def test_reject_fails_fast_with_reset_or_says_the_kernel_cannot(trio: Enclave) -> None:
    trio.update_service("n2", UpdateServiceConfig(subnetwork="secondary"))
    reject = ConnectionConfig(packet_loss_percentage=100, reject=True)
    if not _bridge_reject_supported():  # judged with the nft tool, not with our probe
        with pytest.raises(CapabilityError, match="reject=True needs .*nft_reject_bridge"):
            trio.set_connection(("main", "secondary"), reject)
        assert trio.connection("main", "secondary").is_allowed
        return
    trio.set_connection(("main", "secondary"), reject)
    code = f"import socket; socket.create_connection(('n2', {probe.PORT}), timeout=5)"
    result = trio.exec("n1", [sys.executable, "-c", code])
    assert "ConnectionRefusedError" in result.stderr, result.stderr


def test_the_hosts_file_and_hostname_stay_inside_the_services(trio: Enclave) -> None:
    add_probes(trio, "late")
    assert trio.exec("n1", ["getent", "hosts", "late"]).stdout.split()[1] == "late"
    assert trio.exec("late", ["hostname"]).stdout.strip() == "late"
    assert socket.gethostname() != "late"
    # the bind mount stays private: the host's /etc/hosts does not name our services
    with open("/etc/hosts") as f:
        assert "late" not in f.read()


def test_own_and_peer_addresses_as_placeholders_and_env(enclave: Enclave) -> None:
    svc = enclave.add_service(
        "a",
        ServiceConfig(
            cmd=[
                "sh",
                "-c",
                "echo self=$ENCLAVE_SERVICE_IP arg={{ip}} peer={{ip:b}} "
                "name={{name}} env=$PEER; sleep 1000",
            ],
            env_vars={"PEER": "{{ip:b}}"},
            ready_conditions=[LogLine("self=")],
        ),
    )
    b_ip = enclave.address_of("b")
    add_probes(enclave, "b")
    assert enclave.get_service("b").ip == b_ip
    assert f"self={svc.ip} arg={svc.ip} peer={b_ip} name=a env={b_ip}" in enclave.logs("a")


def test_the_test_process_reaches_services_directly_unshaped(trio: Enclave) -> None:
    trio.set_connection(config=BLOCKED)
    trio.isolate("n1")
    with probe.ProbeClient(trio.get_service("n1").ip) as client:
        assert client.counts() == {}


def test_timeline_records_every_change_with_monotonic_times(trio: Enclave) -> None:
    trio.update_service("n2", UpdateServiceConfig(subnetwork="secondary"))
    trio.set_loss("main", "secondary", 30)
    trio.heal()
    kinds = [e.kind for e in trio.timeline]
    assert kinds[-3:] == ["update_service", "set_connection", "heal"]
    times = [e.at for e in trio.timeline]
    assert times == sorted(times)


def test_bad_input_gets_clear_errors(trio: Enclave) -> None:
    with pytest.raises(UnknownNameError, match="unknown service 'nope': known are n1, n2, n3"):
        trio.get_service("nope")
    with pytest.raises(UnknownNameError, match="unknown subnetwork 'secondry'"):
        trio.set_connection(("main", "secondry"), BLOCKED)
    with pytest.raises(ConfigError, match="names the same subnetwork twice"):
        trio.set_connection(("main", "main"), BLOCKED)
    with pytest.raises(ConfigError, match="service 'n1' already exists"):
        add_probes(trio, "n1")
    with pytest.raises(ConfigError, match="service name 'bad name' is not allowed"):
        trio.add_service("bad name", ServiceConfig(cmd=["true"]))
    with pytest.raises(ServiceError, match="executable 'no-such-program' not found"):
        trio.add_service("x", ServiceConfig(cmd=["no-such-program"]))
    with pytest.raises(ConfigError, match="image='redis' needs the docker backend"):
        trio.add_service("y", ServiceConfig(image="redis"))
    with pytest.raises(ConfigError, match="no connection is set between"):
        trio.remove_connection(("main", "other"))
    with pytest.raises(UnknownNameError, match="unknown service or subnetwork 'ghost'"):
        trio.partition(["ghost"])
    assert sorted(trio.services) == ["n1", "n2", "n3"]
    assert ours(host_state())["netns"].count(f"{trio.id}-x") == 0


@pytest.mark.skipif(has_netem() is None, reason="this kernel has netem")
def test_delay_without_netem_raises_and_changes_nothing(trio: Enclave) -> None:
    trio.update_service("n2", UpdateServiceConfig(subnetwork="secondary"))
    with pytest.raises(CapabilityError, match="packet_delay_distribution .*needs the sch_netem"):
        trio.set_connection(
            ("main", "secondary"),
            ConnectionConfig(packet_delay_distribution=UniformPacketDelayDistribution(50)),
        )
    assert trio.connection("main", "secondary").is_allowed
    with pytest.raises(CapabilityError, match="doctor"):
        trio.set_delay("main", "secondary", 50)


def test_ready_timeout_names_the_condition_and_the_log(enclave: Enclave) -> None:
    from pytest_enclave import ReadyTimeoutError

    with pytest.raises(ReadyTimeoutError, match=r"within 0.3s: waited for TCP port 9(.|\n)*hi"):
        enclave.add_service(
            "slow",
            ServiceConfig(
                cmd=["sh", "-c", "echo hi; sleep 100"], ports={"p": 9}, ready_timeout=0.3
            ),
        )
    assert f"{enclave.id}-slow" not in sh("ip netns list")
    assert "echo hi; sleep 100" not in sh("ps -eo args")


def test_close_on_exception_and_on_ctrl_c(tmp_path) -> None:
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from helpers import add_probes
        from pytest_enclave import Enclave
        with Enclave() as e:
            add_probes(e, "a", "b")
            print(e.id, flush=True)
            time.sleep(100)
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    enclave_id = proc.stdout.readline().strip()
    assert enclave_id.startswith("pe") and f"{enclave_id}-a" in sh("ip netns list")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) != 0
    assert enclave_id + "-" not in sh("ip netns list")
    assert f"{enclave_id}h" not in sh("ip -br link")

    with pytest.raises(RuntimeError), Enclave() as e:
        add_probes(e, "a")
        enclave_id = e.id
        raise RuntimeError("test body failed")
    assert enclave_id + "-" not in sh("ip netns list")


def test_without_privileges_one_clear_error() -> None:
    code = (
        "from pytest_enclave import Enclave, PermissionDeniedError\n"
        "try:\n    Enclave()\nexcept PermissionDeniedError as e:\n    print(e)\n"
    )
    drop = ["setpriv", "--bounding-set=-net_admin,-sys_admin", "--inh-caps=-net_admin,-sys_admin"]
    out = subprocess.run([*drop, sys.executable, "-c", code], capture_output=True, text=True)
    assert "needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN)" in out.stdout, out.stderr


def test_undo_never_brings_back_what_heal_or_a_later_change_replaced(trio: Enclave) -> None:
    trio.update_service("n2", UpdateServiceConfig(subnetwork="secondary"))
    trio.set_connection(("main", "secondary"), BLOCKED)
    lossy = trio.set_connection(("main", "secondary"), packet_loss_percentage=50.0)
    default = trio.set_connection(config=BLOCKED)
    healing = trio.heal()
    lossy.undo()  # would restore BLOCKED for the pair: heal() already replaced it
    default.undo()
    assert trio.connection("main", "secondary").is_allowed
    assert loss_matrix(trio, ["n1", "n2"], 300)[("n1", "n2")] == 0.0
    healing.undo()  # brings back what heal() removed: the 50 % pair and the blocked default
    assert trio.connection("main", "secondary").packet_loss_percentage == 50.0
    paused = trio.pause("n3")
    trio.close()
    healing.undo()  # after close: nothing to do, and no hang
    paused.undo()
    lossy.undo()
