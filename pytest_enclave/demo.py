"""The seed scenario (Kurtosis's "simulating a networking failure") on the netns backend.

Six services in ``main_subnetwork``; ``cassandra_node_2`` and ``app_service_2`` are moved to
``secondary_subnetwork``; then 90 % loss between the two. At every step the diagram is drawn
and the loss between every pair of services is measured with real datagrams.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from . import measure, probe
from .config import ConnectionConfig, ServiceConfig, UpdateServiceConfig
from .diagram import render_diagram
from .enclave import Enclave

MAIN_SUBNETWORK = "main_subnetwork"
SECONDARY_SUBNETWORK = "secondary_subnetwork"
SERVICES = [
    "cassandra_node_1",
    "cassandra_node_2",
    "cassandra_node_3",
    "app_service_1",
    "app_service_2",
    "single_port_proxy",
]


def run(out: TextIO = sys.stdout, count: int = 2000) -> dict[str, float]:
    """Run the scenario, print it, return the worst deviations seen (for the caller to check)."""

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    def show(step: str) -> dict[tuple[str, str], float]:
        say(f"\n{step}\n")
        say(render_diagram(enclave))
        loss = measure.loss_matrix(enclave, SERVICES, count)
        say(f"\nmeasured loss, {count} datagrams per directed pair:\n")
        say(measure.render_loss_matrix(loss, SERVICES))
        return loss

    started = time.monotonic()
    with Enclave() as enclave:
        say(f"enclave {enclave.id} on the netns backend")
        for name in SERVICES:
            enclave.add_service(
                name=name,
                config=ServiceConfig(
                    cmd=probe.command(), ports={"probe": probe.PORT}, subnetwork=MAIN_SUBNETWORK
                ),
            )
        step1 = show("Step 1: all services in main_subnetwork, all connections allowed")
        for name in ("cassandra_node_2", "app_service_2"):
            enclave.update_service(name, UpdateServiceConfig(subnetwork=SECONDARY_SUBNETWORK))
        step2 = show(
            "Step 2: cassandra_node_2 and app_service_2 moved to secondary_subnetwork "
            "(default connection: allowed, nothing changes)"
        )
        enclave.set_connection(
            (MAIN_SUBNETWORK, SECONDARY_SUBNETWORK),
            config=ConnectionConfig(packet_loss_percentage=90.0),
        )
        step3 = show("Step 3: 90 % packet loss between main_subnetwork and secondary_subnetwork")
        secondary = {"cassandra_node_2", "app_service_2"}
        crossing = [v for (a, b), v in step3.items() if (a in secondary) != (b in secondary)]
        inside = [v for (a, b), v in step3.items() if (a in secondary) == (b in secondary)]
        summary = {
            "max_loss_before": max(list(step1.values()) + list(step2.values())),
            "max_loss_inside": max(inside),
            "min_loss_crossing": min(crossing),
            "max_loss_crossing": max(crossing),
        }
        say("\n" + enclave.timeline.render())
    say(
        f"\nsummary: crossing pairs lost {summary['min_loss_crossing'] * 100:.1f}-"
        f"{summary['max_loss_crossing'] * 100:.1f} % (configured 90 %), pairs within a "
        f"subnetwork lost at most {summary['max_loss_inside'] * 100:.1f} %; enclave removed; "
        f"{time.monotonic() - started:.1f}s in all"
    )
    return summary
