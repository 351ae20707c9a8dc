"""Linux primitives: namespaces via ctypes, thread-confined namespace switches, slot locks.

A network namespace is entered by one short-lived thread only (``setns`` affects the calling
thread), never by the whole process. Sockets keep the namespace they were created in, so a
netlink socket made in such a thread serves that namespace from any thread afterwards.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import suppress
from typing import TypeVar

from .errors import BackendError, PermissionDeniedError

T = TypeVar("T")

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
NETNS_DIR = "/run/netns"
STATE_DIR = "/run/pytest-enclave"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            None,
        ),
        f"mount {source} on {target}",
    )


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread (so namespace switches inside it stay there)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="pytest-enclave-ns")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]  # it is a BaseException, set above
    return box["value"]  # type: ignore[return-value]  # set above when no error


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def create_netns(name: str) -> str:
    """Create a named network namespace (like ``ip netns add``) without forking."""
    os.makedirs(NETNS_DIR, exist_ok=True)
    path = netns_path(name)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
    os.close(fd)

    def make() -> None:
        unshare(CLONE_NEWNET)
        mount("/proc/thread-self/ns/net", path, None, MS_BIND)
        # Enclaves are IPv4 only: no link-local IPv6 chatter that would bypass the filter.
        for knob in ("all", "default"):
            with suppress(OSError), open(f"/proc/sys/net/ipv6/conf/{knob}/disable_ipv6", "w") as f:
                f.write("1")

    try:
        in_thread(make)
    except OSError as exc:
        with suppress(OSError):
            os.unlink(path)
        raise BackendError(f"could not create network namespace {name}: {exc}") from exc
    return path


def delete_netns(name: str) -> None:
    """Remove a named network namespace (the kernel frees it once nothing uses it)."""
    path = netns_path(name)
    with suppress(OSError):
        _libc.umount2(path.encode(), MNT_DETACH)
    with suppress(FileNotFoundError):
        os.unlink(path)


def list_netns(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def netlink_socket_in(path: str, proto: int = 0) -> int:
    """A netlink socket (file descriptor) created inside the namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY)

    def make() -> int:
        setns(fd, CLONE_NEWNET)
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, proto).detach()

    try:
        return in_thread(make)
    finally:
        os.close(fd)


def netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in_netns(inodes: set[int]) -> list[int]:
    """Every process whose network namespace is one of ``inodes`` (daemonized ones too)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with suppress(OSError):
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino in inodes:
                found.append(int(entry.name))
    return found


def require_privileges() -> None:
    """Raise PermissionDeniedError unless we may create namespaces and configure networks."""
    caps = 0
    with suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
    if not (caps >> 12) & 1 or not (caps >> 21) & 1:  # CAP_NET_ADMIN, CAP_SYS_ADMIN
        raise PermissionDeniedError(
            "pytest-enclave needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network "
            "namespaces and nftables rules: run the tests as root, e.g. `sudo -E pytest`"
        )


class Slot:
    """An exclusive claim on one enclave number (0..511), held by an flock until released.

    The number picks the enclave's resource names (``pe<N>-...``) and its /24 in
    198.18.0.0/15 (RFC 2544's benchmarking range, which no real network should use), so
    enclaves in other threads, xdist workers or pytest runs never collide. A lock that is free
    but whose resources remain means a run was killed: the new owner reaps them first.
    """

    COUNT = 512

    def __init__(self, number: int, fd: int) -> None:
        self.number = number
        self._fd = fd

    @property
    def prefix(self) -> str:
        return f"pe{self.number}-"

    def subnet(self) -> tuple[str, int]:
        """The slot's IPv4 network as (base address of the /24, prefix length)."""
        n = self.number
        return f"198.{18 + n // 256}.{n % 256}.0", 24

    def address(self, host: int) -> str:
        n = self.number
        return f"198.{18 + n // 256}.{n % 256}.{host}"

    def keep_marker(self) -> str:
        return os.path.join(STATE_DIR, f"slot-{self.number}.kept")

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @classmethod
    def acquire(cls, start: int | None = None) -> Slot:
        os.makedirs(STATE_DIR, exist_ok=True)
        first = os.getpid() % cls.COUNT if start is None else start
        for number in _rotated(first, cls.COUNT):
            if os.path.exists(os.path.join(STATE_DIR, f"slot-{number}.kept")):
                continue
            fd = os.open(os.path.join(STATE_DIR, f"slot-{number}.lock"), os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                raise
            remove_run_dirs(number)  # of a killed run: nobody else can hold this slot now
            return cls(number, fd)
        raise BackendError(
            f"all {cls.COUNT} enclave slots are in use or kept: close enclaves, or remove kept "
            "ones with `python -m pytest_enclave clean`"
        )


def run_dir_prefix(number: int) -> str:
    return f"pytest-enclave-pe{number}-"


def remove_run_dirs(number: int) -> list[str]:
    """Remove the run directories (logs, hosts file) that enclaves of slot ``number`` left.

    Only call it while holding the slot's lock (or for a slot kept for inspection that is
    being cleaned): a live enclave's directory would go too.
    """
    import glob
    import shutil
    import tempfile

    found = glob.glob(os.path.join(tempfile.gettempdir(), run_dir_prefix(number) + "*"))
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def _rotated(first: int, count: int) -> Iterator[int]:
    for i in range(count):
        yield (first + i) % count


class NamespaceWorker:
    """One long-lived thread inside a network namespace; ``call`` runs functions there.

    Used for libnftables, whose context talks to the namespace of the thread using it.
    ``path=None`` stays in the caller's namespace. A daemon thread of our own (not a
    ThreadPoolExecutor, which refuses work once the interpreter starts exiting), so
    enclaves closed from an atexit hook can still clean up.
    """

    def __init__(self, path: str | None) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Future[object]] | None] = (
            queue.SimpleQueue()
        )
        fd = os.open(path, os.O_RDONLY) if path else -1
        ready: Future[object] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(fd, ready), name="pytest-enclave-ns", daemon=True
        )
        self._thread.start()
        try:
            ready.result()
        finally:
            if fd >= 0:
                os.close(fd)

    def _run(self, fd: int, ready: Future[object]) -> None:
        try:
            if fd >= 0:
                setns(fd, CLONE_NEWNET)
        except OSError as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while (job := self._jobs.get()) is not None:
            fn, result = job
            try:
                result.set_result(fn())
            except BaseException as exc:  # handed to the caller
                result.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        if not self._thread.is_alive():
            raise BackendError("the namespace worker has stopped (its enclave is closed)")
        result: Future[object] = Future()
        self._jobs.put((fn, result))
        return result.result()  # type: ignore[return-value]  # fn's own result

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
