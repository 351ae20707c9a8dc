"""The netem shaper: every netem field of a connection, per directed pair, changed without gaps.

Frames from service ``s`` to service ``d`` leave the bridge through ``d``'s port, so the policy
``s -> d`` lives on that port's egress (netlink only, in-process, via pyroute2)::

    port of d:  HTB root 1:  default 0 (unmarked frames go straight out: unshaped, no rate cap)
                 ├── class 1:X  10gbit ── netem X:  (the connection of one pair s -> d)
                 ├── class 1:Y  10gbit ── netem Y:  (another source towards d)
                 └── filter fw mark M: priority 1:0, redirect to ifb ── netem (duplicating)

The nftables shaper's bridge filter marks the frames of each shaped pair with ``meta priority
set 1:X``; HTB puts a frame whose priority names one of its classes straight into that class.
A duplicating netem gets an ifb device of its own instead (kernels since mid-2025 refuse one
in a tree with other netems: "cannot mix duplicating netems with other netems in tree"): nft
sets the pair's skb mark, a fw filter on the port redirects it to the ifb, and the ifb sends
the frames back out of the port with priority 1:0, which HTB sends straight out.

A connection applies each way because both directed pairs get a class: 50 ms of delay is a
100 ms round trip, as in Kurtosis. Each pair has its own netem, so its queue, rate and loss
state are its own, and frames of unshaped pairs (and to or from the host) never enter one.

A change is double-buffered, as Kurtosis did with its two tc trees, generalised to per-pair
class ids: :meth:`NetemShaper.stage` builds a class with a fresh id for every pair whose
connection changed while the old classes stay in force; one nft transaction then points every
pair at its new class (atomic across all pairs and both directions); :meth:`commit` retires
the old classes and deletes each once its netem queue is empty, so frames still being delayed
are delivered, not dropped. Unchanged pairs keep their class and netem state. Ids are never
reused before the kernel has deleted them: repeated changes cannot fail with EEXIST.

Semantics: delay is netem's latency each way; ``jitter_ms`` varies it (no table or
"uniform": uniform within +-jitter; "normal", "pareto", "paretonormal": iproute2's tables,
with the jitter as standard deviation, which is Kurtosis's NormalPacketDelayDistribution).
With netem fields present, loss is netem's too (nftables does it otherwise), so it is applied
once; ``loss_correlation`` uses the simple Gilbert model, a two-state Markov chain whose mean
loss is exactly ``packet_loss_percentage`` and whose lag-1 correlation is exactly the
correlation (netem's own correlated random loss does not: "loss 20% 50%" lost 3.4 % with a
correlation of 0.26 in kernel 6.1). A delay correlation is refused with CapabilityError:
netem reduces its correlated random number modulo the jitter range or table size, which
destroys the correlation (75 % measured 0.01). Rate counts Ethernet frame bytes. The
netem queue holds 1000 packets (tc's default).
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
import struct
import sysconfig
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, nla, nlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWQDISC
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from .. import _linux
from .._netlink import netlink_call as _netlink
from ..config import ConnectionConfig
from ..errors import BackendError, CapabilityError
from ..matrix import PolicyTable

__all__ = ["NetemShaper", "netem_options"]

ROOT = 0x10000  # handle 1: of the HTB root on every shaped port
_TC_H_ROOT = 0xFFFFFFFF
_FIRST_MINOR, _LAST_MINOR = 0x10, 0xFFFF
_HTB_RATE = 10_000_000_000 // 8  # bytes/s: never the bottleneck (netem does the rate)
_HTB_QUANTUM = 60_000  # bytes; given, so HTB does not warn about its r2q guess
# bytes; given, because pyroute2's default (rate / HZ, with HZ read as 10**9 from
# /proc/net/psched) is one frame: HTB would throttle bursts and add timer latency
_HTB_BURST = _HTB_RATE // 100
_LIMIT = 1000  # packets in a netem queue (tc's default)
_U32 = 0xFFFFFFFF
_MAX_JITTER_NS = 0x7FFFFFFF  # netem's tabledist() takes the jitter as s32 nanoseconds
_DIST_MAX = 16384  # entries in a netem distribution table (NETEM_DIST_MAX)
_FW_PRIO = 1  # the fw filter (on HTB root 1:) steering duplicating pairs to their ifb
_MARK = 0x70650000  # skb mark of duplicating pair 1:X is _MARK | X (scrubbed leaving the hub)
_GONE = {19, 2, 22}  # ENODEV, ENOENT, EINVAL: the port or class is already gone


# pyroute2 is untyped, hence the ignores on its base classes below
class _NetemOptions(nla):  # type: ignore[misc]
    """TCA_OPTIONS of netem: struct tc_netem_qopt, then attributes (kernel 6.1 numbering)."""

    fields = tuple(
        (name, "I") for name in ("latency", "limit", "loss", "gap", "duplicate", "jitter")
    )
    nla_map = (
        ("TCA_NETEM_UNSPEC", "none"),
        ("TCA_NETEM_CORR", "Corr"),
        ("TCA_NETEM_DELAY_DIST", "cdata"),
        ("TCA_NETEM_REORDER", "Chance"),
        ("TCA_NETEM_CORRUPT", "Chance"),
        ("TCA_NETEM_LOSS", "Loss"),
        ("TCA_NETEM_RATE", "Rate"),
        ("TCA_NETEM_ECN", "uint32"),
        ("TCA_NETEM_RATE64", "uint64"),
        ("TCA_NETEM_PAD", "hex"),
        ("TCA_NETEM_LATENCY64", "int64"),
        ("TCA_NETEM_JITTER64", "int64"),
    )

    class Corr(nla):  # type: ignore[misc]
        fields = (("delay_corr", "I"), ("loss_corr", "I"), ("dup_corr", "I"))

    class Chance(nla):  # type: ignore[misc]
        fields = (("probability", "I"), ("correlation", "I"))

    class Rate(nla):  # type: ignore[misc]
        fields = (
            ("rate", "I"),
            ("packet_overhead", "i"),
            ("cell_size", "I"),
            ("cell_overhead", "i"),
        )

    class Loss(nla):  # type: ignore[misc]
        nla_map = (("NETEM_LOSS_UNSPEC", "none"), ("NETEM_LOSS_GI", "hex"), ("NETEM_LOSS_GE", "Ge"))

        class Ge(nla):  # type: ignore[misc]
            fields = (("p", "I"), ("r", "I"), ("h", "I"), ("k1", "I"))


class _NetemMsg(nlmsg):  # type: ignore[misc]
    """RTM_NEWQDISC for netem, with the options pyroute2's plugin leaves out (tables, 64 bit).

    Not a tcmsg subclass: pyroute2 compiles attribute maps once per class hierarchy, so a
    subclass would silently use tcmsg's netem options once tcmsg has been used.
    """

    prefix = "TCA_"
    fields = tcmsg.fields
    nla_map = (("TCA_UNSPEC", "none"), ("TCA_KIND", "asciiz"), ("TCA_OPTIONS", "Options"))
    Options = _NetemOptions


def _prob(percentage: float) -> int:
    """A percentage as netem's u32 probability (100 % -> 2**32 - 1), rounded as tc does."""
    return min(_U32, round(percentage / 100.0 * _U32))


def _dist_dirs() -> list[str]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
    dirs = [os.environ.get("TC_LIB_DIR", ""), f"/usr/lib/{multiarch}/tc", "/usr/lib/tc"]
    return [d for d in [*dirs, "/usr/lib64/tc", "/lib/tc"] if d]


@functools.cache
def distribution_table(name: str) -> bytes:
    """iproute2's ``<name>.dist`` table as netem wants it (s16 values, native byte order)."""
    for directory in _dist_dirs():
        path = os.path.join(directory, f"{name}.dist")
        with suppress(OSError), open(path) as f:
            lines = (line.split("#", 1)[0] for line in f)
            values = [int(v) for line in lines for v in line.split()][:_DIST_MAX]
            return struct.pack(f"={len(values)}h", *values)
    raise CapabilityError(
        f"packet_delay_distribution with distribution={name!r} needs iproute2's {name}.dist "
        f"table, found in none of {', '.join(_dist_dirs())}: install iproute2 "
        "(apt-get install iproute2) or point TC_LIB_DIR at the directory that holds it"
    )


def _gilbert(loss: float, correlation: float) -> dict[str, int]:
    """Simple Gilbert model with mean loss ``loss`` and lag-1 correlation ``correlation`` (%).

    Lost iff in the bad state; p = P(good -> bad), r = P(bad -> good): the mean loss is
    p / (p + r) and the correlation 1 - p - r. 100 % correlation would never change state, so
    it is held just below.
    """
    lo, rho = loss / 100.0, min(correlation / 100.0, 0.999)
    p, r = lo * (1.0 - rho), (1.0 - lo) * (1.0 - rho)
    return {"p": _prob(p * 100), "r": _prob(r * 100), "h": 0, "k1": 0}


def netem_options(config: ConnectionConfig) -> dict[str, Any]:
    """The netem TCA_OPTIONS that make ``config`` real on one directed pair (no I/O but tables)."""
    delay = config.packet_delay_distribution
    latency = round((delay.mean_ms if delay else 0.0) * 1e6)  # ns
    jitter = round((delay.jitter_ms if delay else 0.0) * 1e6)
    attrs: list[list[Any]] = [["TCA_NETEM_LATENCY64", latency], ["TCA_NETEM_JITTER64", jitter]]
    opts: dict[str, Any] = {
        "latency": min(_U32, latency >> 6),  # psched ticks, for kernels before the 64-bit attrs
        "jitter": min(_U32, jitter >> 6),
        "limit": _LIMIT,
        "loss": 0,
        "gap": 0,
        "duplicate": _prob(config.duplicate_percentage),
        "attrs": attrs,
    }
    if config.packet_loss_percentage and config.loss_correlation:
        ge = _gilbert(config.packet_loss_percentage, config.loss_correlation)
        attrs.append(["TCA_NETEM_LOSS", {"attrs": [["NETEM_LOSS_GE", ge]]}])
    else:
        opts["loss"] = _prob(config.packet_loss_percentage)
    if delay and delay.correlation and jitter:  # refused by check() on kernels seen so far
        attrs.append(["TCA_NETEM_CORR", {"delay_corr": _prob(delay.correlation)}])
    if delay and jitter and delay.distribution not in (None, "uniform"):
        attrs.append(["TCA_NETEM_DELAY_DIST", distribution_table(delay.distribution)])
    if config.reorder_percentage:
        opts["gap"] = max(1, config.reorder_gap)  # tc's default: any packet may go early
        attrs.append(["TCA_NETEM_REORDER", {"probability": _prob(config.reorder_percentage)}])
    if config.corrupt_percentage:
        attrs.append(["TCA_NETEM_CORRUPT", {"probability": _prob(config.corrupt_percentage)}])
    if config.rate_kbit:
        rate = round(config.rate_kbit * 125)  # bytes/s
        attrs.append(["TCA_NETEM_RATE", {"rate": min(_U32, rate)}])
        if rate > _U32:
            attrs.append(["TCA_NETEM_RATE64", rate])
    return opts


def _netem_request(index: int, handle: int, parent: int, config: ConnectionConfig) -> _NetemMsg:
    """RTM_NEWQDISC (create, exclusive): netem ``handle`` under ``parent`` on ``index``."""
    msg = _NetemMsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"], msg["handle"], msg["parent"] = index, handle, parent
    msg["attrs"] = [["TCA_KIND", "netem"], ["TCA_OPTIONS", netem_options(config)]]
    msg["header"]["type"] = RTM_NEWQDISC
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return msg


def _limits(config: ConnectionConfig, kernel: str) -> None:
    """Raise CapabilityError for a value sch_netem cannot represent."""
    where = f" ({kernel})" if kernel else ""
    delay = config.packet_delay_distribution
    if delay and delay.jitter_ms * 1e6 > _MAX_JITTER_NS:
        raise CapabilityError(
            f"jitter_ms={delay.jitter_ms:g} is more than sch_netem{where} can vary a delay by "
            f"({_MAX_JITTER_NS / 1e6:g} ms, a signed 32-bit count of ns): give at most that"
        )
    if delay and delay.correlation and delay.jitter_ms:
        raise CapabilityError(
            f"packet_delay_distribution correlation={delay.correlation:g} is not honoured by "
            f"sch_netem{where}: it takes its correlated random number modulo the jitter range "
            "(or the table size), which leaves next to none of the correlation (measured: "
            "lag-1 correlation 0.01 of successive delays for 75 %). Give correlation=0; "
            "loss_correlation does work"
        )
    if config.rate_kbit and round(config.rate_kbit * 125) < 1:
        raise CapabilityError(
            f"rate_kbit={config.rate_kbit:g} is below sch_netem's resolution of 1 byte/s "
            "(0.008 kbit): give at least 0.008, or 0 for no rate limit"
        )
    if delay and delay.jitter_ms and delay.distribution not in (None, "uniform"):
        distribution_table(delay.distribution)


@dataclass(frozen=True)
class Steer:
    """How the bridge filter sends a pair's frames to its netem: an skb priority naming its
    HTB class, or (duplicating netems, which live on a device of their own) an skb mark."""

    priority: int = 0
    mark: int = 0


@dataclass
class _Class:
    """One directed pair's netem: under HTB class 1:minor of its destination's port, or on
    its own ifb device (``ifb``) that a fw filter on the port redirects marked frames to."""

    dst: str
    minor: int
    config: ConnectionConfig
    built: bool = False  # False while the destination's port does not exist yet
    ifb: str = ""

    @property
    def steer(self) -> Steer:
        if self.config.duplicate_percentage:
            return Steer(mark=_MARK | self.minor)
        return Steer(priority=ROOT | self.minor)


class NetemShaper:
    """Per-pair netems on the bridge ports, in the namespace at ``netns_path`` (None: ours).

    ``port_of(name)`` gives the interface through which frames leave the bridge towards
    service ``name`` (None: not created yet). The owner calls :meth:`attach` once such a port
    exists and :meth:`detach` when it is gone. ``ifb_prefix`` names the ifb devices of
    duplicating netems (keep it unique per enclave in a shared namespace). ``drop_on_close``
    removes what we added on :meth:`close` (not needed when the namespace itself goes).
    """

    def __init__(
        self,
        netns_path: str | None,
        port_of: Callable[[str], str | None],
        kernel: str = "",
        drop_on_close: bool = True,
        ifb_prefix: str = "pe-dup",
    ) -> None:
        fileno = _linux.netlink_socket_in(netns_path) if netns_path else None
        self._ipr = IPRoute(fileno=fileno) if fileno is not None else IPRoute()
        self._port_of, self._kernel, self._drop_on_close = port_of, kernel, drop_on_close
        self._ifb_names = (f"{ifb_prefix}{i:x}" for i in itertools.count())
        self._live: dict[tuple[str, str], _Class] = {}  # in force (the nft marks point here)
        self._next: dict[tuple[str, str], _Class] | None = None  # staged, not switched yet
        self._fresh: list[_Class] = []  # built by the current stage
        self._retiring: list[_Class] = []  # out of force, deleted once drained
        self._used: dict[str, set[int]] = {}  # destination -> minors that exist or are held
        self._ports: dict[str, int] = {}  # destination -> ifindex with our HTB root

    # -- the change protocol --------------------------------------------------------------

    def check(self, table: PolicyTable) -> None:
        """Raise CapabilityError naming the field if this kernel cannot honour a value."""
        for config in table.configs:
            if config.needs_netem:
                _limits(config, self._kernel)

    def stage(self, table: PolicyTable) -> dict[tuple[str, str], Steer]:
        """Build the netems ``table`` needs beside those in force; return how to steer pairs.

        Nothing in force changes. On error, what this call built is removed again.
        """
        self._reap()
        staged: dict[tuple[str, str], _Class] = {}
        try:
            for src, dst, config in table.pairs():
                if not config.needs_netem:
                    continue
                old = self._live.get((src, dst))
                keep = old is not None and old.config == config
                staged[(src, dst)] = old if keep and old else self._new_class(dst, config)
        except BaseException:
            self.abort()
            raise
        self._next = staged
        return {pair: cls.steer for pair, cls in staged.items()}

    def commit(self) -> None:
        """The staged netems are in force now: retire those replaced (deleted once drained)."""
        if self._next is None:
            return
        kept = {id(cls) for cls in self._next.values()}
        self._retiring += [cls for cls in self._live.values() if id(cls) not in kept]
        self._live, self._next, self._fresh = self._next, None, []
        self._reap()

    def abort(self) -> None:
        """Undo the current stage: delete what it built; what is in force stays."""
        for cls in self._fresh:
            self._delete(cls)
        self._next, self._fresh = None, []

    # -- ports ----------------------------------------------------------------------------

    def attach(self, name: str) -> None:
        """``name``'s port exists now: build the netems in force towards it."""
        for cls in self._live.values():
            if cls.dst == name and not cls.built:
                self._build(cls)

    def detach(self, name: str) -> None:
        """``name``'s port is gone, and every class on it; our ifb devices towards it go too."""
        self._ports.pop(name, None)
        for cls in [c for c in self._retiring if c.dst == name]:
            self._retiring.remove(cls)
            self._delete(cls)
        for cls in self._live.values():
            if cls.dst == name:
                self._delete_ifb(cls)
                cls.built = False

    def close(self, keep: bool = False) -> None:
        """Remove our HTB roots and ifb devices (with ``drop_on_close``), then the socket."""
        if self._drop_on_close and not keep:
            for cls in [*self._live.values(), *self._retiring]:
                self._delete_ifb(cls)
            for index in self._ports.values():
                with suppress(NetlinkError):
                    self._ipr.tc("del", index=index, handle=ROOT, parent=_TC_H_ROOT)
        self._ports.clear()
        self._ipr.close()

    # -- kernel work ----------------------------------------------------------------------

    def _new_class(self, dst: str, config: ConnectionConfig) -> _Class:
        used = self._used.setdefault(dst, set())
        minor = next((m for m in range(_FIRST_MINOR, _LAST_MINOR + 1) if m not in used), None)
        if minor is None:
            raise BackendError(
                f"no free HTB class id on the port of {dst!r}: {len(used)} are in use; "
                "fewer distinct shaped sources towards one service would fit"
            )
        used.add(minor)
        cls = _Class(dst, minor, config)
        self._fresh.append(cls)
        self._build(cls)
        return cls

    def _index(self, dst: str) -> int | None:
        """The ifindex of ``dst``'s port, with our HTB root on it (None: no port yet)."""
        if dst in self._ports:
            return self._ports[dst]
        ifname = self._port_of(dst)
        found = self._ipr.link_lookup(ifname=ifname) if ifname else []
        if not found:
            return None
        _netlink(
            f"adding an HTB root to {ifname} (the port of {dst!r})",
            lambda: self._ipr.tc("add", "htb", index=found[0], handle=ROOT, default=0),
        )
        self._ports[dst] = int(found[0])
        return int(found[0])

    def _build(self, cls: _Class) -> None:
        index = self._index(cls.dst)
        if index is None:
            return  # built by attach() when the port appears
        if cls.config.duplicate_percentage:
            self._build_ifb(cls, index)
        else:
            self._build_htb(cls, index)
        cls.built = True

    def _build_htb(self, cls: _Class, index: int) -> None:
        handle = ROOT | cls.minor
        what = f"class 1:{cls.minor:x} towards {cls.dst!r} ({cls.config.describe()})"
        _netlink(
            f"adding HTB {what}",
            lambda: self._ipr.tc(
                "add-class", "htb", index=index, handle=handle, parent=ROOT,
                quantum=_HTB_QUANTUM, rate=_HTB_RATE, burst=_HTB_BURST, cburst=_HTB_BURST,
            ),
        )  # fmt: skip
        msg = _netem_request(index, cls.minor << 16, handle, cls.config)
        try:
            _netlink(f"adding netem under {what}", lambda: self._ipr.nlm_request_batch([msg]))
        except BackendError:
            self._delete_class(index, cls.minor)
            raise

    def _build_ifb(self, cls: _Class, index: int) -> None:
        """A duplicating netem as the root of an ifb device of its own; a fw filter on the
        port redirects the pair's marked frames there. The ifb sends them back out of the
        port with priority 1:0, which HTB sends straight out."""
        cls.ifb = next(self._ifb_names)
        what = f"ifb {cls.ifb} towards {cls.dst!r} ({cls.config.describe()})"
        try:
            _netlink(
                f"adding {what}",
                lambda: self._ipr.link("add", ifname=cls.ifb, kind="ifb", state="up"),
            )
            ifb = self._ipr.link_lookup(ifname=cls.ifb)[0]
            msg = _netem_request(ifb, ROOT, _TC_H_ROOT, cls.config)
            _netlink(f"adding netem on {what}", lambda: self._ipr.nlm_request_batch([msg]))
            actions = [
                {"kind": "skbedit", "priority": ROOT},
                {"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": ifb},
            ]
            _netlink(
                f"adding the fw filter for {what}",
                lambda: self._ipr.tc(
                    "add-filter", "fw", index=index, parent=ROOT, prio=_FW_PRIO,
                    handle=_MARK | cls.minor, action=actions,
                ),
            )  # fmt: skip
        except BackendError as exc:
            self._delete_ifb(cls)
            raise CapabilityError(
                "duplicate_percentage needs an ifb device and a tc fw filter (skbedit, mirred) "
                "to give a duplicating netem a device of its own (kernels refuse one beside "
                f"other netems), which failed on kernel {self._kernel or os.uname().release}: "
                f"{exc}. Fix: a kernel with CONFIG_IFB, CONFIG_NET_CLS_FW, "
                "CONFIG_NET_ACT_SKBEDIT and CONFIG_NET_ACT_MIRRED"
            ) from exc
        except BaseException:
            self._delete_ifb(cls)
            raise

    def _delete(self, cls: _Class) -> None:
        index = self._ports.get(cls.dst)
        if cls.built and index is not None:
            if cls.ifb:
                with suppress(NetlinkError):
                    self._ipr.tc(
                        "del-filter", "fw", index=index, parent=ROOT, prio=_FW_PRIO,
                        handle=_MARK | cls.minor,
                    )  # fmt: skip
            else:
                self._delete_class(index, cls.minor)
        self._delete_ifb(cls)
        cls.built = False
        self._used.get(cls.dst, set()).discard(cls.minor)

    def _delete_ifb(self, cls: _Class) -> None:
        if cls.ifb:
            for index in self._ipr.link_lookup(ifname=cls.ifb):
                with suppress(NetlinkError):
                    self._ipr.link("del", index=index)
            cls.ifb = ""

    def _delete_class(self, index: int, minor: int) -> None:
        try:
            self._ipr.tc("del-class", index=index, handle=ROOT | minor)
        except NetlinkError as exc:
            if exc.code not in _GONE:
                raise BackendError(f"deleting HTB class 1:{minor:x} failed: {exc}") from exc

    def _reap(self) -> None:
        """Delete retired netems whose queue is empty (none of their frames is lost)."""
        queued: dict[str, dict[int, int]] = {}
        for cls in list(self._retiring):
            if cls.built and self._queued(cls, queued):
                continue
            with suppress(BackendError):  # the change is made; try again at the next one
                self._delete(cls)
                self._retiring.remove(cls)

    def _queued(self, cls: _Class, cache: dict[str, dict[int, int]]) -> int:
        """Packets ``cls``'s netem holds (HTB class stats of its port, read once per reap)."""
        if cls.ifb:
            found = self._ipr.link_lookup(ifname=cls.ifb)
            return sum(self._queue_lengths(found[0], "qdisc").values()) if found else 0
        if cls.dst not in self._ports:
            return 0
        if cls.dst not in cache:
            cache[cls.dst] = self._queue_lengths(self._ports[cls.dst], "class")
        return cache[cls.dst].get(cls.minor, 0)

    def _queue_lengths(self, index: int, what: str) -> dict[int, int]:
        """Handle minor -> packets queued, for the classes or qdiscs on ``index``."""
        lengths = {}
        with suppress(NetlinkError):
            dump = self._ipr.get_classes if what == "class" else self._ipr.get_qdiscs
            for msg in dump(index=index):
                stats = msg.get_attr("TCA_STATS2")
                queue = stats.get_attr("TCA_STATS_QUEUE") if stats else None
                lengths[msg["handle"] & 0xFFFF] = queue["qlen"] if queue else 0
        return lengths
