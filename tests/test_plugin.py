"""Acceptance tests of the pytest plugin: real enclaves, real namespaces, real traffic.

Each test writes a small suite with ``pytester`` and runs it (in process, or in a subprocess
for xdist and Ctrl-C). Inner suites record the id of every enclave they build in the file named
by ``PE_IDS``; the autouse ``no_leaks`` fixture then checks that none of those enclaves left a
namespace, a host link or a keep marker behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_enclave import Enclave, ServiceConfig
from pytest_enclave.errors import CapabilityError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="enclaves need root")

STATE_DIR = Path("/run/pytest-enclave")

# Imported by the inner suites (pytester puts the test directory on sys.path).
HELPERS = '''
import os

from pytest_enclave import ServiceConfig

SEEN = {}  # enclaves seen by earlier tests, by what they were


def web(subnetwork="main"):
    return ServiceConfig(
        cmd=["python3", "-m", "http.server", "-b", "{{ip}}", "8000"],
        ports={"http": 8000},
        subnetwork=subnetwork,
    )


def sleeper(subnetwork="main"):
    return ServiceConfig(cmd=["sleep", "1000"], subnetwork=subnetwork)


def record(enclave):
    with open(os.environ["PE_IDS"], "a") as f:
        f.write(enclave.id + "\\n")


def builds():
    with open(os.environ["PE_IDS"]) as f:
        return len(f.read().split())


def http(enclave, src, dst, timeout=0.5):
    """HTTP status from service src to service dst, over the enclave network ("000": none)."""
    url = f"http://{enclave.get_service(dst).ip}:8000/"
    argv = ["curl", "-s", "-m", str(timeout), "-o", "/dev/null", "-w", "%{http_code}", url]
    return enclave.exec(src, argv).stdout


def three(enclave):
    """web1 and web2 (HTTP servers) and client, all in subnetwork main."""
    record(enclave)
    enclave.add_service("web1", web())
    enclave.add_service("web2", web())
    enclave.add_service("client", sleeper())
'''


def _ids(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _leftovers(ids: list[str]) -> list[str]:
    """Namespaces, host links and keep markers of these enclaves that still exist."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True)
    found = [n for n in netns.stdout.split("\n") if any(n.startswith(f"{i}-") for i in ids)]
    hosts = {f"{i}h" for i in ids}
    found += [ln for ln in links.stdout.split("\n") if ln and ln.split()[0].split("@")[0] in hosts]
    found += [str(STATE_DIR / f"slot-{i[2:]}.kept") for i in ids if _kept_marker(i).exists()]
    return found


def _kept_marker(enclave_id: str) -> Path:
    return STATE_DIR / f"slot-{enclave_id[2:]}.kept"


def _remove_kept(enclave_id: str) -> None:
    """The printed clean command, for one kept enclave (others' kept enclaves stay)."""
    marker = _kept_marker(enclave_id)
    run_dir = marker.read_text().strip()
    subprocess.run([sys.executable, "-m", "pytest_enclave", "clean", enclave_id], check=True)
    assert not marker.exists() and not Path(run_dir).exists()


@pytest.fixture(autouse=True)
def no_leaks(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Give inner suites a PE_IDS file and the helpers; afterwards nothing of them may remain."""
    ids = pytester.path / "enclave-ids.txt"
    monkeypatch.setenv("PE_IDS", str(ids))
    pytester.makepyfile(enclave_helpers=HELPERS)
    yield ids
    assert _leftovers(_ids(ids)) == []
    nft = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    # the netns backend's tables live in the enclaves' own namespaces: none on the host (the
    # docker backend's host tables, of other workers' enclaves, are named after their slot)
    mine = [re.compile(rf"\b(pytest_enclave_)?{i}(_|$)") for i in _ids(ids)]
    assert not [t for t in nft.stdout.split("\n") if any(m.search(t) for m in mine)]


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("--strict-markers", "-p", "no:cacheprovider", "-rA", *args)


# ---------------------------------------------------------------------------------------------
# Registration and options


def test_markers_are_documented_with_examples(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    assert result.ret == 0
    text = result.stdout.str()
    assert "@pytest.mark.subnetwork(name, *services):" in text
    assert (
        "@pytest.mark.connection(a, b, config=None, *, skip_unsupported=False, **fields):" in text
    )
    assert "@pytest.mark.enclave_skip_unsupported:" in text
    assert 'Example: @pytest.mark.subnetwork("secondary", "db2", "app2")' in text
    assert '@pytest.mark.connection("main", "secondary", packet_loss_percentage=90.0)' in text


def test_every_marker_passes_strict_markers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_enclave import BLOCKED, UniformPacketDelayDistribution
        from enclave_helpers import record, sleeper

        @pytest.fixture
        def enclave_services():
            def run(enclave):
                record(enclave)
                enclave.add_service("a", sleeper("x"))
                enclave.add_service("b", sleeper("y"))
            return run

        @pytest.mark.subnetwork("z", "b")
        @pytest.mark.connection("x", "z", BLOCKED)
        @pytest.mark.connection(packet_loss_percentage=5.0)
        @pytest.mark.enclave_skip_unsupported
        def test_all(enclave):
            assert enclave.get_service("b").subnetwork == "z"
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*not found in `markers`*")


def test_plain_import_does_not_import_pytest() -> None:
    code = "import sys, pytest_enclave; assert 'pytest' not in sys.modules, 'pytest imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_report_header_and_backend_option(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        """
        import os

        def test_backend(enclave):
            assert enclave.backend.name == os.environ["EXPECTED_BACKEND"]
            assert enclave.services == {}
        """
    )
    monkeypatch.setenv("EXPECTED_BACKEND", "netns")
    result = run(pytester)
    result.stdout.fnmatch_lines(["enclave: backend=netns, keep=none"])
    result.assert_outcomes(passed=1)
    # docker: whatever the docker backend's state, the choice must reach the enclave
    pytester.makeini("[pytest]\nenclave_backend = docker\n")
    monkeypatch.setenv("EXPECTED_BACKEND", "docker")
    result = run(pytester)
    result.stdout.fnmatch_lines(["enclave: backend=docker, keep=none"])
    outcomes = result.parseoutcomes()
    if not outcomes.get("passed"):  # no engine here: the docker backend's own error
        assert outcomes.get("errors") == 1
        result.stdout.fnmatch_lines(["*no Docker engine is reachable*"])
    monkeypatch.setenv("EXPECTED_BACKEND", "netns")
    result = run(pytester, "--enclave-backend=netns")  # the command line wins over the ini
    result.stdout.fnmatch_lines(["enclave: backend=netns, keep=none"])
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("ini", "message"),
    [
        ("enclave_backend = vbox", "enclave_backend='vbox' is not allowed: use netns or docker"),
        ("enclave_keep = some", "enclave_keep='some' is not allowed: use none, failed, all"),
        ("enclave_log_lines = -1", "enclave_log_lines='-1' is not allowed*"),
    ],
)
def test_bad_ini_values_are_usage_errors(pytester: pytest.Pytester, ini: str, message: str) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_nothing(): pass")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}"])


# ---------------------------------------------------------------------------------------------
# Markers: real effects on traffic


def test_markers_shape_real_traffic(pytester: pytest.Pytester, no_leaks: Path) -> None:
    pytester.makeconftest(
        """
        import pytest
        from enclave_helpers import three

        @pytest.fixture
        def enclave_services():
            return three
        """
    )
    pytester.makepyfile(
        test_function_marks="""
        import re
        import pytest
        from pytest_enclave import ALLOWED, BLOCKED, ConnectionConfig
        from enclave_helpers import http

        def test_no_marks(enclave):
            assert enclave.get_service("web2").subnetwork == "main"
            assert http(enclave, "client", "web1") == "200"
            assert http(enclave, "client", "web2") == "200"

        @pytest.mark.subnetwork("secondary", "web2")
        @pytest.mark.connection("main", "secondary", BLOCKED)
        def test_blocked_constant(enclave):
            assert enclave.get_service("web2").subnetwork == "secondary"
            assert enclave.connection("main", "secondary").is_blocked
            assert http(enclave, "client", "web1") == "200"
            assert http(enclave, "client", "web2") == "000"

        @pytest.mark.subnetwork("secondary", "web2")
        @pytest.mark.connection("main", "secondary", packet_loss_percentage=100.0)
        def test_kurtosis_keyword(enclave):
            assert http(enclave, "client", "web2") == "000"
            assert http(enclave, "client", "web1") == "200"

        @pytest.mark.subnetwork("secondary", "web2")
        @pytest.mark.connection("main", "secondary", ConnectionConfig(packet_loss_percentage=50))
        def test_connection_config_loss(enclave):
            ip = enclave.get_service("web2").ip
            out = enclave.exec(
                "client", ["busybox", "ping", "-c", "60", "-i", "0.01", "-W", "1", ip]
            ).stdout
            received = int(re.search(r"(\\d+) packets received", out).group(1))
            # 50 % each way: a ping and its answer both pass in about 1 case of 4
            assert 3 <= received <= 35, out

        @pytest.mark.subnetwork("secondary", ["web2", "client"])
        @pytest.mark.connection(("main", "secondary"), config=BLOCKED)
        def test_list_and_tuple_forms(enclave):
            assert http(enclave, "client", "web2") == "200"
            assert http(enclave, "client", "web1") == "000"

        @pytest.mark.subnetwork("a", "web1")
        @pytest.mark.subnetwork("b", "web2")
        @pytest.mark.connection(BLOCKED)
        @pytest.mark.connection("main", "b", ALLOWED)
        def test_default_connection(enclave):
            assert http(enclave, "client", "web1") == "000"
            assert http(enclave, "client", "web2") == "200"

        @pytest.mark.subnetwork("secondary", "web2")
        @pytest.mark.connection(
            "main", "secondary", ConnectionConfig(packet_loss_percentage=10),
            packet_loss_percentage=100,
        )
        def test_config_and_fields(enclave):
            assert enclave.connection("main", "secondary").is_blocked
            assert http(enclave, "client", "web2") == "000"

        @pytest.mark.subnetwork("far", "web2")
        @pytest.mark.subnetwork("near", "web2")
        def test_closest_decorator_wins(enclave):
            assert enclave.get_service("web2").subnetwork == "near"
        """,
        test_module_marks="""
        import pytest
        from pytest_enclave import ALLOWED, BLOCKED
        from enclave_helpers import http

        pytestmark = [
            pytest.mark.subnetwork("secondary", "web2"),
            pytest.mark.connection("main", "secondary", BLOCKED),
        ]

        def test_inherits_module_marks(enclave):
            assert http(enclave, "client", "web2") == "000"

        @pytest.mark.connection("main", "secondary", ALLOWED)
        def test_closest_marker_wins(enclave):
            assert http(enclave, "client", "web2") == "200"

        @pytest.mark.subnetwork("secondary", "client")
        def test_module_and_function_marks_add_up(enclave):
            assert http(enclave, "client", "web2") == "200"
            assert http(enclave, "client", "web1") == "000"
        """,
    )
    result = run(pytester)
    result.assert_outcomes(passed=11)
    assert len(_ids(no_leaks)) == 11  # function scope: a fresh enclave for every test


def test_marker_errors_fail_only_that_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_enclave import BLOCKED
        from enclave_helpers import record, sleeper

        @pytest.fixture
        def enclave_services():
            def run(enclave):
                record(enclave)
                enclave.add_service("db", sleeper())
            return run

        @pytest.mark.subnetwork("secondary", "nope")
        def test_unknown_service(enclave): pass

        @pytest.mark.connection("main", "elsewhere", BLOCKED)
        def test_unknown_subnetwork(enclave): pass

        @pytest.mark.subnetwork("secondary", "db")
        @pytest.mark.connection("main", "secondary", packet_loss_percentage=150)
        def test_bad_percentage(enclave): pass

        @pytest.mark.connection("main", "secondary", packet_loss=5)
        def test_unknown_field(enclave): pass

        @pytest.mark.subnetwork("secondary")
        def test_no_services(enclave): pass

        @pytest.mark.connection("main", BLOCKED)
        def test_one_subnetwork(enclave): pass

        @pytest.mark.connection("main", "secondary")
        def test_no_config(enclave): pass

        @pytest.mark.connection(BLOCKED, skip_unsupported="yes")
        def test_bad_skip_flag(enclave): pass

        def test_still_fine(enclave):
            assert "db" in enclave.services
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=8)
    result.stdout.fnmatch_lines_random(
        [
            "@pytest.mark.subnetwork('secondary', 'nope'): unknown service 'nope': known are db",
            "@pytest.mark.connection('main', 'elsewhere', BLOCKED): unknown subnetwork "
            "'elsewhere': known are main*",
            "@pytest.mark.connection('main', 'secondary', packet_loss_percentage=150): "
            "packet_loss_percentage=150 is not allowed: percentages go from 0 to 100",
            "@pytest.mark.connection('main', 'secondary', packet_loss=5): unknown connection "
            "field(s) packet_loss*",
            "@pytest.mark.subnetwork('secondary'): names no service to move*",
            "@pytest.mark.connection('main', BLOCKED): names one subnetwork ('main')*",
            "@pytest.mark.connection('main', 'secondary'): give a connection: BLOCKED, ALLOWED*",
            "@pytest.mark.connection(BLOCKED, skip_unsupported='yes'): skip_unsupported='yes'*",
        ]
    )
    text = result.stdout.str()
    for internal in ("Traceback", "plugin.py", "During handling", "direct cause"):
        assert internal not in text


def test_capability_errors_fail_or_skip_with_the_reason(pytester: pytest.Pytester) -> None:
    with Enclave() as probe:
        probe.add_service("a", ServiceConfig(cmd=["sleep", "100"], subnetwork="x"))
        probe.add_service("b", ServiceConfig(cmd=["sleep", "100"], subnetwork="y"))
        try:
            probe.set_delay("x", "y", 5)
        except CapabilityError:
            pass
        else:
            pytest.skip("this machine can delay packets: nothing to fail or skip")
    pytester.makepyfile(
        """
        import pytest
        from pytest_enclave import ConnectionConfig, UniformPacketDelayDistribution
        from enclave_helpers import record, sleeper

        DELAY = UniformPacketDelayDistribution(50)

        @pytest.fixture
        def enclave_services():
            def run(enclave):
                record(enclave)
                enclave.add_service("a", sleeper("x"))
                enclave.add_service("b", sleeper("y"))
            return run

        @pytest.mark.connection("x", "y", packet_delay_distribution=DELAY)
        def test_delay_fails(enclave): pass

        @pytest.mark.connection("x", "y", packet_delay_distribution=DELAY, skip_unsupported=True)
        def test_delay_marker_skips(enclave): pass

        @pytest.mark.enclave_skip_unsupported
        @pytest.mark.connection(ConnectionConfig(packet_delay_distribution=DELAY))
        def test_delay_default_skips(enclave): pass

        @pytest.mark.enclave_skip_unsupported
        def test_delay_in_body_skips(enclave):
            enclave.set_delay("x", "y", 50)

        def test_delay_in_body_fails(enclave):
            enclave.set_delay("x", "y", 50)
        """
    )
    result = run(pytester)
    result.assert_outcomes(errors=1, failed=1, skipped=3)
    result.stdout.fnmatch_lines_random(
        [
            "*ERROR at setup of test_delay_fails*",
            "@pytest.mark.connection('x', 'y', packet_delay_distribution="
            "UniformPacketDelayDistribution(50)): packet_delay_distribution (delay 50ms) needs "
            "the sch_netem qdisc*",
            "SKIPPED [[]1[]] test_capability_errors_fail_or_skip_with_the_reason.py:*: "
            "@pytest.mark.connection(*skip_unsupported=True): *needs the sch_netem qdisc*",
            "SKIPPED [[]1[]] test_capability_errors_fail_or_skip_with_the_reason.py:*: "
            "@pytest.mark.connection(ConnectionConfig(packet_delay_distribution="
            "UniformPacketDelayDistribution(50))): *sch_netem*",
            "SKIPPED [[]1[]] test_capability_errors_fail_or_skip_with_the_reason.py:*: "
            "*needs the sch_netem qdisc*",
            "*CapabilityError: packet_delay_distribution (delay 50ms) needs the sch_netem*",
        ]
    )
    skips = [line for line in result.outlines if line.startswith("SKIPPED")]
    assert len(skips) == 3 and not any("plugin.py" in line for line in skips)


# ---------------------------------------------------------------------------------------------
# Topology lifetimes


def test_default_enclave_is_empty_and_removed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from enclave_helpers import http, record, web

        def test_empty(enclave):
            record(enclave)
            assert enclave.services == {}
            enclave.add_service("a", web())
            enclave.add_service("b", web())
            assert http(enclave, "a", "b") == "200"
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_module_topology_is_built_once_and_restored(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_one="""
        import pytest
        from pytest_enclave import BLOCKED
        import enclave_helpers
        from enclave_helpers import builds, http, sleeper, three

        @pytest.fixture(scope="module")
        def enclave_services():
            return three

        seen = {}

        @pytest.mark.subnetwork("other", "client")
        @pytest.mark.connection("main", "other", BLOCKED)
        def test_break_everything(enclave):
            seen["id"] = enclave.id
            assert http(enclave, "client", "web1") == "000"
            enclave.kill("web1")
            enclave.pause("web2")
            enclave.add_service("extra", sleeper())
            enclave.block("web2", "web1")
            assert enclave.status("web1") == "stopped"

        def test_sees_the_topology_again(enclave):
            assert enclave.id == seen["id"] and builds() == 1
            assert sorted(enclave.services) == ["client", "web1", "web2"]
            assert enclave.get_service("client").subnetwork == "main"
            assert enclave.subnetworks == ["main"]
            assert {enclave.status(s) for s in enclave.services} == {"running"}
            assert http(enclave, "client", "web1") == "200"  # restarted, reachable again
            assert http(enclave, "client", "web2") == "200"  # resumed
            assert http(enclave, "web2", "web1") == "200"  # directed block gone

        def test_changes_mid_test(enclave):
            assert enclave.id == seen["id"] and builds() == 1
            with enclave.partition(["web1"]):
                assert http(enclave, "client", "web1") == "000"
                assert http(enclave, "client", "web2") == "200"
            assert http(enclave, "client", "web1") == "200"
            enclave_helpers.SEEN["first module"] = enclave
        """,
        test_two="""
        import pytest
        from enclave_helpers import SEEN, builds, http, three

        @pytest.fixture(scope="module")
        def enclave_services():
            return three

        def test_new_module_new_enclave(enclave):
            first = SEEN["first module"]
            assert first.closed and first is not enclave  # closed when its module ended
            assert builds() == 2
            assert http(enclave, "client", "web1") == "200"
        """,
    )
    run(pytester, "-p", "no:randomly").assert_outcomes(passed=4)


def test_session_and_class_scopes(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest
        from enclave_helpers import three

        @pytest.fixture(scope="session")
        def enclave_services():
            return three
        """
    )
    pytester.makepyfile(
        test_a="""
        from enclave_helpers import SEEN

        def test_a(enclave):
            SEEN["session"] = enclave
            enclave.kill("web1")
        """,
        test_b="""
        import pytest
        from enclave_helpers import SEEN, builds, http, record, web

        class TestOwnTopology:
            @pytest.fixture(scope="class")
            def enclave_services(self):
                def run(enclave):
                    record(enclave)
                    enclave.add_service("solo", web())
                return run

            def test_first(self, enclave):
                SEEN["class"] = enclave
                assert list(enclave.services) == ["solo"]
                enclave.stop("solo")

            def test_second(self, enclave):
                assert enclave is SEEN["class"] and not SEEN["session"].closed
                assert enclave.status("solo") == "running"
                assert http(enclave, "solo", "solo") == "200"

        def test_session_again(enclave):
            assert enclave is SEEN["session"] and SEEN["class"].closed
            assert builds() == 2
            assert http(enclave, "client", "web1") == "200"
        """,
    )
    run(pytester, "-p", "no:randomly").assert_outcomes(passed=4)


def test_topology_errors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_broken="""
        import pytest
        from pytest_enclave import ServiceConfig
        from enclave_helpers import record

        @pytest.fixture(scope="module")
        def enclave_services():
            def run(enclave):
                record(enclave)
                enclave.add_service("db", ServiceConfig(cmd=["no-such-program-xyz"]))
            return run

        def test_first(enclave): pass

        def test_second(enclave): pass
        """,
        test_not_callable="""
        import pytest

        @pytest.fixture
        def enclave_services():
            return 42

        def test_it(enclave): pass
        """,
    )
    result = run(pytester)
    result.assert_outcomes(errors=3)
    text = result.stdout.str()
    assert text.count("executable 'no-such-program-xyz' not found") >= 2
    assert len(_ids(pytester.path / "enclave-ids.txt")) == 1  # built once, error reused
    result.stdout.fnmatch_lines(["enclave_services returned 42: return a callable run(enclave)*"])


def test_failed_restore_builds_the_topology_again(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_enclave import ServiceConfig
        from enclave_helpers import builds, http, record, sleeper

        @pytest.fixture(scope="module")
        def enclave_services(tmp_path_factory):
            flag = tmp_path_factory.mktemp("flag") / "fail-once"
            def run(enclave):
                record(enclave)
                script = f"if [ -e {flag} ]; then rm {flag}; exit 3; fi; "
                script += "exec python3 -m http.server -b {{ip}} 8000"
                config = ServiceConfig(cmd=["sh", "-c", script], ports={"h": 8000})
                enclave.add_service("web", config)
                enclave.add_service("client", sleeper())
            run.flag = flag
            return run

        def test_breaks_restart(enclave, enclave_services):
            enclave_services.flag.touch()
            enclave.kill("web")

        def test_gets_a_new_topology(enclave):
            assert builds() == 2
            assert http(enclave, "client", "web") == "200"
        """
    )
    result = run(pytester, "-p", "no:randomly")
    result.assert_outcomes(passed=2, warnings=1)
    result.stdout.fnmatch_lines(["*PytestWarning: restoring shared enclave pe* failed (*"])


# ---------------------------------------------------------------------------------------------
# Reports and keeping


def test_failure_report_has_an_enclave_section(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_function="""
        import os
        import pytest
        from pytest_enclave import ServiceConfig
        from enclave_helpers import record, sleeper

        @pytest.fixture
        def enclave_services():
            def run(enclave):
                record(enclave)
                talk = ["sh", "-c", "echo hello-from-db; exec sleep 1000"]
                enclave.add_service("db", ServiceConfig(cmd=talk))
                enclave.add_service("app", sleeper("secondary"))
            return run

        def test_passes(enclave):
            pass

        @pytest.mark.connection("default", "secondary", packet_loss_percentage=30)
        def test_fails(enclave):
            with open(os.environ["PE_IDS"] + ".ips", "w") as f:
                f.write(" ".join(s.ip for s in enclave.services.values()))
            enclave.partition(["db"])
            enclave.kill("app")
            assert False, "the application did not survive"
        """,
        test_shared="""
        import pytest
        from enclave_helpers import three

        @pytest.fixture(scope="module")
        def enclave_services():
            return three

        def test_shared_passes(enclave):
            enclave.isolate("web2")

        def test_shared_fails(enclave):
            enclave.kill("web1")
            assert False
        """,
    )
    result = run(pytester, "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=2)
    text = result.stdout.str()
    sections = text.split("- enclave -")
    assert len(sections) == 3  # the two failures only
    report = sections[1].split("____")[0]
    db_ip, app_ip = (pytester.path / "enclave-ids.txt.ips").read_text().split()
    assert re.search(rf"db +{re.escape(db_ip)} +default +running", report), report
    assert re.search(rf"app +{re.escape(app_ip)} +secondary +stopped", report), report
    assert "default <-> secondary: loss 30%" in report
    assert "rule: app | db: blocked" in report or "rule: db | app: blocked" in report
    for event in ("open ", "add_service", "set_connection", "test_function.py::test_fails"):
        assert event in report
    assert re.search(r"partition +db \| app", report) and re.search(r"kill +app", report)
    assert "log of db (last 10 lines):" in report and "hello-from-db" in report
    shared = sections[2].split("\n=")[0]
    assert "kill             web1" in shared and "test_shared.py::test_shared_fails" in shared
    assert "test_shared.py::test_shared_passes" not in shared  # timeline of this test only
    assert "restore" in shared and "shared enclave: timeline since this test began" in shared


def test_keep_failed_leaves_the_enclave_and_says_how_to_get_in(
    pytester: pytest.Pytester, no_leaks: Path
) -> None:
    pytester.makepyfile(
        test_function="""
        import os
        import pytest
        from enclave_helpers import record, sleeper

        @pytest.fixture
        def enclave_services():
            def run(enclave):
                record(enclave)
                enclave.add_service("db", sleeper())
            return run

        def test_passes(enclave):
            pass

        def test_fails(enclave):
            assert False
        """,
        test_shared="""
        import os
        import pytest
        from enclave_helpers import builds, record, sleeper

        @pytest.fixture(scope="module")
        def enclave_services():
            def run(enclave):
                record(enclave)
                enclave.add_service("cache", sleeper())
            return run

        def test_shared_fails(enclave):
            enclave.update_service("cache", __import__("pytest_enclave").UpdateServiceConfig(
                subnetwork="broken"))
            assert False

        def test_after_gets_a_fresh_one(enclave):
            assert builds() == 4 and enclave.get_service("cache").subnetwork == "main"
        """,
    )
    result = run(pytester, "--enclave-keep=failed", "-p", "no:randomly")
    try:
        result.assert_outcomes(passed=2, failed=2)
        ids = _ids(no_leaks)  # in build order: passes, fails, shared_fails, after
        assert len(ids) == 4
        failed, shared, fresh = ids[1:]
        result.stdout.fnmatch_lines(
            [
                "*= kept enclaves =*",
                f"enclave {failed} of test_function.py::test_fails was kept:",
                f"  db * (or: ip netns exec {failed}-db sh)",
                "  logs: /tmp/pytest-enclave-*",
                f"  remove it: python -m pytest_enclave clean {failed}",
                f"enclave {shared} of test_shared.py::test_shared_fails was kept:",
                f"  cache * (or: ip netns exec {shared}-cache sh)",
            ]
        )
        assert {i for i in ids if _kept_marker(i).exists()} == {failed, shared}
        assert result.stdout.str().count(" was kept:") == 2
        assert _leftovers([fresh]) == []  # test_after_gets_a_fresh_one passed: removed
        for enclave_id, service in ((failed, "db"), (shared, "cache")):
            assert f"{enclave_id}-{service}" in _leftovers([enclave_id])
            inside = subprocess.run(
                ["ip", "netns", "exec", f"{enclave_id}-{service}", "ip", "-br", "addr"],
                capture_output=True,
                text=True,
                check=True,
            )
            assert "198." in inside.stdout  # the hint works: the service's own address
    finally:
        for enclave_id in _ids(no_leaks):
            if _kept_marker(enclave_id).exists():
                _remove_kept(enclave_id)


def test_keep_all_from_the_ini_file(pytester: pytest.Pytester, no_leaks: Path) -> None:
    pytester.makeini("[pytest]\nenclave_keep = all\n")
    pytester.makepyfile(
        """
        import pytest
        from enclave_helpers import record, sleeper

        @pytest.fixture(scope="module")
        def enclave_services():
            def run(enclave):
                record(enclave)
                enclave.add_service("db", sleeper())
            return run

        def test_one(enclave): pass

        def test_two(enclave): pass
        """
    )
    result = run(pytester)
    try:
        result.assert_outcomes(passed=2)
        (enclave_id,) = _ids(no_leaks)
        result.stdout.fnmatch_lines(
            ["enclave: backend=netns, keep=all", f"enclave {enclave_id} of the module-scoped *"]
        )
        assert _kept_marker(enclave_id).exists()
    finally:
        for enclave_id in _ids(no_leaks):
            if _kept_marker(enclave_id).exists():
                _remove_kept(enclave_id)


# ---------------------------------------------------------------------------------------------
# Processes: xdist workers, Ctrl-C

XDIST_SUITE = """
import os
import tempfile
import pytest
from enclave_helpers import record, sleeper, web

def topology(enclave):
    record(enclave)
    root = tempfile.mkdtemp(dir=os.path.dirname(os.environ["PE_IDS"]))
    with open(os.path.join(root, "index.html"), "w") as f:
        f.write(enclave.id)
    cmd = ["python3", "-m", "http.server", "-b", "{{ip}}", "-d", root, "8000"]
    enclave.add_service("db", __import__("pytest_enclave").ServiceConfig(
        cmd=cmd, ports={"http": 8000}))
    enclave.add_service("app", sleeper())

@pytest.fixture(scope=SCOPE)
def enclave_services():
    return topology

@pytest.mark.parametrize("n", range(4))
def test_talks_to_its_own_db(enclave, n):
    assert os.environ["PYTEST_XDIST_WORKER"].startswith("gw")
    got = enclave.exec("app", ["curl", "-s", "-m", "5", "http://db:8000/index.html"])
    assert got.stdout == enclave.id, got  # db of this enclave, not of another worker's
    if n % 2:
        enclave.partition(["db"])
"""


def test_xdist_workers_with_identical_service_names(
    pytester: pytest.Pytester, no_leaks: Path
) -> None:
    pytester.makepyfile(
        test_function=XDIST_SUITE.replace("SCOPE", '"function"'),
        test_module=XDIST_SUITE.replace("SCOPE", '"module"'),
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "4")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["*4 workers [[]8 items[]]*"])
    ids = _ids(no_leaks)
    assert len(ids) >= 5 and len(set(ids)) >= 4  # 4 function ones alive at once at most
    assert _leftovers(ids) == []


def test_xdist_kept_enclave_hints_reach_the_controller(
    pytester: pytest.Pytester, no_leaks: Path
) -> None:
    pytester.makepyfile(
        """
        import pytest
        from enclave_helpers import record, sleeper

        @pytest.fixture
        def enclave_services():
            def run(enclave):
                record(enclave)
                enclave.add_service("db", sleeper())
            return run

        @pytest.mark.parametrize("fail", [False, True])
        def test_maybe(enclave, fail):
            assert not fail
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", "--enclave-keep=failed"
    )
    try:
        result.assert_outcomes(passed=1, failed=1)
        kept = [i for i in set(_ids(no_leaks)) if _kept_marker(i).exists()]
        assert len(kept) == 1
        result.stdout.fnmatch_lines(
            [
                "*= kept enclaves =*",
                f"enclave {kept[0]} of test_xdist_kept_enclave_hints_reach_the_controller.py"
                "::test_maybe[[]True[]] was kept:",
                f"  db * (or: ip netns exec {kept[0]}-db sh)",
                f"  remove it: python -m pytest_enclave clean {kept[0]}",
            ]
        )
    finally:
        for enclave_id in set(_ids(no_leaks)):
            if _kept_marker(enclave_id).exists():
                _remove_kept(enclave_id)


def test_ctrl_c_still_removes_every_enclave(pytester: pytest.Pytester, no_leaks: Path) -> None:
    pytester.makepyfile(
        """
        import os
        import signal
        import time
        import pytest
        from enclave_helpers import record, sleeper, three

        @pytest.fixture(scope="module")
        def enclave_services():
            return three

        @pytest.fixture
        def second(enclave):
            with __import__("pytest_enclave").Enclave() as extra:
                record(extra)
                extra.add_service("x", sleeper())
                yield extra

        def test_interrupted(enclave, second):
            assert os.path.exists(f"/run/netns/{enclave.id}-web1")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)

        def test_never_runs(enclave):
            pass
        """
    )
    pytester.makeconftest(
        """
        import os
        import pytest
        from pytest_enclave import enclave

        @pytest.hookimpl(trylast=True)
        def pytest_unconfigure(config):  # before the library's own atexit safety net
            with open(os.environ["PE_IDS"] + ".open", "w") as f:
                f.write(repr(list(enclave._open_enclaves)))
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*KeyboardInterrupt*"])
    assert (pytester.path / "enclave-ids.txt.open").read_text() == "[]"
    assert len(_ids(no_leaks)) == 2
    assert _leftovers(_ids(no_leaks)) == []


def test_enclave_requires_skips_with_the_reason_before_building(pytester: pytest.Pytester) -> None:
    from pytest_enclave.caps import missing

    pytester.makepyfile(
        test_requires="""
        import pytest

        @pytest.mark.enclave_requires("netem")
        def test_needs_netem(enclave):
            pass

        @pytest.mark.enclave_requires("teleport")
        def test_unknown():
            pass
        """
    )
    result = run(pytester)
    netem = missing("netem")
    if netem is None:  # a kernel with netem: the test runs
        result.assert_outcomes(passed=1, errors=1)
    else:
        result.assert_outcomes(skipped=1, errors=1)
        result.stdout.fnmatch_lines(
            ["SKIPPED [[]1[]] test_requires.py:*: needs netem: *sch_netem*"]
        )
    result.stdout.fnmatch_lines(
        ["*enclave_requires('teleport'): capability 'teleport' is not known: use one of netem, *"]
    )
    assert "Traceback" not in result.stdout.str()
