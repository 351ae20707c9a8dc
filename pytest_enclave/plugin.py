"""The pytest plugin: the ``enclave`` fixture, fault markers, options and failure reports.

Loaded through the ``pytest11`` entry point, so installing the package is enough. Settings flow
one way: command line / ini -> :meth:`EnclaveOptions.from_config` -> ``config.stash`` ->
fixtures. Markers are parsed by one function, :func:`evaluate_marks`, into frozen dataclasses,
then applied to the enclave: subnetwork markers first, then connection markers, each from the
farthest (module) to the closest (the decorator right above ``def``), so the closest wins.

The topology's lifetime is the scope of the user's ``enclave_services`` fixture: function scope
builds a fresh enclave for every test; a wider scope builds it once, takes a checkpoint, and
restores that checkpoint (subnetworks, connections, killed/paused/removed/added services)
before every later test. Only this module of the package imports pytest.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import pytest

from .enclave import Checkpoint, Enclave
from .errors import CapabilityError, EnclaveError
from .marks import (
    ConnectionMark,
    EnclaveMarks,
    MarkerError,
    SubnetworkMark,
    UnsupportedMarkError,
    apply_marks,
    connection_mark,
    subnetwork_mark,
)

__all__ = [
    "ConnectionMark",
    "EnclaveMarks",
    "EnclaveOptions",
    "MarkerError",
    "SubnetworkMark",
    "apply_marks",
    "evaluate_marks",
]

KeepPolicy = Literal["none", "failed", "all"]
BACKENDS = ("netns", "docker")
KEEP_POLICIES = ("none", "failed", "all")
CLEAN_COMMAND = "python -m pytest_enclave clean"
Topology = Callable[[Enclave], object]

# ---------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class EnclaveOptions:
    """The plugin's settings: the command line wins over the ini file."""

    backend: str = "netns"
    keep: KeepPolicy = "none"
    log_lines: int = 10

    @classmethod
    def from_config(cls, config: pytest.Config) -> EnclaveOptions:
        backend = config.getoption("enclave_backend") or config.getini("enclave_backend")
        keep = config.getoption("enclave_keep") or config.getini("enclave_keep")
        lines = config.getini("enclave_log_lines")
        if backend not in BACKENDS:
            raise pytest.UsageError(
                f"enclave_backend={backend!r} is not allowed: use {' or '.join(BACKENDS)}"
            )
        if keep not in KEEP_POLICIES:
            raise pytest.UsageError(
                f"enclave_keep={keep!r} is not allowed: use {', '.join(KEEP_POLICIES)}"
            )
        try:
            log_lines = int(lines)
            if log_lines < 0:
                raise ValueError(lines)
        except ValueError:
            raise pytest.UsageError(
                f"enclave_log_lines={lines!r} is not allowed: give a number of lines >= 0"
            ) from None
        return cls(backend=backend, keep=cast(KeepPolicy, keep), log_lines=log_lines)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("enclave", "pytest-enclave (isolated networks of services)")
    group.addoption(
        "--enclave-backend",
        dest="enclave_backend",
        choices=BACKENDS,
        default=None,
        help="where services run: netns (processes in network namespaces, default) or docker",
    )
    group.addoption(
        "--enclave-keep",
        dest="enclave_keep",
        choices=KEEP_POLICIES,
        default=None,
        help="leave enclaves for inspection: none (default), those of failed tests, or all; "
        f"remove kept ones with `{CLEAN_COMMAND}`",
    )
    parser.addini("enclave_backend", "default for --enclave-backend", default="netns")
    parser.addini("enclave_keep", "default for --enclave-keep", default="none")
    parser.addini(
        "enclave_log_lines", "log lines per service in a failure's enclave section", default="10"
    )


_MARKERS = (
    "subnetwork(name, *services): before the test, move these services of the enclave "
    "fixture to subnetwork `name` (several markers allowed). "
    'Example: @pytest.mark.subnetwork("secondary", "db2", "app2")',
    "connection(a, b, config=None, *, skip_unsupported=False, **fields): before the test, set "
    "the connection between subnetworks a and b, or the default connection when no pair is "
    "given; config is a ConnectionConfig, BLOCKED or ALLOWED, fields are its (Kurtosis) names. "
    "skip_unsupported=True skips instead of failing when this machine cannot do it. "
    'Examples: @pytest.mark.connection("main", "secondary", packet_loss_percentage=90.0), '
    '@pytest.mark.connection("main", "secondary", BLOCKED), @pytest.mark.connection(BLOCKED)',
    "enclave_skip_unsupported: skip the test, with the reason, when the enclave raises "
    "CapabilityError (e.g. delay on a kernel without netem) in setup or in the test. "
    "Example: @pytest.mark.enclave_skip_unsupported",
    "enclave_requires(*capabilities): skip the test, with the reason and the fix, unless this "
    "machine has them all: netem, docker, reject, uml (probed once per run, before any "
    'enclave is built). Example: @pytest.mark.enclave_requires("netem")',
)


def pytest_configure(config: pytest.Config) -> None:
    for line in _MARKERS:
        config.addinivalue_line("markers", line)
    state = _State(EnclaveOptions.from_config(config))
    config.stash[_STATE] = state
    config.pluginmanager.register(state, "enclave-state")


def pytest_report_header(config: pytest.Config) -> str:
    options = config.stash[_STATE].options
    return f"enclave: backend={options.backend}, keep={options.keep}"


# ---------------------------------------------------------------------------------------------
# Markers (parsed and applied by .marks)


def evaluate_marks(item: pytest.Item) -> EnclaveMarks:
    """Parse the enclave markers of ``item``; raise MarkerError for a malformed one."""
    return EnclaveMarks(
        subnetworks=tuple(subnetwork_mark(m) for m in _farthest_first(item, "subnetwork")),
        connections=tuple(connection_mark(m) for m in _farthest_first(item, "connection")),
        skip_unsupported=item.get_closest_marker("enclave_skip_unsupported") is not None,
    )


def _farthest_first(item: pytest.Item, name: str) -> list[pytest.Mark]:
    return list(reversed(list(item.iter_markers(name))))


def _failure(message: str) -> BaseException:
    """The exception that fails a test with ``message`` alone (raise it ``from None``)."""
    return pytest.fail.Exception(message, pytrace=False)


def _skip(reason: str) -> BaseException:
    # _use_item_location: report the test's location, not this file's, as skipping.py does.
    return pytest.skip.Exception(reason, _use_item_location=True)


# ---------------------------------------------------------------------------------------------
# State kept per pytest run


@dataclass(eq=False)
class _Shared:
    """The enclave of one ``enclave_services`` fixture whose scope is wider than function."""

    run: Topology
    label: str  # e.g. "the module-scoped topology of tests/test_db.py", for kept-enclave notes
    owners: int = 1  # fixture instances that returned this very callable
    enclave: Enclave | None = None
    checkpoint: Checkpoint | None = None
    error: BaseException | None = None  # building failed: later tests get the same error

    def acquire(self, state: _State, item: pytest.Item) -> tuple[Enclave, int]:
        """The shared enclave, built or restored; and where this test's timeline starts."""
        if self.error is not None:
            raise self.error
        enclave = self.enclave
        if enclave is not None and not enclave.closed and self.checkpoint is not None:
            start = len(enclave.timeline)
            try:
                enclave.restore(self.checkpoint)
                return enclave, start
            except EnclaveError as exc:
                warnings.warn(
                    pytest.PytestWarning(
                        f"restoring shared enclave {enclave.id} failed ({exc}); "
                        "building the topology again"
                    ),
                    stacklevel=1,
                )
                self.drop(state, keep=False, why="")
        enclave = state.open_enclave()
        try:
            self.run(enclave)
        except BaseException as exc:
            item.stash[_DESCRIPTION] = _describe(enclave, state.options.log_lines)
            state.close(enclave, keep=False, why="")
            if isinstance(exc, Exception):
                self.error = exc
            raise
        self.enclave, self.checkpoint = enclave, enclave.checkpoint()
        return enclave, 0

    def drop(self, state: _State, keep: bool, why: str) -> None:
        """Close the enclave (or keep it); the next test builds the topology again."""
        enclave, self.enclave = self.enclave, None
        if enclave is not None:
            state.close(enclave, keep, why)

    def release(self, state: _State) -> None:
        """The fixture's scope ended: close the enclave once no fixture instance uses it."""
        self.owners -= 1
        if self.owners == 0:
            if state.shared.get(id(self.run)) is self:
                del state.shared[id(self.run)]
            self.drop(state, state.options.keep == "all", self.label)


@dataclass(eq=False)
class _State:
    """Everything the plugin tracks in one pytest process (``config.stash[_STATE]``)."""

    options: EnclaveOptions
    open: dict[int, Enclave] = field(default_factory=dict)
    shared: dict[int, _Shared] = field(default_factory=dict)  # id(run callable) -> _Shared
    notes: list[str] = field(default_factory=list)  # kept-enclave hints not yet in a report
    kept: list[str] = field(default_factory=list)  # kept-enclave hints, for the summary

    def open_enclave(self) -> Enclave:
        backend = self.options.backend
        try:
            enclave = Enclave(backend=backend)
        except ImportError as exc:
            raise _failure(f"the {backend} backend is not available here: {exc}") from None
        except EnclaveError as exc:
            raise _failure(f"could not create an enclave ({backend} backend): {exc}") from None
        self.open[id(enclave)] = enclave
        return enclave

    def close(self, enclave: Enclave, keep: bool, why: str) -> None:
        self.open.pop(id(enclave), None)
        if enclave.closed:
            return
        if not keep:
            enclave.close()
            return
        note = _keep_note(enclave, why)
        enclave.close(keep=True)
        self.notes.append(note)

    def close_all(self) -> None:
        for enclave in list(self.open.values()):
            with suppress(EnclaveError, OSError):
                self.close(enclave, keep=False, why="")

    # Hooks of this object (registered as a plugin by pytest_configure): they need the state
    # but get no config; under xdist they run in the controller, on the workers' reports.

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "teardown":
            self.kept += [text for title, text in report.sections if title == "enclave kept"]

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        texts = self.kept + self.notes  # notes: kept after the last report (session end)
        if texts:
            terminalreporter.section("kept enclaves")
            for text in texts:
                terminalreporter.write_line(text)


_STATE = pytest.StashKey[_State]()
_ENCLAVE = pytest.StashKey[Enclave]()
_TIMELINE_START = pytest.StashKey[int]()
_DESCRIPTION = pytest.StashKey[str]()  # the enclave as it was when its setup failed
_REPORTS = pytest.StashKey["dict[str, pytest.TestReport]"]()


def _keep_note(enclave: Enclave, why: str) -> str:
    lines = [f"enclave {enclave.id} of {why} was kept:"]
    for name in enclave.services:
        try:
            hint = enclave.backend.inspect_hint(name)
        except Exception as exc:  # a backend without hints must not break teardown
            hint = f"(no hint: {exc})"
        lines.append(f"  {name:<24} {hint}")
    lines.append(f"  logs: {enclave.run_dir}")
    lines.append(f"  remove it: {CLEAN_COMMAND} {enclave.id}")
    return "\n".join(lines)


def _describe(enclave: Enclave, log_lines: int, since: int = 0) -> str:
    """``enclave.describe()``, with the timeline from event ``since`` on (shared enclaves)."""
    try:
        text = enclave.describe(log_lines, since=since)
        if not since:
            return text
        return f"{text}\n(shared enclave: timeline since this test began; {since} events before)"
    except Exception as exc:  # a report must never hide the test's own failure
        return f"(could not describe enclave {getattr(enclave, 'id', '?')}: {exc!r})"


def _failed(item: pytest.Item) -> bool:
    reports = item.stash.get(_REPORTS, {})
    return any(r.failed for when, r in reports.items() if when in ("setup", "call"))


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def enclave_services() -> Topology | None:
    """The topology: override this fixture to return ``run(enclave)``, which adds services.

    Its scope is the topology's lifetime: function (this default) builds it for every test;
    class, module, package or session builds it once and restores it before each later test
    (subnetworks, connections, killed, paused, added and removed services). Returning None
    gives an empty enclave.
    """
    return None


@pytest.fixture
def enclave(request: pytest.FixtureRequest, enclave_services: object) -> Iterator[Enclave]:
    """An enclave built by ``enclave_services``, with the test's markers already applied.

    Removed after the test whatever happened (unless ``--enclave-keep`` says to keep it).
    """
    state = request.config.stash[_STATE]
    item = cast(pytest.Item, request.node)
    if enclave_services is not None and not callable(enclave_services):
        pytest.fail(
            f"enclave_services returned {enclave_services!r}: return a callable run(enclave) "
            "that adds the services, or None for an empty enclave",
            pytrace=False,
        )
    try:
        marks = evaluate_marks(item)
    except MarkerError as exc:
        raise _failure(str(exc)) from None
    shared = state.shared.get(id(enclave_services)) if enclave_services is not None else None
    try:
        if shared is None:
            run = cast("Topology | None", enclave_services)
            yield from _own_enclave(state, item, run, marks)
        else:
            yield from _shared_enclave(state, item, shared, marks)
    except CapabilityError as exc:
        if not marks.skip_unsupported:
            raise
        raise _skip(str(exc)) from exc


def _own_enclave(
    state: _State, item: pytest.Item, run: Topology | None, marks: EnclaveMarks
) -> Iterator[Enclave]:
    enclave = state.open_enclave()
    try:
        if run is not None:
            run(enclave)
        _prepare(item, enclave, marks, 0)
    except BaseException:
        item.stash[_DESCRIPTION] = _describe(enclave, state.options.log_lines)
        state.close(enclave, keep=False, why="")
        raise
    try:
        yield enclave
    finally:
        keep = state.options.keep == "all" or (state.options.keep == "failed" and _failed(item))
        state.close(enclave, keep, item.nodeid)


def _shared_enclave(
    state: _State, item: pytest.Item, shared: _Shared, marks: EnclaveMarks
) -> Iterator[Enclave]:
    enclave, start = shared.acquire(state, item)
    _prepare(item, enclave, marks, start)  # on error the next test restores the checkpoint
    try:
        yield enclave
    finally:
        if state.options.keep != "none" and _failed(item):  # keep it as the failure left it
            shared.drop(state, keep=True, why=item.nodeid)


def _prepare(item: pytest.Item, enclave: Enclave, marks: EnclaveMarks, start: int) -> None:
    item.stash[_ENCLAVE] = enclave
    item.stash[_TIMELINE_START] = start
    try:
        apply_marks(enclave, marks)
    except UnsupportedMarkError as exc:
        raise _skip(str(exc)) from exc
    except MarkerError as exc:
        raise _failure(str(exc)) from None
    enclave.timeline.record("test", item.nodeid)


# ---------------------------------------------------------------------------------------------
# Hooks


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, object, object]:
    """Note the scope of ``enclave_services``: a wider one than function shares the enclave."""
    result = yield
    wide = fixturedef.argname == "enclave_services" and fixturedef.scope != "function"
    if wide and callable(result):
        state = request.config.stash[_STATE]
        shared = state.shared.get(id(result))
        if shared is None:
            where = request.node.nodeid or "the session"  # the node of the fixture's scope
            label = f"the {fixturedef.scope}-scoped topology of {where}"
            shared = state.shared[id(result)] = _Shared(result, label)
        else:
            shared.owners += 1
        fixturedef.addfinalizer(lambda: shared.release(state))
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """``enclave_requires``: skip before any fixture runs when a capability is missing."""
    from .caps import missing

    for mark in item.iter_markers("enclave_requires"):
        for capability in mark.args:
            try:
                reason = missing(str(capability))
            except ValueError as exc:
                raise _failure(f"@pytest.mark.enclave_requires({capability!r}): {exc}") from None
            if reason is not None:
                raise _skip(f"needs {capability}: {reason}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """With ``enclave_skip_unsupported``, a CapabilityError in the test skips it."""
    try:
        return (yield)
    except CapabilityError as exc:
        if item.get_closest_marker("enclave_skip_unsupported") is None:
            raise
        raise _skip(str(exc)) from exc


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Add the "enclave" section to failures; carry kept-enclave hints in teardown reports."""
    report = yield
    state = item.config.stash[_STATE]
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    if report.failed and report.when in ("setup", "call"):
        text = item.stash.get(_DESCRIPTION, None)
        enclave = item.stash.get(_ENCLAVE, None)
        if text is None and enclave is not None and not enclave.closed:
            since = item.stash.get(_TIMELINE_START, 0)
            text = _describe(enclave, state.options.log_lines, since)
        if text:
            report.sections.append(("enclave", text))
    if report.when == "teardown" and state.notes:
        report.sections.append(("enclave kept", "\n\n".join(state.notes)))
        state.notes.clear()
    return report


@pytest.hookimpl(trylast=True)  # after runner.py has torn down the remaining fixtures
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Close every enclave still open (an interrupted run, a fixture torn down out of order)."""
    session.config.stash[_STATE].close_all()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _STATE in config.stash:
        config.stash[_STATE].close_all()
