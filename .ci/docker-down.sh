#!/usr/bin/env bash
# Stop the dockerd that .ci/docker-up.sh started, and only that one.
#
# Acts only when docker-up.sh's pid file exists (a dockerd someone else runs is left alone).
# Sends SIGTERM (dockerd then stops its containers and its containerd), waits up to
# $PE_DOCKERD_STOP_WAIT seconds, then SIGKILL. Afterwards it puts back what starting Docker
# changed on the host, as recorded by docker-up.sh in $PE_DOCKERD_STATE:
#   - net.ipv4.ip_forward / net.ipv6.conf.all.forwarding
#   - nftables tables that did not exist before and that Docker made through iptables-nft
#     ("ip filter", "ip nat", ... containing a DOCKER chain). Tables that existed before,
#     or that hold no Docker chain, are never touched.
# Images, volumes and networks stay in /var/lib/docker.
set -euo pipefail

PE_DOCKERD_PIDFILE=${PE_DOCKERD_PIDFILE:-/tmp/pytest-enclave-dockerd.pid}
PE_DOCKERD_STATE=${PE_DOCKERD_STATE:-/tmp/pytest-enclave-dockerd.state}
PE_DOCKERD_STOP_WAIT=${PE_DOCKERD_STOP_WAIT:-60}

log() { printf 'docker-down: %s\n' "$*" >&2; }

if [[ ! -f $PE_DOCKERD_PIDFILE ]]; then
    log "no $PE_DOCKERD_PIDFILE: dockerd was not started by docker-up.sh, nothing to do"
    exit 0
fi

pid=$(cat "$PE_DOCKERD_PIDFILE")
if [[ -n $pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null || true) == dockerd ]]; then
    log "stopping dockerd pid $pid"
    kill -TERM "$pid"
    deadline=$((SECONDS + PE_DOCKERD_STOP_WAIT))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "dockerd did not exit in ${PE_DOCKERD_STOP_WAIT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
            break
        fi
        sleep 0.2
    done
    # dockerd's managed containerd normally exits with it; wait briefly for it as well.
    for _ in $(seq 50); do
        pgrep -f '^containerd --config /var/run/docker/containerd/containerd.toml' >/dev/null || break
        sleep 0.2
    done
    log "dockerd stopped"
else
    log "dockerd pid '$pid' is not running (stale pid file)"
fi
rm -f "$PE_DOCKERD_PIDFILE"

# Put back the host state recorded before dockerd started.
if [[ -f $PE_DOCKERD_STATE ]]; then
    ipf=$(sed -n 's/^ip_forward=//p' "$PE_DOCKERD_STATE")
    if [[ -n $ipf && $(cat /proc/sys/net/ipv4/ip_forward) != "$ipf" ]]; then
        echo "$ipf" >/proc/sys/net/ipv4/ip_forward
        log "restored net.ipv4.ip_forward=$ipf"
    fi
    ip6f=$(sed -n 's/^ipv6_forwarding=//p' "$PE_DOCKERD_STATE")
    if [[ -n $ip6f && -w /proc/sys/net/ipv6/conf/all/forwarding &&
        $(cat /proc/sys/net/ipv6/conf/all/forwarding) != "$ip6f" ]]; then
        echo "$ip6f" >/proc/sys/net/ipv6/conf/all/forwarding
        log "restored net.ipv6.conf.all.forwarding=$ip6f"
    fi
    if command -v nft >/dev/null 2>&1; then
        while read -r _ family name; do
            [[ -n ${family:-} ]] || continue
            if grep -qxF "table=$family $name" "$PE_DOCKERD_STATE"; then
                continue # existed before Docker: not ours
            fi
            # (read it whole first: `nft ... | grep -q` can fail on SIGPIPE under pipefail)
            rules=$(nft list table "$family" "$name" 2>/dev/null || true)
            if grep -qE '^\s*chain DOCKER(\s|-|\{)' <<<"$rules"; then
                nft delete table "$family" "$name"
                log "deleted Docker's leftover nft table $family $name"
            fi
        done < <(nft list tables 2>/dev/null | awk '$1=="table"{print $1, $2, $3}')
    fi
    rm -f "$PE_DOCKERD_STATE"
fi
