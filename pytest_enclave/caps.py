"""What this machine can do, probed once per process (``python -m pytest_enclave doctor``)."""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TypeVar

from . import _linux

__all__ = ["REQUIRABLE", "Capability", "capabilities", "has_netem", "missing", "report"]

T = TypeVar("T")


@dataclass(frozen=True)
class Capability:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = "ok     " if self.ok else "MISSING"
        text = f"{mark} {self.name:<12} {self.detail}"
        return text if self.ok or not self.fix else f"{text}\n{'':20}fix: {self.fix}"


def _privileges() -> Capability:
    try:
        _linux.require_privileges()
    except Exception as exc:  # PermissionDeniedError, reported not raised
        return Capability("privileges", False, str(exc), "run as root (sudo -E ...)")
    return Capability("privileges", True, f"uid {os.geteuid()}: may create namespaces")


def _in_scratch_netns(fn: Callable[[str], T]) -> T:
    """Run ``fn(path)`` with a throwaway network namespace at ``path``."""
    name = f"pe-probe-{uuid.uuid4().hex[:8]}"
    path = _linux.create_netns(name)
    try:
        return fn(path)
    finally:
        _linux.delete_netns(name)


def _namespaces() -> Capability:
    try:
        _in_scratch_netns(lambda path: None)
    except Exception as exc:
        return Capability(
            "namespaces",
            False,
            f"cannot create a network namespace: {exc}",
            "needs a kernel with CONFIG_NET_NS and root",
        )
    return Capability("namespaces", True, "network namespaces, veth and bridges")


def _nftables() -> Capability:
    from .shapers._libnft import Nft
    from .shapers.nftables import RANDOM_LOSS, REJECT, probe_script

    def check(nft: Nft) -> bool:
        try:
            nft.run(probe_script(RANDOM_LOSS))
            return nft.accepts(probe_script(REJECT))
        finally:
            nft.close()

    def attempt(path: str) -> bool:
        worker = _linux.NamespaceWorker(path)
        try:
            return worker.call(lambda: check(Nft()))
        finally:
            worker.close()

    try:
        reject = _in_scratch_netns(attempt)
    except Exception as exc:
        return Capability(
            "nftables",
            False,
            f"bridge filtering with nftables failed: {exc}",
            "apt-get install libnftables1; kernel needs nf_tables, "
            "nft_numgen and nf_tables bridge support",
        )
    if reject:
        return Capability("nftables", True, "libnftables in-process: block, loss, reject")
    return Capability(
        "nftables",
        True,
        "libnftables in-process: block, loss; no bridge reject in this kernel "
        "(reject=True raises CapabilityError: use BLOCKED, or a kernel with "
        "CONFIG_NFT_BRIDGE_REJECT)",
    )


def _module_missing(module: str, option: str) -> str:
    """Why ``module`` is unusable: built as a module that did not load, or not built at all."""
    release = os.uname().release
    tree = f"/lib/modules/{release}"
    for listing in ("modules.dep", "modules.builtin"):
        with suppress(OSError), open(os.path.join(tree, listing)) as f:
            names = {os.path.basename(line.split(":", 1)[0]).split(".ko")[0] for line in f}
            if module in names or module.replace("_", "-") in names:
                return (
                    f"{module} is a module of kernel {release} but it did not load "
                    f"(`modprobe {module}` as root; in a container: on the host)"
                )
    return f"kernel {release} has no {module} (not built in: {option}; no module in {tree})"


@functools.cache
def has_netem() -> str | None:
    """None if the netem shaper works here (HTB classes with netem under them), else why not.

    Probed once per process, in a scratch namespace: creating the qdiscs also loads their
    modules when the kernel can (so "present but not loaded" counts as present).
    """
    from pyroute2 import IPRoute

    def attempt(path: str) -> str | None:
        with IPRoute(fileno=_linux.netlink_socket_in(path)) as ipr:
            # a veth, not a dummy: the netns backend needs veth anyway, dummy may be missing
            ipr.link("add", ifname="v0", kind="veth", peer={"ifname": "v1"})
            idx = ipr.link_lookup(ifname="v0")[0]
            steps: list[tuple[str, str, dict[str, object]]] = [
                ("add", "htb", {"handle": "1:", "default": 0}),
                (
                    "add-class",
                    "htb",
                    {"handle": "1:10", "parent": "1:", "rate": "1gbit", "quantum": 60000},
                ),
                ("add", "netem", {"handle": "10:", "parent": "1:10", "delay": 1000}),
            ]
            for command, kind, args in steps:
                try:
                    ipr.tc(command, kind, index=idx, **args)
                except Exception as exc:
                    why = _module_missing(f"sch_{kind}", f"CONFIG_NET_SCH_{kind.upper()}")
                    return (
                        f"{why}; creating a {kind} qdisc said: {exc.args[-1] if exc.args else exc}"
                    )
        return None

    try:
        return _in_scratch_netns(attempt)
    except Exception as exc:
        return f"cannot probe for sch_netem in kernel {os.uname().release} ({exc})"


def _netem() -> Capability:
    reason = has_netem()
    if reason is None:
        return Capability(
            "netem", True, "sch_netem: delay, jitter, duplicate, corrupt, reorder, rate"
        )
    uml = "" if shutil.which("linux") else "apt-get install user-mode-linux, then "
    return Capability(
        "netem",
        False,
        reason + "; delay/jitter/duplicate/corrupt/reorder/rate "
        "raise CapabilityError, block and loss still work",
        f"modprobe sch_netem, or use a kernel built with CONFIG_NET_SCH_NETEM; "
        f"to run the netem tests here: {uml}tox -e netem (user-mode-linux)",
    )


def _docker() -> Capability:
    try:
        import docker
    except ImportError:
        return Capability(
            "docker",
            False,
            "the docker SDK is not installed",
            "pip install 'pytest-enclave[docker]'",
        )
    try:
        client = docker.from_env(timeout=3)
        version = client.version().get("Version", "?")
        client.close()
    except Exception as exc:
        return Capability(
            "docker",
            False,
            f"no Docker engine reachable ({exc.__class__.__name__})",
            "apt-get install docker.io && dockerd & (or systemctl start docker)",
        )
    return Capability("docker", True, f"engine {version} reachable")


def _uml() -> Capability:
    from .uml import uml_available

    reason = uml_available()
    if reason:
        return Capability("uml", False, reason, "apt-get install user-mode-linux")
    return Capability("uml", True, "user-mode-linux can run the netem tests")


REQUIRABLE = ("netem", "docker", "reject", "uml")


@functools.cache
def missing(capability: str) -> str | None:
    """None if ``capability`` (one of REQUIRABLE) is usable here, else why not and the fix."""
    probe = {"netem": _netem, "docker": _docker, "uml": _uml, "reject": _nftables}.get(capability)
    if probe is None:
        raise ValueError(
            f"capability {capability!r} is not known: use one of {', '.join(REQUIRABLE)}"
        )
    found = probe()
    if capability == "reject" and "no bridge reject" in found.detail:
        return found.detail
    if found.ok:
        return None
    return f"{found.detail} (fix: {found.fix})" if found.fix else found.detail


def capabilities() -> list[Capability]:
    """Every capability, probed now."""
    checks = [_privileges()]
    if checks[0].ok:
        checks += [_namespaces(), _nftables(), _netem()]
    checks.append(_docker())
    with suppress(ImportError):
        checks.append(_uml())
    return checks


def report() -> tuple[str, bool]:
    """The doctor's text and whether everything needed for the default backend is there."""
    caps = capabilities()
    essential = {"privileges", "namespaces", "nftables"}
    ok = all(c.ok for c in caps if c.name in essential)
    lines = [f"pytest-enclave doctor (kernel {os.uname().release})"]
    lines += [c.line() for c in caps]
    lines.append("netns backend: " + ("ready" if ok else "NOT usable, see above"))
    return "\n".join(lines), ok
