"""Run a command inside a User-mode Linux (UML) kernel over the host filesystem.

Some CI hosts run kernels without ``sch_netem`` (or without module loading at all).
Debian's ``user-mode-linux`` package ships a 6.1 kernel, built as an ordinary host
program (``/usr/bin/linux``), together with its modules (``/usr/lib/uml/modules``),
including netem, HTB, veth, bridge and nftables.  :func:`run_in_uml` boots that
kernel with the host's ``/`` as a read-only ``hostfs`` root, runs one command in it
and returns the command's exit status, so that network-partition tests can really
exercise netem on such hosts.

Layout inside the guest:

* ``/`` is the host root, read-only (``hostfs``); ``/proc``, ``/sys``, ``/dev``
  (devtmpfs, plus ``/dev/pts`` and a tmpfs ``/dev/shm``) are mounted as usual;
* ``/run`` is a fresh tmpfs (so ``ip netns add`` can create ``/run/netns``);
* ``/tmp`` and ``/var/tmp`` are overlays: host files are visible, writes go to
  guest memory and are discarded (plain tmpfs if overlayfs is unusable);
* ``/lib/modules/<release>`` holds the UML modules, and ``/proc/sys/kernel/modprobe``
  points at a working ``modprobe`` (BusyBox's if the host has no kmod), so both
  explicit ``modprobe`` and on-demand loading by ``tc``/``nft`` work;
* ``lo`` is up; there is no other network device.

The command's stdout and stderr are relayed to the host's ``sys.stdout`` and
``sys.stderr`` while it runs (it sees pipes, not a terminal); kernel messages and
UML's own start-up chatter are kept out of them and shown only on failure or with
``verbose=True``.

Host quirk handled here: UML 6.1 transfers only 832 bytes of XSAVE state with
``PTRACE_SETREGSET``, but host kernels insist on their full XSAVE size, so on CPUs
with AVX-512, PKU or AMX every guest process dies at once
("userspace - ptrace set fp regs failed, errno = 14").  Each run therefore builds a
tiny ``LD_PRELOAD`` shim (needs a C compiler, ``cc``) that pads those requests with
the traced process's current extended state.

Command line::

    python -m pytest_enclave.uml [--memory 1G] [--timeout 1800] -- CMD ARGS...
"""

from __future__ import annotations

import argparse
import codecs
import collections
import errno
import os
import platform
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, BinaryIO, TextIO

__all__ = [
    "DEFAULT_MODULES",
    "EXIT_NO_STATUS",
    "EXIT_TIMEOUT",
    "UML_BINARY",
    "UML_MODULES_ROOT",
    "run_in_uml",
    "uml_available",
    "uml_kernel_release",
]

UML_BINARY = "/usr/bin/linux"
"""The UML kernel executable (Debian package ``user-mode-linux``)."""

UML_MODULES_ROOT = "/usr/lib/uml/modules"
"""Directory holding one ``<release>/`` module tree per installed UML kernel."""

DEFAULT_MODULES: tuple[str, ...] = (
    "overlay",
    "sch_netem",
    "sch_htb",
    "sch_tbf",
    "sch_prio",
    "sch_ingress",
    "cls_u32",
    "cls_matchall",
    "act_mirred",
    "ifb",
    "veth",
    "bridge",
    "nf_tables",
    "nft_numgen",
    "nft_hash",
)
"""Modules loaded before the command runs (names missing from the UML tree are skipped)."""

EXIT_TIMEOUT = 124
"""Returned by :func:`run_in_uml` when the guest was killed after ``timeout`` seconds."""

EXIT_NO_STATUS = 125
"""Returned by :func:`run_in_uml` when the guest stopped without reporting a status."""

_GUEST_DIR = "/run/enclave"  # tmpfs inside the guest
_GUEST_IO = _GUEST_DIR + "/io"  # hostfs mount of the per-run host directory
_DIAG_LIMIT = 64 * 1024  # bytes of console output kept for error messages
_DRAIN_SECONDS = 5.0  # how long to wait for the output pipes after UML exits
_MSG_PREFIX = "pytest-enclave uml: "
_STACK_LINE = re.compile(r"\[<[0-9a-f]+>\]|^(\[[ \d.]+\])?\s+([0-9a-f]{8}\s*){2,}$")

# The XSAVE fix-up described in the module docstring.  UML (6.1) keeps 832 bytes of
# FPU state per thread and passes exactly that to PTRACE_SETREGSET(NT_X86_XSTATE);
# the host rejects any size other than its own with EFAULT.  The shim reads the
# tracee's complete current state, overlays UML's bytes, keeps the tracee's own
# values for components beyond them and writes the full-size buffer.
_SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#define ENCLAVE_NT_X86_XSTATE 0x202
#define ENCLAVE_XSTATE_HEADER 512

typedef long (*ptrace_fn)(int, pid_t, void *, void *);
static unsigned char full_state[1 << 16] __attribute__((aligned(64)));

/* XSAVE components stored entirely within the first len bytes (standard format). */
static uint64_t components_within(size_t len)
{
    uint64_t mask = 3; /* x87 and SSE live in the 512-byte legacy area */
    for (unsigned int i = 2; i < 63; i++) {
        unsigned int size, offset, ecx, edx;
        if (!__get_cpuid_count(0xd, i, &size, &offset, &ecx, &edx) || size == 0)
            continue;
        if ((size_t)offset + size <= len)
            mask |= 1ULL << i;
    }
    return mask;
}

long ptrace(enum __ptrace_request request, ...)
{
    static ptrace_fn real_ptrace;
    va_list ap;
    va_start(ap, request);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);
    if (!real_ptrace)
        real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    if (request == PTRACE_SETREGSET && (uintptr_t)addr == ENCLAVE_NT_X86_XSTATE && data) {
        struct iovec *iov = data;
        struct iovec full = {full_state, sizeof full_state};
        if (iov->iov_len >= ENCLAVE_XSTATE_HEADER + 64
            && real_ptrace(PTRACE_GETREGSET, pid, addr, &full) == 0
            && full.iov_len > iov->iov_len) {
            static size_t own_len;
            static uint64_t own;
            uint64_t current, wanted;
            if (own_len != iov->iov_len) { /* CPUID is slow under a hypervisor: cache */
                own = components_within(iov->iov_len);
                own_len = iov->iov_len;
            }
            memcpy(&current, full_state + ENCLAVE_XSTATE_HEADER, 8);
            memcpy(full_state, iov->iov_base, iov->iov_len);
            memcpy(&wanted, full_state + ENCLAVE_XSTATE_HEADER, 8);
            wanted = (wanted & own) | (current & ~own);
            memcpy(full_state + ENCLAVE_XSTATE_HEADER, &wanted, 8);
            return real_ptrace(PTRACE_SETREGSET, pid, addr, &full);
        }
    }
    return real_ptrace(request, pid, addr, data);
}
"""

# CPU flags implying an XSAVE area larger than UML 6.1's 832 bytes (see above).
_LARGE_XSAVE_FLAGS = frozenset({"avx512f", "ospke", "pku", "amx_tile", "mpx"})

_INIT_TEMPLATE = r"""#!/bin/sh
# Guest init (PID 1) generated by pytest_enclave.uml; not meant to be run by hand.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:@GUEST_IO@/bin
export PATH
R=@GUEST_DIR@
IO=@GUEST_IO@
note() { echo "enclave-init: $*"; }
warn() { note "warning: $*"; [ -d "$IO" ] && echo "$*" >>"$IO/warnings"; }
halt_guest() { sync; echo o >/proc/sysrq-trigger; sleep 60; }
overlay() {  # overlay DIR NAME: writable copy-on-write view of DIR kept in memory
    mkdir -p "$R/ovl/$2/upper" "$R/ovl/$2/work" &&
    mount -t overlay overlay \
        -o "lowerdir=$1,upperdir=$R/ovl/$2/upper,workdir=$R/ovl/$2/work" "$1"
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run || halt_guest
mkdir -p "$IO"
mount -t hostfs -o @HOST_IO@ hostfs "$IO" || { note "cannot mount the run directory"; halt_guest; }
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
[ -d /sys/fs/cgroup ] && mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null

REL=$(uname -r)
insmod @OVERLAY_KO@ 2>/dev/null
@MODULES_MOUNT@
mkdir -p "/lib/modules/$REL" &&
    mount -t hostfs -o @HOST_MODULES@ hostfs "/lib/modules/$REL" ||
    warn "cannot mount the UML modules on /lib/modules/$REL"
echo @MODPROBE@ >/proc/sys/kernel/modprobe
for m in @MODULES@; do
    @MODPROBE@ "$m" || warn "cannot load module $m"
done
scratch() {  # scratch DIR NAME: host files visible, writes kept in guest memory
    if [ -d "$1" ] && [ ! -L "$1" ]; then
        overlay "$1" "$2" 2>/dev/null || mount -t tmpfs -o mode=1777 tmpfs "$1"
    fi
}
scratch /tmp tmp
scratch /var/tmp var_tmp
@EXTRA_MOUNTS@
ip link set lo up 2>/dev/null

mkfifo "$R/stdout" "$R/stderr"
( stty -opost -echo <&3 2>/dev/null; exec cat "$R/stdout" >&3 ) 3>/dev/tty1 &
OUT=$!
( stty -opost -echo <&3 2>/dev/null; exec cat "$R/stderr" >&3 ) 3>/dev/tty2 &
ERR=$!
echo started >"$IO/started"
( cd @CWD@ && exec env -i -- @ENV@ @ARGV@ ) </dev/null >"$R/stdout" 2>"$R/stderr"
RC=$?
( sleep @DRAIN@; kill $OUT $ERR ) 2>/dev/null &
wait $OUT $ERR
echo $RC >"$IO/status.new" && mv "$IO/status.new" "$IO/status"
halt_guest
"""


class _SignalledError(Exception):
    """Raised from our signal handler to unwind :func:`run_in_uml`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def uml_kernel_release(binary: str = UML_BINARY) -> str | None:
    """Return the release of the UML kernel (e.g. ``"6.1.176"``), or None if unknown."""
    try:
        out = subprocess.run(
            [binary, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    if re.fullmatch(r"[0-9][\w.+~-]*", out):
        return out
    try:  # fall back to the only module tree, if there is exactly one
        trees = [d for d in os.listdir(UML_MODULES_ROOT) if d[:1].isdigit()]
    except OSError:
        return None
    return trees[0] if len(trees) == 1 else None


def _compiler() -> str | None:
    """Return the C compiler used for the XSAVE shim, or None."""
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return cc
    return shutil.which("cc") or shutil.which("gcc")


def _host_needs_shim() -> bool:
    """Guess from ``/proc/cpuinfo`` whether the host XSAVE area exceeds UML's 832 bytes."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return bool(_LARGE_XSAVE_FLAGS.intersection(line.split(":", 1)[-1].split()))
    except OSError:
        pass
    return True


def uml_available() -> str | None:
    """Return why :func:`run_in_uml` cannot work on this host, or None if it can."""
    if sys.platform != "linux":
        return f"User-mode Linux needs a Linux host (this is {sys.platform})"
    if not os.access(UML_BINARY, os.X_OK):
        return f"{UML_BINARY} not found (install Debian's user-mode-linux package)"
    release = uml_kernel_release()
    if release is None:
        return f"cannot determine the kernel release of {UML_BINARY}"
    if not os.path.isdir(os.path.join(UML_MODULES_ROOT, release)):
        return f"no UML modules for {release} in {UML_MODULES_ROOT}"
    if not shutil.which("sh") or not (shutil.which("modprobe") or shutil.which("busybox")):
        return "the host needs sh and modprobe (kmod) or busybox for the guest"
    if platform.machine() == "x86_64" and _compiler() is None and _host_needs_shim():
        return (
            "this CPU's XSAVE state (AVX-512/PKU/AMX) breaks UML 6.1 unless a ptrace shim "
            "is built, and no C compiler (cc) was found"
        )
    return None


def _parse_memory(memory: str) -> int:
    """Return ``memory`` (``"512M"``, ``"1G"``, ``"65536K"``) in MiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([KkMmGg]?)[iI]?[bB]?\s*", memory)
    if not match:
        raise ValueError(f"invalid memory size {memory!r} (use e.g. '512M' or '1G')")
    number, unit = int(match.group(1)), match.group(2).upper()
    mib = {"K": number // 1024, "": number // (1024 * 1024), "M": number, "G": number * 1024}
    if mib[unit] < 64:
        raise ValueError(f"memory size {memory!r} is too small (at least 64M)")
    return mib[unit]


def _module_names(release: str) -> tuple[set[str], set[str]]:
    """Return (loadable, built-in) module names of the UML tree, with ``-`` as ``_``."""

    def names(path: str, *, dep: bool) -> set[str]:
        found: set[str] = set()
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    item = line.split(":", 1)[0] if dep else line.strip()
                    base = os.path.basename(item).split(".ko", 1)[0]
                    if base:
                        found.add(base.replace("-", "_"))
        except OSError:
            pass
        return found

    tree = os.path.join(UML_MODULES_ROOT, release)
    return (
        names(os.path.join(tree, "modules.dep"), dep=True),
        names(os.path.join(tree, "modules.builtin"), dep=False),
    )


def _find_module(release: str, name: str) -> str | None:
    """Return the path of module ``name``'s ``.ko`` file in the UML tree, or None."""
    tree = os.path.join(UML_MODULES_ROOT, release)
    try:
        with open(os.path.join(tree, "modules.dep"), encoding="utf-8") as fh:
            for line in fh:
                path = line.split(":", 1)[0]
                if os.path.basename(path).split(".ko", 1)[0].replace("-", "_") == name:
                    return os.path.join(tree, path)
    except OSError:
        pass
    return None


def _memory_dir(tmp: str, mib: int) -> str:
    """Pick the directory where UML keeps guest RAM (an unlinked file, ``$TMPDIR``).

    A tmpfs with room for all of the guest's memory is fastest; otherwise the run's
    own temporary directory is used, because a full tmpfs kills the guest (SIGBUS).
    """
    for candidate in ("/dev/shm", tmp):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        roomy = candidate == tmp or st.f_bavail * st.f_frsize >= (mib + 128) * 1024 * 1024
        if roomy and os.access(candidate, os.W_OK):
            return candidate
    return tmp


def _check_host_path(path: str, what: str) -> str:
    """Validate a host path handed to the guest's ``mount`` and return it absolute."""
    path = os.path.abspath(path)
    if any(c in path for c in ",:\n\\") or not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} must be an existing directory without , : \\")
    return path


def _modules_mount(lib_dir: str) -> str:
    """Shell code that makes ``/lib/modules`` writable (for the UML module tree)."""
    if os.path.isdir("/lib/modules"):
        return "mount -t tmpfs -o mode=0755 tmpfs /lib/modules"
    return f"overlay {shlex.quote(lib_dir)} lib || warn 'cannot overlay {lib_dir}'"


def _write_guest_files(
    io_dir: str,
    release: str,
    argv: Sequence[str],
    cwd: str,
    env: Mapping[str, str],
    modules: Sequence[str],
    writable: Sequence[str],
    overlays: Sequence[str],
) -> None:
    """Write the guest's init script (and modprobe wrapper, if needed) into ``io_dir``."""
    guest_bin = _GUEST_IO + "/bin"
    search = "/usr/local/sbin:/usr/sbin:/sbin:" + env.get("PATH", os.defpath)
    modprobe = shutil.which("modprobe", path=search)
    env = dict(env)
    if modprobe is None:
        busybox = shutil.which("busybox")
        if busybox is None:
            raise RuntimeError("neither modprobe nor busybox found on the host")
        os.mkdir(os.path.join(io_dir, "bin"))
        for tool in ("modprobe", "insmod", "rmmod", "lsmod", "modinfo"):
            script = os.path.join(io_dir, "bin", tool)
            with open(script, "w", encoding="utf-8") as fh:
                fh.write(f'#!/bin/sh\nexec {shlex.quote(busybox)} {tool} "$@"\n')
            os.chmod(script, 0o755)
        modprobe = guest_bin + "/modprobe"
        env["PATH"] = env.get("PATH", os.defpath) + ":" + guest_bin
    for name in env:
        if not name or "=" in name or "\0" in name:
            raise ValueError(f"invalid environment variable name {name!r}")
    extra = [
        f"mount -t hostfs -o {shlex.quote(p)} hostfs {shlex.quote(p)} || warn 'cannot mount {p}'"
        for p in writable
    ]
    extra += [
        f"overlay {shlex.quote(p)} o{i} || warn 'cannot overlay {p}'"
        for i, p in enumerate(overlays)
    ]
    overlay_ko = _find_module(release, "overlay") or "/nonexistent/overlay.ko"
    replacements = {
        "@GUEST_DIR@": _GUEST_DIR,
        "@GUEST_IO@": _GUEST_IO,
        "@HOST_IO@": shlex.quote(io_dir),
        "@HOST_MODULES@": shlex.quote(os.path.join(UML_MODULES_ROOT, release)),
        "@OVERLAY_KO@": shlex.quote(overlay_ko),
        "@MODULES_MOUNT@": _modules_mount(os.path.realpath("/lib")),
        "@MODPROBE@": shlex.quote(modprobe),
        "@MODULES@": " ".join(shlex.quote(m) for m in modules),
        "@EXTRA_MOUNTS@": "\n".join(extra),
        "@DRAIN@": str(int(_DRAIN_SECONDS)),
        "@CWD@": shlex.quote(cwd),
        "@ENV@": " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()),
        "@ARGV@": " ".join(shlex.quote(a) for a in argv),
    }
    text = _INIT_TEMPLATE
    for key, value in replacements.items():
        text = text.replace(key, value)
    init = os.path.join(io_dir, "init")
    with open(init, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(init, 0o755)


def _build_shim(tmp: str) -> str | None:
    """Compile the XSAVE ptrace shim into ``tmp``; return its path (None if not needed)."""
    if platform.machine() != "x86_64":
        return None
    cc = _compiler()
    if cc is None:
        if _host_needs_shim():
            raise RuntimeError("a C compiler (cc) is needed to build the UML ptrace shim")
        return None
    source = os.path.join(tmp, "xstate_shim.c")
    shared = os.path.join(tmp, "xstate_shim.so")
    with open(source, "w", encoding="utf-8") as fh:
        fh.write(_SHIM_SOURCE)
    proc = subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-o", shared, source, "-ldl"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        if _host_needs_shim():
            raise RuntimeError(f"cannot build the UML ptrace shim:\n{proc.stderr}")
        return None
    return shared


_WATCHDOG = (
    'if IFS= read -r line && [ "$line" = done ]; then exit 0; fi; '
    'kill -KILL "-$0" 2>/dev/null; sleep 1; rm -rf -- "$1"'
)


def _start_watchdog(pgid: int, tmp: str) -> subprocess.Popen[bytes]:
    """Start a shell that kills process group ``pgid`` and removes ``tmp`` if we die.

    UML's helper processes ignore the death of their parent, so without this a
    SIGKILLed runner would leave them polling forever.  The watchdog waits for a line
    on its stdin: ``done`` means all is well; EOF means this process went away.
    """
    return subprocess.Popen(
        ["sh", "-c", _WATCHDOG, str(pgid), tmp],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop_watchdog(watchdog: subprocess.Popen[bytes]) -> None:
    """Tell the watchdog that everything has been cleaned up, and reap it."""
    try:
        assert watchdog.stdin is not None
        watchdog.stdin.write(b"done\n")
        watchdog.stdin.close()
    except OSError:
        pass
    try:
        watchdog.wait(timeout=10)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def _sink(stream: TextIO) -> Callable[[bytes], None]:
    """Return a function writing raw bytes to ``stream`` and flushing it."""
    buffer: BinaryIO | None = getattr(stream, "buffer", None)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(data: bytes) -> None:
        try:
            if buffer is not None:
                stream.flush()
                buffer.write(data)
                buffer.flush()
            else:
                stream.write(decoder.decode(data))
                stream.flush()
        except (OSError, ValueError):
            pass  # the host stream went away; keep draining the guest

    return write


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the UML process and every helper process in its process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError as exc:
        if exc.errno not in (errno.ESRCH, errno.EPERM):
            raise
    proc.kill()  # no-op once the process has been reaped


def _message(text: str) -> None:
    """Print a runner message on the host's stderr."""
    sys.stderr.write(_MSG_PREFIX + text + "\n")
    sys.stderr.flush()


def run_in_uml(
    argv: Sequence[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    memory: str = "1G",
    timeout: float = 1800,
    modules: Sequence[str] = DEFAULT_MODULES,
    writable: Sequence[str] = (),
    overlays: Sequence[str] = (),
    verbose: bool = False,
) -> int:
    """Boot a UML guest over the host filesystem, run ``argv`` as root in it, return its status.

    ``argv`` is looked up in ``env["PATH"]`` inside the guest and started in ``cwd``
    (default: the current directory) with exactly the environment ``env`` (default: a
    copy of ``os.environ``), stdin from ``/dev/null``.  The guest sees the host's ``/``
    read-only; directories in ``writable`` are mounted read-write (changes reach the
    host) and those in ``overlays`` get a discarded in-memory writable layer.  Paths
    under ``/tmp`` and ``/var/tmp`` are visible; the host's ``/run`` is not.

    ``modules`` are loaded (``modprobe``) before the command starts; names unknown to
    the UML tree are skipped, built-in ones need no loading.  Others can still be
    loaded on demand by the command.  ``memory`` is the guest RAM (``"512M"``,
    ``"1G"``; kept in ``/dev/shm`` when it fits, else in a temporary file).

    The command's stdout/stderr are written to ``sys.stdout``/``sys.stderr`` as they
    arrive.  Returns the command's exit status (128+N if killed by signal N), or
    :data:`EXIT_TIMEOUT` if the guest was still running after ``timeout`` seconds
    (boot included), or :data:`EXIT_NO_STATUS` if it died without reporting one; in
    both cases an explanation (with the end of the kernel console) goes to stderr.
    SIGINT/SIGTERM received meanwhile kill the guest, then take their usual effect.
    """
    if not argv:
        raise ValueError("argv must not be empty")
    reason = uml_available()
    if reason is not None:
        raise RuntimeError(reason)
    release = uml_kernel_release()
    assert release is not None
    mib = _parse_memory(memory)
    cwd = os.path.abspath(cwd if cwd is not None else os.getcwd())
    env = dict(os.environ if env is None else env)
    writable = [_check_host_path(p, "writable path") for p in writable]
    overlays = [_check_host_path(p, "overlay path") for p in overlays]
    loadable, builtin = _module_names(release)
    wanted = [m for m in (n.replace("-", "_") for n in modules) if m in loadable]
    dropped = [m for m in modules if m.replace("-", "_") not in loadable | builtin]
    if dropped:
        _message(f"skipping modules not in the UML {release} tree: {' '.join(dropped)}")

    tmp = tempfile.mkdtemp(prefix="enclave-uml-")
    proc: subprocess.Popen[bytes] | None = None
    watchdog: subprocess.Popen[bytes] | None = None
    pipes: list[int] = []
    old_handlers: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
    signalled: int | None = None
    stopping = False  # set while cleaning up: signals are then only recorded
    late_signals: list[int] = []
    try:
        os.chmod(tmp, 0o755)
        io_dir = os.path.join(tmp, "io")
        os.mkdir(io_dir)
        _check_host_path(io_dir, "temporary directory")
        _write_guest_files(io_dir, release, argv, cwd, env, wanted, writable, overlays)
        shim = _build_shim(tmp)
        uml_dir = os.path.join(tmp, "uml")
        os.mkdir(uml_dir)

        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        diag_r, diag_w = os.pipe()
        pipes += [out_r, out_w, err_r, err_w, diag_r, diag_w]
        cmdline = [
            UML_BINARY,
            f"mem={mib}M",
            "root=/dev/root",
            "rootfstype=hostfs",
            "rootflags=/",
            "ro",
            f"init={io_dir}/init",
            f"uml_dir={uml_dir}",
            "umid=enclave",
            "con=null",
            "ssl=null",
            "con0=null,fd:2",
            f"con1=null,fd:{out_w}",
            f"con2=null,fd:{err_w}",
            "printk.time=1",
        ]
        if not verbose:
            cmdline.append("quiet")
        uml_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        uml_env["TMPDIR"] = _memory_dir(tmp, mib)
        if shim is not None:
            uml_env["LD_PRELOAD"] = shim

        if threading.current_thread() is threading.main_thread():

            def on_signal(signum: int, frame: FrameType | None) -> None:
                if stopping:
                    late_signals.append(signum)
                else:
                    raise _SignalledError(signum)

            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                old_handlers[signum] = signal.signal(signum, on_signal)

        deadline = time.monotonic() + timeout
        proc = subprocess.Popen(
            cmdline,
            cwd=tmp,
            env=uml_env,
            stdin=subprocess.DEVNULL,
            stdout=diag_w,
            stderr=diag_w,
            pass_fds=(out_w, err_w),
            start_new_session=True,
        )
        watchdog = _start_watchdog(proc.pid, tmp)
        for fd in (out_w, err_w, diag_w):
            os.close(fd)
            pipes.remove(fd)
        diag = collections.deque[bytes]()
        diag_size = 0
        stderr_sink = _sink(sys.stderr)
        sinks: dict[int, Callable[[bytes], None]] = {
            out_r: _sink(sys.stdout),
            err_r: stderr_sink,
        }

        def keep_diag(data: bytes) -> None:
            nonlocal diag_size
            diag.append(data)
            diag_size += len(data)
            while diag_size > _DIAG_LIMIT and len(diag) > 1:
                diag_size -= len(diag.popleft())
            if verbose:
                stderr_sink(data)

        sinks[diag_r] = keep_diag
        timed_out = False
        drain_until: float | None = None
        with selectors.DefaultSelector() as selector:
            for fd in sinks:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                now = time.monotonic()
                if drain_until is None:
                    if proc.poll() is not None:
                        _kill_group(proc)  # leftover helpers would hold the pipes open
                        drain_until = now + _DRAIN_SECONDS
                    elif now >= deadline:
                        timed_out = True
                        _kill_group(proc)
                        proc.wait()
                        drain_until = now + _DRAIN_SECONDS
                elif now >= drain_until:
                    break
                for key, _ in selector.select(0.1):
                    fd = key.fd
                    data = os.read(fd, 65536)
                    if data:
                        sinks[fd](data)
                    else:
                        selector.unregister(fd)
        uml_status = proc.wait()

        for line in _read_text(os.path.join(io_dir, "warnings")).splitlines():
            _message(f"guest warning: {line}")
        status = _read_text(os.path.join(io_dir, "status")).strip()
        if timed_out:
            _message(f"timed out after {timeout:g} s; the guest was killed")
            return EXIT_TIMEOUT
        if status.isdigit():
            return int(status)
        started = os.path.exists(os.path.join(io_dir, "started"))
        lines = b"".join(diag).decode("utf-8", "replace").splitlines()
        tail = [line for line in lines if not _STACK_LINE.search(line)][-25:]
        _message(
            "the guest stopped without reporting an exit status "
            f"({'after' if started else 'before'} starting the command; "
            f"UML exit status {uml_status}). Last console lines:\n  " + "\n  ".join(tail)
        )
        return EXIT_NO_STATUS
    except _SignalledError as exc:
        signalled = exc.signum
    finally:
        stopping = True
        if proc is not None:
            _kill_group(proc)
            proc.wait()
        for fd in pipes:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
        if watchdog is not None:
            _stop_watchdog(watchdog)
        for number, handler in old_handlers.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        if late_signals and signalled is None:
            signal.raise_signal(late_signals[0])  # arrived during clean-up: act now
    # Reached only after a signal: the guest is gone, now let the signal act as usual.
    _message(f"interrupted by signal {signalled}; the guest was killed")
    if signalled == signal.SIGINT:
        raise KeyboardInterrupt
    signal.raise_signal(signalled)
    return 128 + signalled


def _read_text(path: str) -> str:
    """Return the contents of ``path``, or ``""`` if it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def main(args: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m pytest_enclave.uml [OPTIONS] -- CMD ARGS...``."""
    args = list(sys.argv[1:] if args is None else args)
    parser = argparse.ArgumentParser(
        prog="python -m pytest_enclave.uml",
        description="Run a command as root inside a User-mode Linux kernel (with netem) "
        "over the host filesystem; exit with the command's status.",
    )
    parser.add_argument("--memory", default="1G", help="guest RAM (default: %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds before the guest is killed"
    )
    parser.add_argument("--cwd", help="working directory in the guest (default: current)")
    parser.add_argument(
        "--module", action="append", default=[], help="extra module to load (repeatable)"
    )
    parser.add_argument(
        "--no-default-modules", action="store_true", help="do not load DEFAULT_MODULES"
    )
    parser.add_argument(
        "--rw", action="append", default=[], metavar="DIR", help="mount DIR read-write"
    )
    parser.add_argument(
        "--overlay",
        action="append",
        default=[],
        metavar="DIR",
        help="make DIR writable in the guest, discarding the changes",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show kernel and UML console output"
    )
    if "--" in args:
        split = args.index("--")
        opts, command = parser.parse_args(args[:split]), args[split + 1 :]
    else:
        parser.add_argument("command", nargs=argparse.REMAINDER)
        opts = parser.parse_args(args)
        command = opts.command
    if not command:
        parser.error("no command given (usage: ... -- CMD ARGS...)")
    reason = uml_available()
    if reason is not None:
        _message(reason)
        return EXIT_NO_STATUS
    modules = [] if opts.no_default_modules else list(DEFAULT_MODULES)
    try:
        return run_in_uml(
            command,
            cwd=opts.cwd,
            memory=opts.memory,
            timeout=opts.timeout,
            modules=modules + opts.module,
            writable=opts.rw,
            overlays=opts.overlay,
            verbose=opts.verbose,
        )
    except ValueError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
