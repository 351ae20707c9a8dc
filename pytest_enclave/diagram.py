"""Draw an enclave as the Kurtosis docs do: one column per subnetwork."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .enclave import Enclave

__all__ = ["render_diagram"]


def render_diagram(enclave: Enclave, title: str = "Kurtosis enclave", width: int = 53) -> str:
    """The seed's box drawing: ``|`` between subnetworks whose connection is not allowed,
    ``.`` where it is."""
    columns: dict[str, list[str]] = {}
    for service in enclave.services.values():
        columns.setdefault(service.subnetwork, []).append(service.name)
    names = list(columns) or ["(no services)"]
    count = len(names)
    col = (width - (count - 1)) // count
    inner = col * count + count - 1

    def seps(fill: str) -> list[str]:
        out = []
        for a, b in zip(names, names[1:]):
            out.append(
                fill if fill == "-" else ("." if enclave.connection(a, b).is_allowed else "|")
            )
        return out

    def row(cells: list[str], between: list[str]) -> str:
        text = "".join(
            c.center(col) + (between[i] if i < len(between) else "") for i, c in enumerate(cells)
        )
        return f" |{text}|"

    depth = max((len(v) for v in columns.values()), default=0)
    lines = [
        title.center(inner + 3).rstrip(),
        "  " + "-" * inner,
        row(names, ["|"] * (count - 1)),
        " |" + "-" * inner + "|",
        row([""] * count, seps(".")),
    ]
    for i in range(depth):
        cells = [columns.get(n, [])[i] if i < len(columns.get(n, [])) else "" for n in names]
        lines.append(row(cells, seps(".")))
    lines.append(row([""] * count, seps(".")))
    lines.append("  " + "-" * inner)
    return "\n".join(lines)
