"""The nftables shaper: blocks, random loss and rejects, per directed pair, atomically.

One ``bridge`` table filters the forward hook of the namespace that holds the enclave's bridge.
Each change replaces the whole table in ONE netlink transaction (``delete table`` + ``table
{...}`` in one buffer), so there is no moment where a partition is half applied or one way
only. The bridge filter sees every frame, so established TCP connections are cut as well.
Fields only netem can honour raise :class:`CapabilityError` naming them (or are handed to a
netem shaper, when one is given).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import suppress
from typing import TYPE_CHECKING

from .._linux import NamespaceWorker
from ..config import ConnectionConfig
from ..errors import BackendError, CapabilityError
from ..matrix import PolicyTable
from ._libnft import Nft

if TYPE_CHECKING:
    from .netem import NetemShaper, Steer

__all__ = ["RANDOM_LOSS", "REJECT", "NftablesShaper", "probe_script", "render"]

_LOSS_SCALE = 10000  # loss resolution: 0.01 %
REJECT = "meta l4proto tcp reject with tcp reset"
RANDOM_LOSS = "numgen random mod 100 < 50 drop"


def probe_script(rule: str) -> str:
    """A throwaway bridge table holding ``rule``: to ask the kernel whether it takes it."""
    return (
        "table bridge pe_probe {\n chain f {\n type filter hook forward priority 0;\n"
        f" {rule}\n }}\n}}\n"
    )


def _verdict(config: ConnectionConfig, chains: dict[str, str], netem: bool) -> str:
    if netem and config.needs_netem:
        return ""  # netem does this pair's loss too (once): the frame is marked for it instead
    if config.is_blocked:
        if config.reject:
            chains["reject_all"] = "meta l4proto tcp reject with tcp reset\n    reject"
            return "jump reject_all"
        return "drop"
    threshold = round(config.packet_loss_percentage * _LOSS_SCALE / 100)
    if threshold <= 0:  # only 0 % itself: below the resolution is refused by check()
        return ""
    name = f"loss_{threshold}"
    chains[name] = f"numgen random mod {_LOSS_SCALE} < {threshold} drop"
    return f"jump {name}"


def render(
    table_name: str,
    table: PolicyTable,
    addresses: Mapping[str, str],
    steer: Mapping[tuple[str, str], Steer] | None = None,
) -> str:
    """The nft script that replaces table ``table_name`` by the policies of ``table``.

    ``steer`` (from a netem shaper) maps each directed pair whose connection needs netem to
    the skb priority (its HTB class) or mark its frames get, and nft leaves the pair's loss
    to netem.
    """
    chains: dict[str, str] = {}
    src_map: list[str] = []
    for i, cls in enumerate(table.classes):
        entries = []
        for dst, config in cls.towards.items():
            verdict = _verdict(config, chains, steer is not None)
            if verdict:
                entries.append(f"{addresses[dst]} : {verdict}")
        if not entries:
            continue
        chains[f"from_{i}"] = f"ip daddr vmap {{ {', '.join(entries)} }}"
        src_map.extend(f"{addresses[s]} : jump from_{i}" for s in cls.sources)
    body = [f"  chain {name} {{\n    {rule}\n  }}" for name, rule in chains.items()]
    forward = "    type filter hook forward priority 0; policy accept;"
    for key, show in (("priority", lambda v: f"{v >> 16:x}:{v & 0xFFFF:x}"), ("mark", hex)):
        pairs = [
            f"{addresses[s]} . {addresses[d]} : {show(getattr(how, key))}"
            for (s, d), how in (steer or {}).items()
            if getattr(how, key)
        ]
        if pairs:
            forward += f"\n    meta {key} set ip saddr . ip daddr map {{ {', '.join(pairs)} }}"
    if src_map:
        forward += f"\n    ip saddr vmap {{ {', '.join(src_map)} }}"
    body.append(f"  chain forward {{\n{forward}\n  }}")
    return (
        f"table bridge {table_name}\ndelete table bridge {table_name}\n"
        f"table bridge {table_name} {{\n" + "\n".join(body) + "\n}\n"
    )


class NftablesShaper:
    """Applies policy tables with nftables in the namespace at ``netns_path`` (None: ours).

    ``netem`` is an optional companion for the fields nftables cannot do (see
    :mod:`.netem`); without one, such fields raise CapabilityError, which names them, the
    kernel and ``netem_missing`` (why there is no netem here).
    """

    def __init__(
        self,
        netns_path: str | None,
        table_name: str,
        kernel: str = "",
        drop_on_close: bool = True,
        netem: NetemShaper | None = None,
        netem_missing: str = "",
        netem_backend_gap: str = "",
    ) -> None:
        self.table_name = table_name
        # False when the namespace is the enclave's own: deleting it removes the table
        # (and an nft transaction less makes teardown ~10 ms faster).
        self._drop_on_close = drop_on_close
        self._kernel = kernel
        self._worker = NamespaceWorker(netns_path)
        self._nft: Nft | None = None
        self._applied = False
        self.netem = netem
        self._netem_missing = netem_missing
        # set where the kernel has netem but the backend does not drive it (docker, for now)
        self._netem_backend_gap = netem_backend_gap
        self._reject: bool | None = None

    def check(self, table: PolicyTable) -> None:
        configs = table.configs
        if any(c.reject for c in configs) and not self._reject_ok():
            where = f" ({self._kernel})" if self._kernel else ""
            raise CapabilityError(
                "reject=True needs nftables' reject in the bridge family (module "
                f"nft_reject_bridge), which this kernel{where} lacks: use BLOCKED (a silent "
                "drop) instead, or a kernel with CONFIG_NFT_BRIDGE_REJECT"
            )
        if self.netem is not None:
            self.netem.check(table)
            return
        for config in configs:
            fields = config.needs_netem
            if fields and self._netem_backend_gap:
                raise CapabilityError(
                    f"{', '.join(fields)} ({config.describe()}) needs netem, which "
                    f"{self._netem_backend_gap}; only packet_loss_percentage and BLOCKED work "
                    "here. Use the netns backend for these fields"
                )
            if fields:
                where = f" ({self._kernel})" if self._kernel else ""
                why = f": {self._netem_missing}" if self._netem_missing else ""
                raise CapabilityError(
                    f"{', '.join(fields)} ({config.describe()}) needs the sch_netem qdisc, which "
                    f"this kernel{where} lacks{why}. Only "
                    "packet_loss_percentage and BLOCKED work here. Fix: a kernel with "
                    "CONFIG_NET_SCH_NETEM (or `modprobe sch_netem`), or run these tests in "
                    "user-mode-linux (`python -m pytest_enclave.uml -- pytest ...`); "
                    "`python -m pytest_enclave doctor` says what this machine has"
                )

    def _reject_ok(self) -> bool:
        if self._reject is None:
            self._reject = self._worker.call(lambda: self._ctx().accepts(probe_script(REJECT)))
        return self._reject

    def apply(self, table: PolicyTable, addresses: Mapping[str, str]) -> None:
        """Replace what is in force by ``table``: netem classes first, then one nft transaction.

        With netem, the changed pairs' classes are built beside the old ones, the transaction
        switches every pair to its class at once, then the old classes are retired.
        """
        netem = self.netem
        steer = netem.stage(table) if netem is not None else None
        try:
            script = render(self.table_name, table, addresses, steer)
            self._worker.call(lambda: self._ctx().run(script))
        except BaseException:
            if netem is not None:
                netem.abort()
            raise
        if netem is not None:
            netem.commit()
        self._applied = True

    def _ctx(self) -> Nft:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    def close(self, keep: bool = False) -> None:
        """Remove our table (``keep``: leave it in force) and free the thread and sockets."""

        def drop() -> None:
            if self._applied and self._drop_on_close and not keep:
                # BackendError: already gone (e.g. its namespace was removed first)
                with suppress(BackendError):
                    self._ctx().run(f"delete table bridge {self.table_name}")
            if self._nft is not None:
                self._nft.close()
                self._nft = None

        try:
            self._worker.call(drop)
            self._worker.close()
        finally:
            if self.netem is not None:
                self.netem.close(keep=keep)
