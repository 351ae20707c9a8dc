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

from .._linux import NamespaceWorker
from ..config import ConnectionConfig
from ..errors import BackendError, CapabilityError
from ..matrix import PolicyTable
from ._libnft import Nft

__all__ = ["NftablesShaper", "render"]

_LOSS_SCALE = 10000  # loss resolution: 0.01 %


def _verdict(config: ConnectionConfig, chains: dict[str, str]) -> str:
    if config.is_blocked:
        if config.reject:
            chains["reject_all"] = "meta l4proto tcp reject with tcp reset\n    reject"
            return "jump reject_all"
        return "drop"
    threshold = round(config.packet_loss_percentage * _LOSS_SCALE / 100)
    if threshold <= 0:
        return ""
    name = f"loss_{threshold}"
    chains[name] = f"numgen random mod {_LOSS_SCALE} < {threshold} drop"
    return f"jump {name}"


def render(table_name: str, table: PolicyTable, addresses: Mapping[str, str]) -> str:
    """The nft script that replaces table ``table_name`` by the policies of ``table``."""
    chains: dict[str, str] = {}
    src_map: list[str] = []
    for i, cls in enumerate(table.classes):
        entries = []
        for dst, config in cls.towards.items():
            verdict = _verdict(config, chains)
            if verdict:
                entries.append(f"{addresses[dst]} : {verdict}")
        if not entries:
            continue
        chains[f"from_{i}"] = f"ip daddr vmap {{ {', '.join(entries)} }}"
        src_map.extend(f"{addresses[s]} : jump from_{i}" for s in cls.sources)
    body = [f"  chain {name} {{\n    {rule}\n  }}" for name, rule in chains.items()]
    forward = "    type filter hook forward priority 0; policy accept;"
    if src_map:
        forward += f"\n    ip saddr vmap {{ {', '.join(src_map)} }}"
    body.append(f"  chain forward {{\n{forward}\n  }}")
    return (
        f"table bridge {table_name}\ndelete table bridge {table_name}\n"
        f"table bridge {table_name} {{\n" + "\n".join(body) + "\n}\n"
    )


class NftablesShaper:
    """Applies policy tables with nftables in the namespace at ``netns_path`` (None: ours).

    ``netem`` is an optional second shaper for the fields nftables cannot do; without one,
    such fields raise CapabilityError.
    """

    def __init__(
        self, netns_path: str | None, table_name: str, kernel: str = "", drop_on_close: bool = True
    ) -> None:
        self.table_name = table_name
        # False when the namespace is the enclave's own: deleting it removes the table
        # (and an nft transaction less makes teardown ~10 ms faster).
        self._drop_on_close = drop_on_close
        self._kernel = kernel
        self._worker = NamespaceWorker(netns_path)
        self._nft: Nft | None = None
        self._applied = False
        self.netem_fields_ok = False  # set by a netem-capable composite
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
        if self.netem_fields_ok:
            return
        for config in configs:
            fields = config.needs_netem
            if fields:
                raise CapabilityError(
                    f"{', '.join(fields)} ({config.describe()}) needs the sch_netem qdisc, which "
                    f"this kernel{f' ({self._kernel})' if self._kernel else ''} lacks; only "
                    "packet_loss_percentage and BLOCKED work here. Run `python -m "
                    "pytest_enclave doctor` for how to get netem"
                )

    def _reject_ok(self) -> bool:
        if self._reject is None:
            probe = (
                "table bridge pe_probe {\n chain f {\n type filter hook forward priority 0;\n"
                " meta l4proto tcp reject with tcp reset\n }\n}\n"
            )
            self._reject = self._worker.call(lambda: self._ctx().accepts(probe))
        return self._reject

    def apply(self, table: PolicyTable, addresses: Mapping[str, str]) -> None:
        script = render(self.table_name, table, addresses)
        self._worker.call(lambda: self._ctx().run(script))
        self._applied = True

    def dump(self) -> object:
        """The table as nft JSON (for reports and tests)."""
        return self._worker.call(
            lambda: self._ctx().run_json(f"list table bridge {self.table_name}")
        )

    def _ctx(self) -> Nft:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    def close(self) -> None:
        def drop() -> None:
            if self._applied and self._drop_on_close:
                # BackendError: already gone (e.g. its namespace was removed first)
                with suppress(BackendError):
                    self._ctx().run(f"delete table bridge {self.table_name}")
            if self._nft is not None:
                self._nft.close()
                self._nft = None

        self._worker.call(drop)
        self._worker.close()
