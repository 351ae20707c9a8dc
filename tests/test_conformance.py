"""One behaviour, every backend: the same tests on netns and docker, with real packets.

Effects are checked independently of our code where it matters: packets counted by probes
inside the services, ``nsenter ... ip -j route``, ``nft -j``, ``ip netns pids`` and
``docker inspect`` / ``docker ps --filter label=...``. The docker variants skip (with the
reason) when no engine or no test image is here; CI provides both (`bash .ci/docker-up.sh &&
bash tools/build-images.sh`), so there they run.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import ROOT, binomial_bounds, foreign, host_state, sh, tcp_client_script

from pytest_enclave import (
    BLOCKED,
    BackendError,
    CapabilityError,
    ConnectionConfig,
    Enclave,
    LogLine,
    ServiceConfig,
    ServiceError,
    UniformPacketDelayDistribution,
    UpdateServiceConfig,
    probe,
)
from pytest_enclave._linux import Slot
from pytest_enclave.backends.netns import reap_slot as netns_reap_slot
from pytest_enclave.caps import has_netem
from pytest_enclave.measure import loss_matrix

pytestmark = pytest.mark.skipif(not ROOT, reason="needs root for namespaces and nftables")

IMAGE = "pytest-enclave/debian:test"
PROBE_CODE = Path(probe.__file__).read_text()
OWNER = f"{socket.gethostname()}:{os.getpid()}"
TESTS = os.path.dirname(os.path.abspath(__file__))


def docker_reap_slot(number: int) -> list[str]:
    from pytest_enclave.backends.docker import reap_slot

    return reap_slot(number)


@functools.cache
def docker_missing() -> str | None:
    """Why the docker variants cannot run here (None: they can)."""
    try:
        import docker
    except ImportError:
        return "the docker SDK is not installed: pip install 'pytest-enclave[docker]'"
    try:
        client = docker.from_env()
    except Exception as exc:
        return f"no Docker engine reachable ({exc}): bash .ci/docker-up.sh"
    try:
        client.images.get(IMAGE)
    except Exception:
        return f"image {IMAGE} is missing: bash tools/build-images.sh"
    finally:
        client.close()
    return None


def skip_or_fail_without_docker() -> None:
    """Skip the docker variants where no engine is; in CI (CI=true) that is a failure."""
    reason = docker_missing()
    if reason and os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the docker variants: {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)


@pytest.fixture(params=["netns", "docker"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        skip_or_fail_without_docker()
    return str(request.param)


@pytest.fixture
def enclave(backend: str) -> Iterator[Enclave]:
    with Enclave(backend=backend) as e:
        yield e


@pytest.fixture
def trio(enclave: Enclave) -> Enclave:
    add_probes(enclave, "n1", "n2", "n3")
    return enclave


@pytest.fixture(scope="module", autouse=True)
def nothing_of_ours_remains() -> Iterator[None]:
    """The leak check: after the module, no container or network of this process is left."""
    yield
    if ROOT and docker_missing() is None:
        assert docker_objects(f"org.pytest-enclave.owner={OWNER}") == ([], [])


# -- how services are run on each backend -----------------------------------------------------


def docker(enclave: Enclave) -> bool:
    return enclave.backend.name == "docker"


def python(enclave: Enclave) -> str:
    """The Python inside services: the image's, or the test's own interpreter."""
    return "python3" if docker(enclave) else sys.executable


def program(enclave: Enclave, argv: list[str], **fields: object) -> ServiceConfig:
    """A service running ``argv``; "python" in it means the backend's interpreter."""
    argv = [python(enclave) if a == "python" else a for a in argv]
    image = IMAGE if docker(enclave) else None
    return ServiceConfig(image=image, cmd=argv, **fields)  # type: ignore[arg-type]


def add_probes(enclave: Enclave, *names: str, subnetwork: str = "main") -> None:
    argv = ["python", "-c", PROBE_CODE] if docker(enclave) else probe.command()
    for name in names:
        config = program(enclave, argv, ports={"probe": probe.PORT}, subnetwork=subnetwork)
        enclave.add_service(name, config)


# -- independent views of the machine ----------------------------------------------------------


def netns_of(enclave: Enclave, name: str) -> str:
    """The path of the service's network namespace, found without our code."""
    if docker(enclave):
        return f"/proc/{docker_inspect(enclave, name)['State']['Pid']}/ns/net"
    return f"/run/netns/{enclave.id}-{name}"


def docker_inspect(enclave: Enclave, name: str) -> dict:  # type: ignore[type-arg]
    return json.loads(sh(f"docker inspect {enclave.id}-{name}"))[0]  # type: ignore[no-any-return]


def processes(enclave: Enclave, name: str) -> list[str]:
    """The service's processes (docker: the main process and when it started)."""
    if docker(enclave):
        state = docker_inspect(enclave, name)["State"]
        return [str(state["Pid"]), state["StartedAt"]] if state["Running"] else []
    return sorted(sh(f"ip netns pids {enclave.id}-{name}").split())


def routes_in(enclave: Enclave, name: str) -> list[dict]:  # type: ignore[type-arg]
    return json.loads(sh(f"nsenter --net={netns_of(enclave, name)} ip -j route"))  # type: ignore[no-any-return]


def docker_objects(label: str) -> tuple[list[str], list[str]]:
    containers = sh(f"docker ps -a -q --filter label={label}").split()
    networks = sh(f"docker network ls -q --filter label={label}").split()
    return containers, networks


def nft_tables() -> set[str]:
    tables = json.loads(sh("nft -j list tables"))["nftables"]
    return {f"{t['table']['family']} {t['table']['name']}" for t in tables if "table" in t}


def foreign_state() -> dict[str, object]:
    """The host's nft ruleset, links, routes and namespaces, without any enclave's (other
    xdist workers make and remove theirs meanwhile) and without what Docker rewrites."""
    return foreign(host_state())


def until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def netns_names() -> list[str]:
    return [line.split()[0] for line in sh("ip netns list").splitlines() if line.strip()]


def reachable(ip: str) -> bool:
    """A TCP echo round trip from the test process to a probe (unshaped)."""
    try:
        with socket.create_connection((ip, probe.PORT), timeout=0.5) as s:
            s.sendall(b"x\n")
            return s.recv(10) == b"x\n"
    except OSError:
        return False


# -- network faults ----------------------------------------------------------------------------


def test_90_percent_loss_applies_each_way_within_binomial_bounds(trio: Enclave) -> None:
    trio.update_service("n2", UpdateServiceConfig(subnetwork="secondary"))
    trio.set_connection(("main", "secondary"), ConnectionConfig(packet_loss_percentage=90.0))
    n = 2000  # datagrams per direction
    loss = loss_matrix(trio, ["n1", "n2", "n3"], n)
    low, high = binomial_bounds(n, 0.9)
    for pair in [("n1", "n2"), ("n2", "n1"), ("n3", "n2"), ("n2", "n3")]:
        assert low <= loss[pair] <= high, (pair, loss[pair], (low, high))
    assert loss[("n1", "n3")] == loss[("n3", "n1")] == 0.0


def test_block_passes_nothing_and_heal_restores(trio: Enclave) -> None:
    trio.update_service("n3", UpdateServiceConfig(subnetwork="secondary"))
    trio.set_connection(("main", "secondary"), BLOCKED)
    loss = loss_matrix(trio, ["n1", "n2", "n3"], 300)
    assert loss[("n1", "n3")] == loss[("n3", "n1")] == loss[("n2", "n3")] == 1.0
    assert loss[("n1", "n2")] == 0.0
    trio.heal()
    assert all(v == 0.0 for v in loss_matrix(trio, ["n1", "n2", "n3"], 300).values())


def test_asymmetric_block_cuts_one_direction_only(trio: Enclave) -> None:
    with trio.block("n1", "n3"):
        loss = loss_matrix(trio, ["n1", "n3"], 300)
        assert loss[("n1", "n3")] == 1.0 and loss[("n3", "n1")] == 0.0
    assert loss_matrix(trio, ["n1", "n3"], 300)[("n1", "n3")] == 0.0


def test_a_change_is_one_table_and_a_refused_one_changes_nothing(trio: Enclave) -> None:
    if not docker(trio) and has_netem() is None:
        pytest.skip("this kernel has netem: the netns backend accepts delays")
    if docker(trio):  # the enclave's bridge table: in the host, or in the enclave's hub
        dump = f"nft -j list table bridge pytest_enclave_{trio.id}"
    else:
        dump = f"ip netns exec {trio.id}-_hub nft -j list table bridge pytest_enclave"
    trio.update_service("n2", UpdateServiceConfig(subnetwork="secondary"))
    lossy = ConnectionConfig(packet_loss_percentage=30.0)
    trio.set_connection(("main", "secondary"), lossy)
    before = sh(dump)
    for ip in (trio.get_service(n).ip for n in ("n1", "n2", "n3")):
        assert ip in before  # both directions of every shaped pair are in the one table
    delay = ConnectionConfig(packet_delay_distribution=UniformPacketDelayDistribution(50))
    with pytest.raises(CapabilityError, match="packet_delay_distribution .*needs the sch_netem"):
        trio.set_connection(("main", "secondary"), delay)
    assert sh(dump) == before and trio.connection("main", "secondary") == lossy


def test_update_service_keeps_address_and_process(trio: Enclave) -> None:
    before, ip = processes(trio, "n2"), trio.get_service("n2").ip
    trio.update_service("n2", UpdateServiceConfig(subnetwork="secondary"))
    trio.set_connection(("main", "secondary"), BLOCKED)
    assert processes(trio, "n2") == before and before
    addr = json.loads(sh(f"nsenter --net={netns_of(trio, 'n2')} ip -j addr show dev eth0"))
    assert addr[0]["addr_info"][0]["local"] == ip == trio.get_service("n2").ip
    assert loss_matrix(trio, ["n1", "n2"], 200)[("n1", "n2")] == 1.0


def test_established_tcp_connection_is_cut_by_a_partition(enclave: Enclave) -> None:
    add_probes(enclave, "server")
    go = "/tmp/go" if docker(enclave) else os.path.join(enclave.run_dir, "go")
    argv = ["python", *tcp_client_script("server", probe.PORT, go)[1:]]
    enclave.add_service("client", program(enclave, argv, ready_conditions=[LogLine("^connected")]))
    enclave.partition(["client"])
    assert enclave.exec("client", ["touch", go]).ok
    assert until(lambda: "timeout" in enclave.logs("client")), enclave.logs("client")
    assert "got" not in enclave.logs("client")


# -- services ----------------------------------------------------------------------------------


def test_node_faults_kill_stop_start_pause_resume_restart(trio: Enclave) -> None:
    ip = trio.get_service("n2").ip
    assert reachable(ip)
    with trio.pause("n2"):
        assert trio.status("n2") == "paused" and not reachable(ip)
    assert trio.status("n2") == "running" and reachable(ip)
    trio.kill("n2")
    assert trio.status("n2") == "stopped" and not reachable(ip) and not processes(trio, "n2")
    trio.start("n2")
    assert trio.status("n2") == "running" and reachable(ip)
    before = processes(trio, "n2")
    trio.restart("n2")
    assert reachable(ip) and processes(trio, "n2") != before
    assert trio.get_service("n2").ip == ip
    trio.stop("n2")
    assert trio.status("n2") == "stopped" and not reachable(ip)
    kinds = [e.kind for e in trio.timeline if e.kind not in ("open", "add_service")]
    assert kinds == ["pause", "resume", "kill", "start", "stop", "start", "stop"]


def test_signal_other_than_kill_reaches_the_program(enclave: Enclave) -> None:
    trap = "trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 0.1; done"
    ready = [LogLine("ready")]
    enclave.add_service("a", program(enclave, ["sh", "-c", trap], ready_conditions=ready))
    enclave.kill("a", signal.SIGTERM)
    assert until(lambda: enclave.status("a") == "exited")
    assert until(lambda: "got-term" in enclave.logs("a"))


def test_no_route_out_also_after_a_restart(trio: Enclave) -> None:
    subnet = trio.get_service("n1").ip.rsplit(".", 1)[0] + ".0/24"
    assert [r["dst"] for r in routes_in(trio, "n1")] == [subnet]
    trio.restart("n1")
    assert [r["dst"] for r in routes_in(trio, "n1")] == [subnet]
    assert not any(r.get("gateway") for r in routes_in(trio, "n1"))
    outside = "198.51.100.1"  # TEST-NET-2: with no route, nothing is even sent
    code = f"import socket; socket.create_connection(({outside!r}, 80), timeout=1)"
    result = trio.exec("n1", [python(trio), "-c", code])
    assert result.returncode != 0 and "unreachable" in result.stderr, result.stderr


def test_names_resolve_in_every_service_also_when_added_later(trio: Enclave) -> None:
    out = trio.exec("n1", ["getent", "hosts", "n3"]).stdout.split()
    assert out[0] == trio.get_service("n3").ip
    add_probes(trio, "late_one")
    out = trio.exec("n1", ["getent", "hosts", "late_one"]).stdout.split()
    assert out[:2] == [trio.get_service("late_one").ip, "late_one"]
    assert trio.exec("late_one", ["hostname"]).stdout.strip() == "late_one"
    started = time.monotonic()
    assert not trio.exec("n1", ["getent", "hosts", "nosuchservice"]).ok
    assert time.monotonic() - started < 2.0  # unknown names fail at once, nothing forwarded
    if docker(trio):  # the embedded DNS may forward only inside the container: to nothing
        assert docker_inspect(trio, "n1")["HostConfig"]["Dns"] == ["127.0.0.1"]


def test_logs_exec_input_and_timeouts(enclave: Enclave) -> None:
    script = "import sys; print('out', flush=True); print('err', file=sys.stderr, flush=True)"
    loop = f"{script}; import time; time.sleep(1000)"
    enclave.add_service("a", program(enclave, ["python", "-c", loop]))
    assert until(lambda: "err" in enclave.logs("a")) and "out" in enclave.logs("a")
    done = enclave.exec("a", ["sh", "-c", "cat; echo oops >&2; exit 3"], input="in\n")
    assert (done.returncode, done.stdout, done.stderr) == (3, "in\n", "oops\n")
    started = time.monotonic()
    with pytest.raises(ServiceError, match=r"timed out after 0.5s"):
        enclave.exec("a", ["sleep", "30"], timeout=0.5)
    assert time.monotonic() - started < 5
    with pytest.raises(ServiceError, match="executable 'no-such-program' not found"):
        enclave.exec("a", ["no-such-program"])
    enclave.restart("a", timeout=1)
    assert until(lambda: enclave.logs("a").count("err") == 2)  # a restart appends to the log
    assert enclave.logs("a").count("out") == 2


def test_a_service_that_exits_fails_add_service_with_its_log(enclave: Enclave) -> None:
    argv = ["sh", "-c", "echo boom; exit 3"]
    with pytest.raises(ServiceError, match=r"exited with status 3(.|\n)*\| boom"):
        enclave.add_service("crash", program(enclave, argv, ports={"p": 9}))
    assert "crash" not in enclave.services
    if docker(enclave):
        assert sh(f"docker ps -a -q --filter name=^{enclave.id}-crash$") == ""
    else:
        assert f"{enclave.id}-crash" not in sh("ip netns list")
    add_probes(enclave, "crash")  # the name is free again


# -- isolation and cleanup ---------------------------------------------------------------------


def test_two_enclaves_with_the_same_names_never_collide(backend: str) -> None:
    with Enclave(backend=backend) as one, Enclave(backend=backend) as two:
        add_probes(one, "db", "app")
        add_probes(two, "db", "app")
        assert one.id != two.id and one.get_service("db").ip != two.get_service("db").ip
        one.isolate("db")
        assert loss_matrix(two, ["db", "app"], 200)[("app", "db")] == 0.0
        assert loss_matrix(one, ["db", "app"], 200)[("app", "db")] == 1.0
        other = two.get_service("app").ip
        code = f"import socket; socket.create_connection(({other!r}, {probe.PORT}), timeout=1)"
        assert one.exec("app", [python(one), "-c", code]).returncode != 0


def test_close_removes_exactly_what_the_enclave_made(backend: str) -> None:
    before = foreign_state()
    with Enclave(backend=backend) as e:
        add_probes(e, "a", "b")
        e.update_service("b", UpdateServiceConfig(subnetwork="s2"))
        e.set_connection(("main", "s2"), BLOCKED)
        number, slot = e.id[2:], f"org.pytest-enclave.slot={e.id[2:]}"
        pids = processes(e, "a")
        if docker(e):
            containers, networks = docker_objects(slot)
            assert len(containers) == 2 and len(networks) == 1
            labels = docker_inspect(e, "a")["Config"]["Labels"]
            assert labels["org.pytest-enclave.owner"] == OWNER
            assert f"bridge pytest_enclave_pe{number}" in nft_tables()
            ports = [x["ifname"] for x in json.loads(sh(f"ip -j link show master {e.id}d"))]
            assert len(ports) == 2
    after = foreign_state()
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not [t for t in nft_tables() if re.search(rf"pytest_enclave_pe{number}\b", t)]
    assert not [n for n in netns_names() if n.startswith(f"pe{number}-")]
    if backend == "docker":
        assert docker_objects(slot) == ([], [])
        links = sh("ip -br link")
        assert f"pe{number}d" not in links and not any(p in links for p in ports)
    else:
        assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)


def test_a_killed_run_is_reaped_by_the_next_owner_of_its_slot(backend: str) -> None:
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {TESTS!r})
        import test_conformance as t
        from pytest_enclave import Enclave
        e = Enclave(backend={backend!r})
        t.add_probes(e, "a")
        e.isolate("a")
        print(e.id, flush=True)
        os._exit(9)  # no cleanup at all
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.startswith("pe"), out.stderr
    number = int(out.stdout.strip()[2:])
    label = f"org.pytest-enclave.slot={number}"
    run_dirs = f"{tempfile.gettempdir()}/pytest-enclave-pe{number}-*"
    assert glob.glob(run_dirs)  # the killed run's logs and hosts file
    slot = Slot.acquire(start=number)  # as the next enclave in this slot would
    try:
        assert slot.number == number
        assert not glob.glob(run_dirs)
        if backend == "docker":
            assert docker_objects(label) != ([], [])
            removed = docker_reap_slot(number)
            assert f"docker container pe{number}-a" in removed, removed
            assert f"docker network pe{number}-net" in removed
            assert f"nft table bridge pytest_enclave_pe{number}" in removed
        else:
            assert f"pe{number}-a" in netns_reap_slot(number)
    finally:
        slot.release()
    assert not [t for t in nft_tables() if re.search(rf"pytest_enclave_pe{number}\b", t)]
    if backend == "docker":
        assert docker_objects(label) == ([], [])
        assert f"pe{number}d" not in sh("ip -br link")
    else:
        assert f"pe{number}-" not in sh("ip netns list")


# -- docker only: clear errors -----------------------------------------------------------------


@pytest.fixture
def docker_here() -> None:
    skip_or_fail_without_docker()


@pytest.mark.usefixtures("docker_here")
def test_docker_a_missing_image_says_it_is_never_pulled() -> None:
    with Enclave(backend="docker") as e:
        with pytest.raises(ServiceError, match="never pulls(.|\n)*docker load(.|\n)*build-images"):
            e.add_service("x", ServiceConfig(image="pytest-enclave/no-such-image:1"))
        assert "x" not in e.services
        assert sh(f"docker ps -a -q --filter name=^{e.id}-x$") == ""


@pytest.mark.usefixtures("docker_here")
def test_docker_containers_reach_the_host_only_at_its_gateway_address() -> None:
    with Enclave(backend="docker") as e:
        add_probes(e, "a")
        other = e.gateway_ip.rsplit(".", 1)[0] + ".250"  # a second host address, on our bridge
        sh(f"ip addr add {other}/32 dev {e.id}d")
        try:
            for ip, ok in ((e.gateway_ip, True), (other, False)):
                with socket.create_server((ip, 0)) as server:
                    code = "import socket; socket.create_connection((%r, %d), timeout=1)"
                    argv = ["python3", "-c", code % (ip, server.getsockname()[1])]
                    assert e.exec("a", argv).ok is ok, ip
        finally:
            sh(f"ip addr del {other}/32 dev {e.id}d")


def test_docker_no_engine_says_how_to_start_one(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("docker")
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/pytest-enclave-no-such-docker.sock")
    with pytest.raises(BackendError, match=r"no Docker engine is reachable(.|\n)*dockerd &"):
        Enclave(backend="docker")


def _in_empty_netns(code: str, **env: str) -> str:
    """Run Python ``code`` in a fresh network namespace (only a down lo: nothing can leave)."""
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )
    return done.stdout + done.stderr


REFUSAL = (
    "from pytest_enclave import Enclave, CapabilityError\n"
    "try:\n    Enclave(backend='docker')\nexcept CapabilityError as e:\n    print('refused:', e)\n"
)


def test_docker_a_remote_engine_is_refused_not_left_unshaped() -> None:
    pytest.importorskip("docker")
    out = _in_empty_netns(REFUSAL, DOCKER_HOST="tcp://192.0.2.1:2375")
    assert "refused: DOCKER_HOST='tcp://192.0.2.1:2375' points at an engine on another" in out


@pytest.mark.usefixtures("docker_here")
def test_docker_an_engine_in_another_namespace_is_refused_and_cleaned_up() -> None:
    out = _in_empty_netns(REFUSAL)
    assert "refused: the Docker engine made bridge" in out and "another namespace" in out, out
    number = re.search(r"bridge pe(\d+)d", out).group(1)  # type: ignore[union-attr]
    assert docker_objects(f"org.pytest-enclave.slot={number}") == ([], [])
