#!/usr/bin/env bash
# Build the docker-backend test image from Debian packages, with no container registry.
#
#   tools/build-images.sh            build pytest-enclave/debian:test unless it is up to date
#   PE_FORCE_REBUILD=1 tools/...     build even if it is up to date
#
# How: apt resolves the package set for an empty system (an empty dpkg status file, plus fake
# "installed" entries for packages only maintainer scripts need, see EXCLUDED), the .debs are
# fetched with `apt-get download` into $PE_DEB_CACHE (kept and reused across runs), each is
# unpacked with `dpkg-deb -x` into a temporary rootfs (no maintainer scripts run), a few
# files are fixed up (usr-merge, /etc/passwd, /etc/group, /tmp, busybox applet links,
# ld.so.cache, ...) and the tree is `docker import`ed.
#
# The image carries the label org.pytest-enclave.build-hash: a hash of this script and of
# the resolved "package=version" list. A run whose hash matches the existing image does
# nothing (a new Debian point release or an edit of this file rebuilds).
#
# Needs: root, a running Docker engine (.ci/docker-up.sh), Debian's apt with package lists.
set -euo pipefail

IMAGE=${PE_IMAGE:-pytest-enclave/debian:test}
PE_DEB_CACHE=${PE_DEB_CACHE:-/var/cache/pytest-enclave/debs}
LABEL_KEY=org.pytest-enclave.build-hash

# What the image is for: a shell and small tools (busybox), Python with its full standard
# library, etcd 3.4 (server and etcdctl), haproxy, and libc-bin for getent/ldconfig.
PACKAGES=(
    busybox-static
    libc-bin
    python3-minimal
    python3.11
    etcd-server
    etcd-client
    haproxy
)
# Needed only by maintainer scripts (which never run here): marked as already installed so
# apt does not pull them and what they depend on (perl, PAM, ...).
EXCLUDED=(
    adduser
    debconf
    dpkg
    init-system-helpers
    lsb-base
    passwd
    perl-base
    sysvinit-utils
    tar
    usr-is-merged
    usrmerge
)

ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
t0=$(ms)
log() {
    local d=$(($(ms) - t0))
    printf 'build-images: [%d.%ds] %s\n' $((d / 1000)) $((d % 1000 / 100)) "$*" >&2
}
die() {
    log "$*"
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (dpkg-deb -x must keep root ownership)"

# Host tools (all in a stock Debian 12 except docker, which .ci/docker-up.sh provides).
need_pkgs=()
command -v apt-get >/dev/null || die "apt-get is required (Debian host)"
command -v dpkg-deb >/dev/null || need_pkgs+=(dpkg)
command -v flock >/dev/null || need_pkgs+=(util-linux)
command -v sha256sum >/dev/null || need_pkgs+=(coreutils)
command -v tar >/dev/null || need_pkgs+=(tar)
command -v ldconfig >/dev/null || [[ -x /sbin/ldconfig ]] || need_pkgs+=(libc-bin)
if ((${#need_pkgs[@]})); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
command -v docker >/dev/null || die "docker CLI missing: run .ci/docker-up.sh first"
docker info >/dev/null 2>&1 || die "docker engine not reachable: run .ci/docker-up.sh first"

mkdir -p "$PE_DEB_CACHE"
# One build at a time on this machine (CI and xdist workers may race here).
exec 9>"$PE_DEB_CACHE/.build.lock"
flock 9

work=$(mktemp -d /var/tmp/pytest-enclave-build.XXXXXX)
trap 'rm -rf "$work"' EXIT

# ---------------------------------------------------------------------------------------------
# 1. Resolve the package set (name, version, architecture) as apt would for an empty system.
# ---------------------------------------------------------------------------------------------
status="$work/status"
write_status() {
    apt-cache show --no-all-versions "${EXCLUDED[@]}" 2>/dev/null | awk '
        /^Package:/ {p=$2} /^Version:/ {v=$2} /^Architecture:/ {a=$2}
        /^$/ { if (p != "") printf "Package: %s\nStatus: install ok installed\nVersion: %s\nArchitecture: %s\nMaintainer: none\nDescription: not in the image\n\n", p, v, a; p="" }
    ' >"$status" || true
}
resolve() {
    apt-get install -s --no-install-recommends -o Debug::NoLocking=1 \
        -o Dir::State::status="$status" "${PACKAGES[@]}" 2>&1
}
write_status
if ! out=$(resolve) || ! grep -q '^Inst ' <<<"$out"; then
    log "apt could not resolve the packages; running apt-get update once"
    apt-get update -qq
    write_status
    out=$(resolve) || {
        printf '%s\n' "$out" >&2
        die "apt could not resolve ${PACKAGES[*]}"
    }
fi
# "Inst libc6 (2.36-9+deb12u14 Debian:12.11/stable, Debian-Security:12/stable-security [amd64])"
mapfile -t resolved < <(
    awk '$1=="Inst" { v=$3; sub(/^\(/, "", v); a=""
                      for (i = 4; i <= NF; i++) if ($i ~ /^\[[a-z0-9-]+\]\)?$/) { a=$i; break }
                      gsub(/[\[\]()]/, "", a); print $2 "=" v "=" a }' \
        <<<"$out" | sort -u
)
((${#resolved[@]})) || die "no packages resolved"
hostarch=$(dpkg --print-architecture)
for r in "${resolved[@]}"; do
    a=${r##*=}
    [[ $a == all || $a == "$hostarch" ]] || die "unexpected architecture in $r"
done

script_sum=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)
build_hash=$(printf '%s\n' "$script_sum" "${resolved[@]}" | sha256sum | cut -c1-16)

current=$(docker image inspect -f "{{ index .Config.Labels \"$LABEL_KEY\" }}" "$IMAGE" 2>/dev/null || true)
if [[ $current == "$build_hash" && ${PE_FORCE_REBUILD:-0} != 1 ]]; then
    log "$IMAGE is up to date (build hash $build_hash); nothing to do"
    echo "build-images: done in $((($(ms) - t0) / 100 / 10)).$((($(ms) - t0) / 100 % 10))s (up to date)"
    exit 0
fi
log "building $IMAGE from ${#resolved[@]} packages (build hash $build_hash)"

# ---------------------------------------------------------------------------------------------
# 2. Fetch the .debs that are not in the cache yet.
# ---------------------------------------------------------------------------------------------
debfile() { # name version arch -> file name apt-get download uses (epoch ':' as %3a)
    printf '%s_%s_%s.deb' "$1" "${2//:/%3a}" "$3"
}
missing=()
for r in "${resolved[@]}"; do
    IFS='=' read -r name ver arch <<<"$r"
    [[ -s $PE_DEB_CACHE/$(debfile "$name" "$ver" "$arch") ]] || missing+=("$name=$ver")
done
if ((${#missing[@]})); then
    log "downloading ${#missing[@]} .deb(s) into $PE_DEB_CACHE"
    mkdir -p "$work/dl"
    (cd "$work/dl" && apt-get download -qq -o APT::Sandbox::User=root "${missing[@]}")
    mv -f "$work/dl"/*.deb "$PE_DEB_CACHE"/
else
    log "all ${#resolved[@]} .debs already in $PE_DEB_CACHE"
fi

# ---------------------------------------------------------------------------------------------
# 3. Unpack into a rootfs and fix up the minimum.
# ---------------------------------------------------------------------------------------------
root="$work/rootfs"
mkdir -p "$root"
log "unpacking into $root"
for r in "${resolved[@]}"; do
    IFS='=' read -r name ver arch <<<"$r"
    dpkg-deb -x "$PE_DEB_CACHE/$(debfile "$name" "$ver" "$arch")" "$root"
done

# usr-merge, as on a Debian 12 system: /bin, /sbin, /lib*, are links into /usr.
for d in bin sbin lib lib32 lib64 libx32; do
    if [[ -d $root/$d && ! -L $root/$d ]]; then
        mkdir -p "$root/usr/$d"
        cp -a "$root/$d/." "$root/usr/$d/"
        rm -rf "${root:?}/$d"
    fi
    [[ -e $root/usr/$d ]] || continue
    ln -sfn "usr/$d" "$root/$d"
done
for d in bin sbin lib; do
    [[ -e $root/$d ]] || { mkdir -p "$root/usr/$d" && ln -sfn "usr/$d" "$root/$d"; }
done

# busybox applets for every command no package ships (sh, sleep, nc, ping, ip, ...).
"$root/usr/bin/busybox" --list-full | while read -r applet; do
    [[ $applet == linuxrc ]] && continue
    dest="$root/$applet"
    [[ -e $dest || -L $dest ]] && continue
    mkdir -p "$(dirname "$dest")"
    ln -s /usr/bin/busybox "$dest"
done
[[ -e $root/usr/bin/sh ]] || ln -s /usr/bin/busybox "$root/usr/bin/sh"

# Files that a package's maintainer scripts or base-files would have made.
install -d -m 0755 "$root"/{etc,root,proc,sys,dev,run,var/lib,var/log,var/cache,home,mnt,srv,opt}
install -d -m 1777 "$root/tmp" "$root/var/tmp"
chmod 0700 "$root/root"
install -d -m 0700 "$root/var/lib/etcd"
install -d -m 0755 "$root/var/lib/haproxy" "$root/run/haproxy"
cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
haproxy:x:100:101::/var/lib/haproxy:/usr/sbin/nologin
etcd:x:101:102:etcd:/var/lib/etcd:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
daemon:x:1:
haproxy:x:101:
etcd:x:102:
nogroup:x:65534:
EOF
cat >"$root/etc/shadow" <<'EOF'
root:*:19000:0:99999:7:::
daemon:*:19000:0:99999:7:::
haproxy:*:19000:0:99999:7:::
etcd:*:19000:0:99999:7:::
nobody:*:19000:0:99999:7:::
EOF
chmod 0640 "$root/etc/shadow"
cat >"$root/etc/nsswitch.conf" <<'EOF'
passwd:   files
group:    files
shadow:   files
hosts:    files dns
networks: files
protocols: files
services: files
EOF
cat >"$root/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1	localhost ip6-localhost ip6-loopback
EOF
echo pytest-enclave >"$root/etc/hostname"
: >"$root/etc/resolv.conf"
ln -sfn /proc/self/mounts "$root/etc/mtab"
printf '%s\n' 'ip 0 IP' 'icmp 1 ICMP' 'tcp 6 TCP' 'udp 17 UDP' 'ipv6-icmp 58 IPv6-ICMP' \
    >"$root/etc/protocols"
if [[ -r /etc/os-release ]]; then
    cp /etc/os-release "$root/etc/os-release"
fi
printf '%s\n' "${resolved[@]}" >"$root/etc/pytest-enclave-packages"
# Documentation is not needed in a test image.
rm -rf "$root"/usr/share/{doc,man,info,lintian,bug}
ldconfig -r "$root"

# ---------------------------------------------------------------------------------------------
# 4. Import, check, and drop the previous image of the same tag if it is now dangling.
# ---------------------------------------------------------------------------------------------
log "importing"
old_id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
tar -C "$root" --numeric-owner -cf - . | docker import \
    --change 'CMD ["/bin/sh"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL $LABEL_KEY=$build_hash" \
    --change "LABEL org.pytest-enclave.owner=pytest-enclave" \
    --message "pytest-enclave test image ($build_hash)" \
    - "$IMAGE" >/dev/null

log "checking the image"
docker run --rm --network none "$IMAGE" sh -euc '
    python3 -c "import socket, json, http.server, urllib.request, sqlite3, ssl, asyncio"
    etcd --version | head -n1
    etcdctl version | head -n1
    haproxy -v | head -n1
    getent hosts localhost >/dev/null
    nc --help 2>&1 | head -n1 >/dev/null
' >&2 || die "image check failed"

new_id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
if [[ -n $old_id && $old_id != "$new_id" ]]; then
    docker image rm "$old_id" >/dev/null 2>&1 || true
fi
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
log "$IMAGE ${new_id:7:12} $((size / 1024 / 1024)) MiB"
echo "build-images: done in $((($(ms) - t0) / 100 / 10)).$((($(ms) - t0) / 100 % 10))s"
