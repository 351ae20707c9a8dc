"""Benchmark the netns backend against doing the same with `ip`/`nft` commands.

Run as root: ``python benchmarks/netns_lifecycle.py [--runs 20]``. Prints medians over the
runs and ratios, all measured in this one process (machines are noisy: compare ratios).

(a) the seed topology: create an enclave, 6 services (a `sleep` process each, in its own
    namespace on the bridge), wait until they run, apply one partition, destroy; against a
    shell script of `ip` commands building the same namespaces, links (the host link too),
    processes and nft rule. The script does less at the end: it does not wait for the killed
    processes, and leaves the namespaces' links to the kernel's asynchronous cleanup.
(b) time for one connection change to return, at 6, 50 and 200 services (half of them in a
    second subnetwork, alternating BLOCKED and 30 % loss); against `nft -f` of the same
    ruleset run as a command in the enclave's namespace.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _timing import timed  # noqa: E402  # beside this script

from pytest_enclave import BLOCKED, ConnectionConfig, Enclave, ServiceConfig  # noqa: E402
from pytest_enclave.demo import SERVICES as SEED  # noqa: E402
from pytest_enclave.shapers.nftables import render  # noqa: E402

SLEEP = ["sleep", "1000"]


def ours_seed() -> None:
    with Enclave() as enclave:
        for name in SEED:
            enclave.add_service(name, ServiceConfig(cmd=SLEEP, subnetwork="main"))
        enclave.partition(["cassandra_node_2", "app_service_2"])


IP_SCRIPT = r"""
set -e
P=pebench
ip netns add $P-hub
ip -n $P-hub link add br0 type bridge
ip -n $P-hub link set br0 up
ip link add ${P}h type veth peer name up0 netns $P-hub
ip addr add 198.19.254.1/24 dev ${P}h
ip link set ${P}h up
ip -n $P-hub link set up0 master br0 up
i=0
for name in {names}; do
  i=$((i+1))
  ip netns add $P-$name
  ip -n $P-hub link add p$i type veth peer name eth0 netns $P-$name
  ip -n $P-hub link set p$i master br0 up
  ip -n $P-$name addr add 198.19.254.$((i+1))/24 dev eth0
  ip -n $P-$name link set eth0 up
  ip -n $P-$name link set lo up
  ip netns exec $P-$name sleep 1000 >/dev/null 2>&1 &
done
ip netns exec $P-hub nft -f - <<'EOF'
table bridge t {
  chain forward {
    type filter hook forward priority 0; policy accept;
    ip saddr { 198.19.254.3, 198.19.254.6 } ip daddr != { 198.19.254.3, 198.19.254.6 } drop
    ip daddr { 198.19.254.3, 198.19.254.6 } ip saddr != { 198.19.254.3, 198.19.254.6 } drop
  }
}
EOF
for name in {names}; do
  ip netns pids $P-$name | xargs -r kill -9
  ip netns del $P-$name
done
ip link del ${P}h
ip netns del $P-hub
"""


def ip_seed() -> None:
    script = IP_SCRIPT.replace("{names}", " ".join(SEED))
    subprocess.run(["bash", "-c", script], check=True)


def bench_seed(runs: int) -> None:
    a = timed(ours_seed, runs)
    b = timed(ip_seed, runs)
    ma, mb = statistics.median(a), statistics.median(b)
    print(
        f"(a) seed lifecycle, {runs} runs: pytest-enclave median {ma * 1000:.1f} ms "
        f"(min {min(a) * 1000:.1f}), ip-command script median {mb * 1000:.1f} ms "
        f"(min {min(b) * 1000:.1f}); ip script / pytest-enclave = {mb / ma:.2f}x"
    )


def bench_change(sizes: list[int], runs: int) -> None:
    loss = ConnectionConfig(packet_loss_percentage=30.0)
    for size in sizes:
        with Enclave() as enclave:
            for i in range(size):
                sub = "main" if i % 2 == 0 else "secondary"
                enclave.add_service(f"s{i}", ServiceConfig(cmd=SLEEP, subnetwork=sub))
            configs = [BLOCKED, loss]
            samples = []
            for i in range(runs):
                start = time.perf_counter()
                enclave.set_connection(("main", "secondary"), configs[i % 2])
                samples.append(time.perf_counter() - start)
            script = render(
                "pytest_enclave", enclave.policies, {n: s.ip for n, s in enclave.services.items()}
            )
            with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as f:
                f.write(script)
            hub = f"{enclave.id}-_hub"
            cmd = ["ip", "netns", "exec", hub, "nft", "-f", f.name]
            nft = timed(lambda cmd=cmd: subprocess.run(cmd, check=True), runs, warm=False)
            os.unlink(f.name)
            pairs = sum(1 for _ in enclave.policies.pairs())
        m, mn = statistics.median(samples), statistics.median(nft)
        print(
            f"(b) connection change at {size:>3} services ({pairs} directed pairs shaped): "
            f"median {m * 1000:.2f} ms (max {max(samples) * 1000:.2f}); `nft -f` of the same "
            f"ruleset {mn * 1000:.2f} ms; nft command / pytest-enclave = {mn / m:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="*", default=[6, 50, 200])
    args = parser.parse_args()
    print(f"kernel {os.uname().release}, python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    bench_seed(args.runs)
    bench_change(args.sizes, args.runs)


if __name__ == "__main__":
    main()
