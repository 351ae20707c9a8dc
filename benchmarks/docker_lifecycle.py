"""Benchmark the docker backend against the raw docker SDK doing the same, and the netns backend.

Run as root with a local engine and the test image (``bash .ci/docker-up.sh && bash
tools/build-images.sh``): ``python benchmarks/docker_lifecycle.py [--runs 10]``. Prints medians
over the runs and ratios, all measured in this one process (machines are noisy: compare
ratios).

The seed topology (6 services, a ``sleep`` each) from nothing to nothing:

- docker backend: ``Enclave(backend="docker")``, 6 ``add_service``, one partition, close.
- raw docker SDK: what a hand-written fixture does for the same enclave: an internal network
  with the same addresses, 6 ``containers.run`` (fixed address, alias, init, same DNS
  settings), force-remove them one by one, remove the network. No shaping, no route removal.
- netns backend: the same lifecycle as the docker backend, with processes in namespaces.

The docker backend removes its containers in parallel at close; the raw version removes them
one by one, as a hand-written fixture usually does. Starting is sequential in both (the
engine's ``start`` dominates: about 0.2 s per container here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import docker  # noqa: E402
from _timing import timed  # noqa: E402  # beside this script
from docker.types import EndpointConfig, IPAMConfig, IPAMPool  # noqa: E402

from pytest_enclave import Enclave, ServiceConfig  # noqa: E402
from pytest_enclave.demo import SERVICES as SEED  # noqa: E402

IMAGE = "pytest-enclave/debian:test"
SLEEP = ["sleep", "1000"]
LABELS = {"org.pytest-enclave.owner": f"benchmark:{os.getpid()}"}


def ours(backend: str) -> Callable[[], None]:
    def run() -> None:
        image = IMAGE if backend == "docker" else None
        with Enclave(backend=backend) as enclave:
            for name in SEED:
                enclave.add_service(name, ServiceConfig(image=image, cmd=SLEEP, subnetwork="main"))
            enclave.partition(["cassandra_node_2", "app_service_2"])

    return run


def raw_sdk(client: docker.DockerClient, parallel_remove: bool = False) -> Callable[[], None]:
    """The same enclave with the docker SDK's high-level API, on 198.19.254.0/24.

    ``parallel_remove``: remove the containers from threads at once, as the backend does.
    """

    def run() -> None:
        pool = IPAMPool(
            subnet="198.19.254.0/24", iprange="198.19.254.128/25", gateway="198.19.254.1"
        )
        network = client.networks.create(
            "pebench-net",
            driver="bridge",
            internal=True,
            check_duplicate=True,
            ipam=IPAMConfig(pool_configs=[pool]),
            options={"com.docker.network.bridge.name": "pebenchd"},
            labels=LABELS,
        )
        containers = []
        for i, name in enumerate(SEED, start=2):
            endpoint = EndpointConfig(
                client.api.api_version, aliases=[name], ipv4_address=f"198.19.254.{i}"
            )
            containers.append(
                client.containers.run(
                    IMAGE,
                    SLEEP,
                    detach=True,
                    name=f"pebench-{name}",
                    hostname=name,
                    network=network.name,
                    networking_config={network.name: endpoint},
                    dns=["127.0.0.1"],
                    init=True,
                    labels=LABELS,
                )
            )
        if parallel_remove:
            threads = [
                threading.Thread(target=c.remove, kwargs={"force": True}) for c in containers
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for container in containers:
                container.remove(force=True)
        network.remove()

    return run


def line(label: str, samples: list[float]) -> str:
    median = statistics.median(samples)
    return (
        f"{label:<30} median {median * 1000:7.1f} ms  (min {min(samples) * 1000:7.1f}, "
        f"max {max(samples) * 1000:7.1f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    client = docker.from_env()
    print(
        f"kernel {os.uname().release}, python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
        f"docker engine {client.version()['Version']}, docker SDK {docker.__version__}"
    )
    print(f"seed topology lifecycle (6 services, sleep), {args.runs} runs each:")
    results = {
        "docker backend": timed(ours("docker"), args.runs),
        "raw docker SDK": timed(raw_sdk(client), args.runs),
        "raw SDK, parallel removal": timed(raw_sdk(client, parallel_remove=True), args.runs),
        "netns backend": timed(ours("netns"), args.runs),
    }
    for label, samples in results.items():
        print(line(label, samples))
    med = {label: statistics.median(s) for label, s in results.items()}
    print(
        f"docker backend / raw docker SDK = {med['docker backend'] / med['raw docker SDK']:.2f}x "
        "(target <= 1.2x); against the raw SDK removing in parallel too = "
        f"{med['docker backend'] / med['raw SDK, parallel removal']:.2f}x; "
        f"docker backend / netns backend = {med['docker backend'] / med['netns backend']:.1f}x"
    )
    client.close()


if __name__ == "__main__":
    main()
