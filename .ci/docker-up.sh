#!/usr/bin/env bash
# Make a Docker engine available for the docker-backend tests.
#
# Idempotent: if `docker info` already works, it only prints the engine version.
# Otherwise it installs Debian's docker.io when dockerd is missing, starts dockerd in the
# background (its own session, log in $PE_DOCKERD_LOG, pid in $PE_DOCKERD_PIDFILE) and waits
# up to $PE_DOCKERD_WAIT seconds for `docker info`. .ci/docker-down.sh stops that dockerd
# again (and only that one: it acts only when the pid file written here exists).
#
# The engine never needs a registry: the images the tests use are built locally by
# tools/build-images.sh (`docker import`), nothing is pulled.
#
# Defaults chosen for a test machine:
#   --bridge=none   no default "docker0" bridge with NAT to the outside; every container of
#                   ours joins a user-defined (internal) network, so none has a route out.
#                   (`docker run` without --network then gets no network at all.)
#   iptables and ip forwarding are left at Docker's defaults (FORWARD policy DROP,
#   net.ipv4.ip_forward=1) so that the machine looks like a stock Docker host; the previous
#   host state is recorded in $PE_DOCKERD_STATE and restored by docker-down.sh.
# Override the extra dockerd arguments with PE_DOCKERD_ARGS (e.g. PE_DOCKERD_ARGS="").
set -euo pipefail

PE_DOCKERD_LOG=${PE_DOCKERD_LOG:-/tmp/dockerd.log}
PE_DOCKERD_PIDFILE=${PE_DOCKERD_PIDFILE:-/tmp/pytest-enclave-dockerd.pid}
PE_DOCKERD_STATE=${PE_DOCKERD_STATE:-/tmp/pytest-enclave-dockerd.state}
PE_DOCKERD_WAIT=${PE_DOCKERD_WAIT:-60}
PE_DOCKERD_ARGS=${PE_DOCKERD_ARGS---bridge=none}

log() { printf 'docker-up: %s\n' "$*" >&2; }

engine_version() {
    docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})' 2>/dev/null
}

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root"
    exit 1
fi

# 1. Install the engine (and a CLI) if missing. policy-rc.d / no init means apt does not start it.
if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    log "installing docker.io from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
# nft is used by the tests and by docker-down.sh to restore the host's tables.
if ! command -v nft >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null
fi

# 2. Already running (ours or someone else's)? Then nothing to start.
if docker info >/dev/null 2>&1; then
    log "engine already running"
    echo "docker engine $(engine_version)"
    exit 0
fi

# A stale pid file (our dockerd died) must not make docker-down kill a reused pid later.
if [[ -f $PE_DOCKERD_PIDFILE ]]; then
    old=$(cat "$PE_DOCKERD_PIDFILE" 2>/dev/null || true)
    if [[ -n $old ]] && [[ $(cat "/proc/$old/comm" 2>/dev/null || true) == dockerd ]]; then
        log "dockerd pid $old is alive but 'docker info' fails; waiting for it"
    else
        rm -f "$PE_DOCKERD_PIDFILE"
    fi
fi

# 3. Start it.
if [[ ! -f $PE_DOCKERD_PIDFILE ]]; then
    # Record what the host looked like before, for docker-down.sh (only if not recorded yet:
    # a restart after a crash must not record Docker's own changes as the "before" state).
    if [[ ! -f $PE_DOCKERD_STATE ]]; then
        {
            echo "ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)"
            echo "ipv6_forwarding=$(cat /proc/sys/net/ipv6/conf/all/forwarding 2>/dev/null || echo)"
            # one "family name" per line, prefixed with "table="
            nft list tables 2>/dev/null | awk '$1=="table"{print "table=" $2 " " $3}' || true
        } >"$PE_DOCKERD_STATE"
    fi
    log "starting dockerd (log: $PE_DOCKERD_LOG)"
    # shellcheck disable=SC2086  # PE_DOCKERD_ARGS is a list of words on purpose
    setsid dockerd $PE_DOCKERD_ARGS >>"$PE_DOCKERD_LOG" 2>&1 </dev/null &
    echo $! >"$PE_DOCKERD_PIDFILE"
fi

# 4. Wait for it.
deadline=$((SECONDS + PE_DOCKERD_WAIT))
until docker info >/dev/null 2>&1; do
    pid=$(cat "$PE_DOCKERD_PIDFILE")
    if ! kill -0 "$pid" 2>/dev/null; then
        log "dockerd exited; last lines of $PE_DOCKERD_LOG:"
        tail -n 30 "$PE_DOCKERD_LOG" >&2 || true
        rm -f "$PE_DOCKERD_PIDFILE"
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        log "no 'docker info' after ${PE_DOCKERD_WAIT}s; last lines of $PE_DOCKERD_LOG:"
        tail -n 30 "$PE_DOCKERD_LOG" >&2 || true
        exit 1
    fi
    sleep 0.5
done

# dockerd writes its own pid file; prefer it in case setsid had to fork.
if [[ -s /var/run/docker.pid ]]; then
    cp /var/run/docker.pid "$PE_DOCKERD_PIDFILE"
fi
echo "docker engine $(engine_version)"
