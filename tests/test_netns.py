"""The netns backend and the nftables shaper with real namespaces and real packets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import (
    ROOT,
    add_probes,
    binomial_bounds,
    foreign,
    host_state,
    ours,
    sh,
    tcp_client_script,
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


def test_90_percent_loss_per_direction_within_binomial_bounds(trio: Enclave) -> None:
    trio.update_service("n2", UpdateServiceConfig(subnetwork="secondary"))
    trio.set_connection(("main", "secondary"), ConnectionConfig(packet_loss_percentage=90.0))
    n = 2000
    loss = loss_matrix(trio, ["n1", "n2", "n3"], n)
    low, high = binomial_bounds(n, 0.9)
    for pair in [("n1", "n2"), ("n2", "n1"), ("n3", "n2"), ("n2", "n3")]:
        assert low <= loss[pair] <= high, (pair, loss[pair], (low, high))
    assert loss[("n1", "n3")] == loss[("n3", "n1")] == 0.0


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


def test_update_service_keeps_address_and_process(trio: Enclave) -> None:
    before = sh(f"ip netns pids {trio.id}-n2").split()
    ip = trio.get_service("n2").ip
    trio.update_service("n2", UpdateServiceConfig(subnetwork="secondary"))
    after = sh(f"ip netns pids {trio.id}-n2").split()
    assert trio.get_service("n2").ip == ip and trio.get_service("n2").subnetwork == "secondary"
    assert before == after and len(before) == 1  # the same service process
    addr = json.loads(sh(f"ip -n {trio.id}-n2 -j addr show dev eth0"))
    assert addr[0]["addr_info"][0]["local"] == ip


def test_asymmetric_block_cuts_one_direction_only(trio: Enclave) -> None:
    with trio.block("n1", "n3"):
        loss = loss_matrix(trio, ["n1", "n3"], 500)
        assert loss[("n1", "n3")] == 1.0 and loss[("n3", "n1")] == 0.0
    loss = loss_matrix(trio, ["n1", "n3"], 500)
    assert loss[("n1", "n3")] == 0.0


def test_partition_groups_and_the_unlisted_rest(trio: Enclave) -> None:
    with trio.partition(["n1"], ["n2"]):  # n3 is the third group
        loss = loss_matrix(trio, ["n1", "n2", "n3"], 300)
        assert all(v == 1.0 for v in loss.values()), loss
    with trio.isolate("n2"):
        loss = loss_matrix(trio, ["n1", "n2", "n3"], 300)
        assert loss[("n1", "n3")] == 0.0 and loss[("n2", "n1")] == loss[("n3", "n2")] == 1.0
    assert all(v == 0.0 for v in loss_matrix(trio, ["n1", "n2", "n3"], 300).values())


def test_established_tcp_connection_stops_after_partition(enclave: Enclave) -> None:
    add_probes(enclave, "server")
    go = os.path.join(enclave.run_dir, "go")
    enclave.add_service(
        "client",
        ServiceConfig(
            cmd=tcp_client_script("server", probe.PORT, go),
            ready_conditions=[LogLine("^connected")],
        ),
    )
    enclave.partition(["client"])
    open(go, "w").close()
    deadline = time.monotonic() + 10
    while "timeout" not in enclave.logs("client") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "timeout" in enclave.logs("client"), enclave.logs("client")
    assert "got" not in enclave.logs("client")


def _bridge_reject_supported() -> bool:
    ns = "pe-rejectcheck"
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


def test_names_resolve_in_every_service_also_when_added_later(trio: Enclave) -> None:
    out = trio.exec("n1", ["getent", "hosts", "n3"]).stdout.split()
    assert out[0] == trio.get_service("n3").ip
    add_probes(trio, "late")
    out = trio.exec("n1", ["getent", "hosts", "late"]).stdout.split()
    assert out == [trio.get_service("late").ip, "late"]
    assert trio.exec("late", ["hostname"]).stdout.strip() == "late"
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


def test_two_enclaves_with_the_same_names_never_collide() -> None:
    with Enclave() as one, Enclave() as two:
        add_probes(one, "db", "app")
        add_probes(two, "db", "app")
        assert one.id != two.id and one.get_service("db").ip != two.get_service("db").ip
        one.isolate("db")
        assert loss_matrix(two, ["db", "app"], 200)[("app", "db")] == 0.0
        assert loss_matrix(one, ["db", "app"], 200)[("app", "db")] == 1.0
        other = two.get_service("app").ip
        code = f"import socket; socket.create_connection(({other!r}, {probe.PORT}), timeout=1)"
        assert one.exec("app", [sys.executable, "-c", code]).returncode != 0  # no route


def test_no_route_out_of_an_enclave(trio: Enclave) -> None:
    routes = json.loads(sh(f"ip -n {trio.id}-n1 -j route"))
    assert [r["dst"] for r in routes] == [f"{trio.get_service('n1').ip.rsplit('.', 1)[0]}.0/24"]
    assert not any(r.get("gateway") for r in routes)


def test_node_faults_kill_stop_start_pause_resume(trio: Enclave) -> None:
    ip = trio.get_service("n2").ip

    def reachable() -> bool:
        try:
            with socket.create_connection((ip, probe.PORT), timeout=0.5) as s:
                s.sendall(b"x\n")
                return s.recv(10) == b"x\n"
        except OSError:
            return False

    assert reachable()
    with trio.pause("n2"):
        assert trio.status("n2") == "paused" and not reachable()
    assert reachable()
    trio.kill("n2")
    assert trio.status("n2") == "stopped" and not reachable()
    trio.start("n2")
    assert trio.status("n2") == "running" and reachable()
    pids = sh(f"ip netns pids {trio.id}-n2").split()
    trio.restart("n2")
    assert reachable() and sh(f"ip netns pids {trio.id}-n2").split() != pids
    trio.stop("n2")
    assert not reachable()
    kinds = [e.kind for e in trio.timeline if e.kind not in ("open", "add_service")]
    assert kinds == ["pause", "resume", "kill", "start", "stop", "start", "stop"]


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


def test_a_service_that_exits_fails_add_service_with_its_log(enclave: Enclave) -> None:
    with pytest.raises(ServiceError, match=r"exited with status 3(.|\n)*\| boom"):
        enclave.add_service(
            "crash", ServiceConfig(cmd=["sh", "-c", "echo boom; exit 3"], ports={"p": 9})
        )
    assert f"{enclave.id}-crash" not in sh("ip netns list")
    assert "crash" not in enclave.services
    add_probes(enclave, "crash")  # the name is free again, the enclave still works


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


def test_close_removes_everything_and_touches_nothing_else() -> None:
    before = host_state()
    with Enclave() as e:
        add_probes(e, "a", "b")
        e.update_service("b", UpdateServiceConfig(subnetwork="s2"))
        e.set_connection(("main", "s2"), BLOCKED)
        enclave_id = e.id
        hub = json.loads(sh(f"ip netns exec {enclave_id}-_hub nft -j list ruleset"))
        assert any("map" in json.dumps(x) or "vmap" in json.dumps(x) for x in hub["nftables"])
        pids = sh(f"ip netns pids {enclave_id}-a").split()
        assert pids
    after = host_state()
    # The host's own tables, routes, links and namespaces are exactly as they were (other
    # enclaves, e.g. of other xdist workers, may come and go meanwhile: they are left out).
    assert foreign(after) == foreign(before)
    assert f"{enclave_id}h" not in after["links"]
    assert not [r for r in after["routes"] if r.get("dev") == f"{enclave_id}h"]
    assert not [n for n in sh("ip netns list").split() if n.startswith(f"{enclave_id}-")]
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")


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


def test_a_killed_run_is_reaped_by_the_next_owner_of_its_slot(tmp_path) -> None:
    from pytest_enclave._linux import Slot

    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from helpers import add_probes
        from pytest_enclave import Enclave
        e = Enclave()
        add_probes(e, "a")
        print(e.id, flush=True)
        os._exit(9)  # no cleanup at all
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    number = int(out.strip()[2:])
    assert f"pe{number}-a" in sh("ip netns list")
    slot = Slot.acquire(start=number)
    try:
        assert slot.number == number
        from pytest_enclave.backends.netns import reap_slot

        assert f"pe{number}-a" in reap_slot(number)
    finally:
        slot.release()
    assert f"pe{number}-" not in sh("ip netns list")
    assert not sh(
        f"pgrep -f 'pytest_enclave.probe' | xargs -r -I{{}} ip netns identify {{}}"
        f" | grep pe{number}- || true"
    )


def test_without_privileges_one_clear_error() -> None:
    code = (
        "from pytest_enclave import Enclave, PermissionDeniedError\n"
        "try:\n    Enclave()\nexcept PermissionDeniedError as e:\n    print(e)\n"
    )
    drop = ["setpriv", "--bounding-set=-net_admin,-sys_admin", "--inh-caps=-net_admin,-sys_admin"]
    out = subprocess.run([*drop, sys.executable, "-c", code], capture_output=True, text=True)
    assert "needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN)" in out.stdout, out.stderr
