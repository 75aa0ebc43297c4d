#!/usr/bin/env bash
# callctl Asterisk lab: Asterisk 22 (Debian sid) in a cached chroot, bound to 127.0.0.1.
#
#   lab/lab.sh build        build the chroot once (cached), install sipp on the host
#   lab/lab.sh up           (re)start Asterisk with conf/asterisk + the product dialplan
#   lab/lab.sh down         stop it (core stop now, then kill)
#   lab/lab.sh status       is it up? endpoints and channels
#   lab/lab.sh cli ARGS...  run one Asterisk CLI command (asterisk -rx "ARGS")
#
# Fixed addresses: PJSIP UDP 127.0.0.1:5060 (carrier in), phones at 127.0.0.1:5070,
# FastAGI daemon at 127.0.0.1:4573, AMI 127.0.0.1:5038, RTP 20000-20999.
# Env: CALLCTL_LAB_CACHE (default /var/cache/callctl): where the chroot lives.
#      CALLCTL_LAB_SEED: an already built chroot to copy instead of running mmdebstrap
#                        (copied only when nothing is mounted inside it).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CALLCTL_LAB_CACHE:-/var/cache/callctl}"
ROOT="$CACHE/asterisk-sid"
STATE="$REPO/var/lab"
LOG="$STATE/asterisk.log"
PIDFILE="$STATE/asterisk.pid"
ASTRUN="$ROOT/run/asterisk"     # the chroot's /var/run is an absolute symlink to /run
SIP_ADDR=127.0.0.1
SIP_PORT=5060
MIRROR="${CALLCTL_LAB_MIRROR:-http://deb.debian.org/debian}"
BOOT_TIMEOUT="${CALLCTL_LAB_BOOT_TIMEOUT:-60}"

say() { echo "lab: $*" >&2; }
die() { echo "lab: ERROR: $*" >&2; exit 1; }

is_built() { [[ -f "$ROOT/.callctl-ready" && -x "$ROOT/usr/sbin/asterisk" ]]; }

# Is anything (proc, dev, ...) mounted under $1?
has_mounts() { awk -v d="$(readlink -f "$1")" '$2==d || index($2, d"/")==1 {f=1} END {exit !f}' /proc/mounts; }

apt_install_host() {   # apt_install_host PACKAGE BINARY
    command -v "$2" >/dev/null 2>&1 && return 0
    say "installing $1 on the host"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$1" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$1" >/dev/null; }
    command -v "$2" >/dev/null 2>&1 || die "could not install $1"
}

# Fix-ups that make the chroot usable as root and fast; idempotent, run on build and up.
prepare_root() {
    local r="$1" d
    # Files owned by the in-chroot asterisk user are not readable for root here: own them as root.
    for d in etc var/lib var/log var/spool var/cache usr/share; do
        [[ -d "$r/$d" ]] || continue
        find "$r/$d" -maxdepth 1 -mindepth 1 -type d -user "$(chroot "$r" id -u asterisk 2>/dev/null || echo 999999)" \
            -exec chown -R root:root {} + 2>/dev/null || true
    done
    for d in etc/asterisk var/lib/asterisk var/log/asterisk var/spool/asterisk var/cache/asterisk usr/share/asterisk; do
        [[ -e "$r/$d" ]] && chown -R root:root "$r/$d"
    done
    mkdir -p "$r/run/asterisk" "$r/var/log/asterisk" "$r/var/lib/asterisk" "$r/var/spool/asterisk"
    # No DNS inside: every lookup stalls for seconds here. Names we need come from /etc/hosts.
    rm -f "$r/etc/resolv.conf"
    echo "# callctl lab: no DNS on purpose (lookups stall); see /etc/hosts" > "$r/etc/resolv.conf"
    printf '127.0.0.1\tlocalhost %s lab\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$(hostname)" > "$r/etc/hosts"
    # Resolve hosts from files only (keep the rest of nsswitch as shipped).
    if [[ -f "$r/etc/nsswitch.conf" ]]; then
        sed -i 's/^hosts:.*/hosts:          files/' "$r/etc/nsswitch.conf"
    fi
}

cmd_build() {
    apt_install_host sip-tester sipp
    if is_built; then say "chroot cached at $ROOT"; prepare_root "$ROOT"; return 0; fi
    mkdir -p "$CACHE"
    # Leftovers of interrupted builds: remove only when nothing is mounted inside.
    local old
    for old in "$CACHE"/asterisk-sid.tmp.*; do
        [[ -d "$old" ]] || continue
        if has_mounts "$old"; then say "leaving $old alone (something is mounted in it)"; else rm -rf "$old"; fi
    done
    [[ -e "$ROOT" ]] && { has_mounts "$ROOT" && die "$ROOT is incomplete and has mounts; unmount it first"; rm -rf "$ROOT"; }
    local tmp="$CACHE/asterisk-sid.tmp.$$"
    trap 'has_mounts "'"$tmp"'" || rm -rf "'"$tmp"'"' EXIT
    local t0=$SECONDS
    if [[ -n "${CALLCTL_LAB_SEED:-}" ]]; then
        [[ -x "$CALLCTL_LAB_SEED/usr/sbin/asterisk" ]] || die "CALLCTL_LAB_SEED=$CALLCTL_LAB_SEED has no asterisk"
        has_mounts "$CALLCTL_LAB_SEED" && die "refusing to copy $CALLCTL_LAB_SEED: something is mounted in it"
        say "copying seed chroot $CALLCTL_LAB_SEED"
        cp -a "$CALLCTL_LAB_SEED" "$tmp"
    else
        apt_install_host mmdebstrap mmdebstrap
        say "building Debian sid + Asterisk into $tmp (about 30 s)"
        mmdebstrap --quiet --variant=apt --aptopt='Acquire::Check-Valid-Until "false"' \
            --include=asterisk,asterisk-modules sid "$tmp" "$MIRROR"
    fi
    has_mounts "$tmp" && die "mounts left in $tmp after build"
    [[ -x "$tmp/usr/sbin/asterisk" ]] || die "build produced no /usr/sbin/asterisk"
    prepare_root "$tmp"
    touch "$tmp/.callctl-ready"
    mv -T "$tmp" "$ROOT"
    trap - EXIT
    say "chroot ready at $ROOT ($((SECONDS - t0)) s, $(du -sh "$ROOT" 2>/dev/null | cut -f1))"
}

# PIDs of processes running inside the chroot.
root_pids() {
    local p r want
    want="$(readlink -f "$ROOT" 2>/dev/null || echo "$ROOT")"
    for p in /proc/[0-9]*; do
        r="$(readlink "$p/root" 2>/dev/null)" || continue
        [[ "$r" == "$want" ]] && echo "${p#/proc/}"
    done
    return 0
}

# PIDs listening on our SIP port, with their command name.
sip_listeners() {
    ss -H -lunp "sport = :$SIP_PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u || true
}

astcli() { chroot "$ROOT" /usr/sbin/asterisk -rx "$*"; }

ast_pids() {   # every Asterisk that is ours: in the chroot, from our pidfile, or on 5060
    {
        root_pids
        [[ -f "$PIDFILE" ]] && cat "$PIDFILE"
        local p
        for p in $(sip_listeners); do
            [[ "$(cat /proc/$p/comm 2>/dev/null)" == asterisk ]] && echo "$p"
        done
    } | sort -un | while read -r p; do   # zombies are gone already (reaped late here)
        [[ -d /proc/$p ]] && [[ "$(awk '/^State:/{print $2}' /proc/$p/status 2>/dev/null)" != Z ]] && echo "$p"
    done
    return 0
}

cmd_down() {
    local pids i
    pids="$(ast_pids)"
    if [[ -z "$pids" ]]; then say "not running"; rm -f "$PIDFILE"; return 0; fi
    if is_built && [[ -S "$ASTRUN/asterisk.ctl" ]]; then
        timeout 5 chroot "$ROOT" /usr/sbin/asterisk -rx 'core stop now' >/dev/null 2>&1 || true
    fi
    for i in $(seq 50); do   # up to 5 s for a clean stop
        pids="$(ast_pids)"; [[ -z "$pids" ]] && break; sleep 0.1
    done
    if [[ -n "$pids" ]]; then
        say "killing $(echo $pids)"
        kill -TERM $pids 2>/dev/null || true
        for i in $(seq 30); do pids="$(ast_pids)"; [[ -z "$pids" ]] && break; sleep 0.1; done
        [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$PIDFILE" "$ASTRUN/asterisk.ctl" "$ASTRUN/asterisk.pid" 2>/dev/null || true
    # CDRs the dialplan kept while no daemon answered (CALLCTL_CDR_FALLBACK): lab calls only.
    rm -f "$ROOT/var/spool/asterisk/callctl-cdr-fallback.txt"* 2>/dev/null || true
    say "stopped"
}

install_conf() {
    local etc="$ROOT/etc/asterisk"
    [[ -f "$REPO/dialplan/asterisk/extensions_callctl.conf" ]] || die "missing dialplan/asterisk/extensions_callctl.conf"
    ls "$REPO"/conf/asterisk/*.conf >/dev/null 2>&1 || die "missing conf/asterisk/*.conf"
    rm -rf "$etc"; mkdir -p "$etc"      # only our configs load
    cp "$REPO"/conf/asterisk/* "$etc/"
    cp "$REPO/dialplan/asterisk/extensions_callctl.conf" "$etc/"
}

cmd_up() {
    local t0=$SECONDS
    is_built || cmd_build
    cmd_down >/dev/null 2>&1 || true
    local other
    other="$(sip_listeners)"
    [[ -n "$other" ]] && die "UDP port $SIP_PORT is held by another program: $(for p in $other; do echo -n "$p/$(cat /proc/$p/comm 2>/dev/null) "; done)"
    prepare_root "$ROOT"
    install_conf
    mkdir -p "$STATE"
    ln -sfn "$ROOT/var/log/asterisk" "$STATE/logs"
    : > "$LOG"
    rm -f "$ASTRUN/asterisk.ctl"
    # -f: foreground (we background it), -U root: no asterisk user needed, -n: no colour.
    setsid chroot "$ROOT" /usr/sbin/asterisk -f -n -U root -G root </dev/null >>"$LOG" 2>&1 &
    echo $! > "$PIDFILE"
    local pid i ok=""
    pid=$(cat "$PIDFILE")
    for i in $(seq $((BOOT_TIMEOUT * 10))); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$LOG" >&2; die "Asterisk exited during startup (log: $LOG)"
        fi
        if [[ -S "$ASTRUN/asterisk.ctl" ]] \
            && timeout 5 chroot "$ROOT" /usr/sbin/asterisk -rx 'core waitfullybooted' >/dev/null 2>&1 \
            && ss -H -lun "sport = :$SIP_PORT" 2>/dev/null | grep -q "$SIP_ADDR:$SIP_PORT"; then
            ok=1; break
        fi
        sleep 0.1
    done
    if [[ -z "$ok" ]]; then
        tail -n 30 "$LOG" >&2
        cmd_down >/dev/null 2>&1 || true
        die "Asterisk not ready within ${BOOT_TIMEOUT}s (fully booted + PJSIP on $SIP_ADDR:$SIP_PORT)"
    fi
    say "up in $((SECONDS - t0)) s: pid $pid, SIP udp:$SIP_ADDR:$SIP_PORT, log $LOG, Asterisk logs $STATE/logs/"
}

cmd_status() {
    local pids; pids="$(ast_pids)"
    if [[ -z "$pids" ]] || ! astcli 'core show uptime' >/dev/null 2>&1; then
        echo "lab: down"; return 1
    fi
    echo "lab: up (pid $(echo $pids)), chroot $ROOT"
    astcli 'core show version'
    astcli 'core show uptime'
    astcli 'pjsip show transports' | grep -E 'Transport:' | grep -v '<' || true
    astcli 'pjsip show endpoints' | grep -E '^ *Endpoint:' | grep -v '<' || true
    astcli 'core show channels count'
    astcli 'dialplan show globals' | grep CALLCTL || true
}

case "${1:-}" in
    build)  cmd_build ;;
    up)     cmd_up ;;
    down)   cmd_down ;;
    status) cmd_status ;;
    cli)    shift; is_built || die "not built"; astcli "$*" ;;
    *)      echo "usage: $0 {build|up|down|status|cli ARGS...}" >&2; exit 2 ;;
esac
