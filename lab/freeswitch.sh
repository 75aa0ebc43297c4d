#!/usr/bin/env bash
# callctl FreeSWITCH lab: FreeSWITCH built once from source, bound to 127.0.0.1.
#
#   lab/freeswitch.sh build     build FreeSWITCH once (cached), install sipp and prompt tools
#   lab/freeswitch.sh up        (re)start FreeSWITCH with conf/freeswitch + the product dialplan
#   lab/freeswitch.sh down      stop it (SIGTERM by PID, then SIGKILL)
#   lab/freeswitch.sh status    is it up? (fs_cli-free: `api status` over the event socket)
#
# Fixed addresses: SIP UDP 127.0.0.1:5062 (carrier in), phones at 127.0.0.1:5070,
# callctl's ESL server at 127.0.0.1:8084, inbound event socket 127.0.0.1:8021,
# RTP 21000-21999 (the Asterisk lab uses 20000-20999).
# Env: CALLCTL_LAB_CACHE (default /var/cache/callctl): where the build is cached.
#      CALLCTL_FREESWITCH_SRC: a directory holding src-freeswitch.tar.xz, src-sofia-sip.tar.xz
#                              and src-spandsp.tar.xz (default ../shared/freeswitch beside
#                              the repository, else /work/shared/freeswitch).
#      CALLCTL_FREESWITCH_PREFIX: an installed FreeSWITCH (bin/freeswitch, lib/freeswitch/mod)
#                                 to use instead of building one.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CALLCTL_LAB_CACHE:-/var/cache/callctl}"
# The sources sit in shared/ beside the checkout (CI's clone too); the workplace's copy otherwise.
if [[ -d "$REPO/../shared/freeswitch" ]]; then DEFAULT_SRC="$(cd "$REPO/../shared/freeswitch" && pwd)"
else DEFAULT_SRC=/work/shared/freeswitch; fi
SRC="${CALLCTL_FREESWITCH_SRC:-$DEFAULT_SRC}"
PREFIX="${CALLCTL_FREESWITCH_PREFIX:-$CACHE/freeswitch}"
STATE="$REPO/var/lab-freeswitch"
PIDFILE="$STATE/run/freeswitch.pid"
SIP_PORT=5062
ESL_PORT=8021
BOOT_TIMEOUT="${CALLCTL_LAB_BOOT_TIMEOUT:-60}"

# Debian 12 packages the build needs (on top of build-essential, pkg-config and the usual -dev).
BUILD_DEPS=(build-essential pkg-config autoconf automake libtool libtool-bin libcurl4-openssl-dev
            libpcre2-dev libspeexdsp-dev libspeex-dev libedit-dev libtiff-dev libsndfile1-dev
            libopus-dev yasm libssl-dev zlib1g-dev libjpeg-dev libsqlite3-dev uuid-dev xz-utils)
# Only what the lab loads (conf/freeswitch/autoload_configs/modules.conf.xml).
MODULES=(applications/mod_commands applications/mod_db applications/mod_dptools applications/mod_expr
         applications/mod_hash applications/mod_spandsp codecs/mod_opus dialplans/mod_dialplan_xml
         endpoints/mod_loopback endpoints/mod_sofia event_handlers/mod_event_socket
         event_handlers/mod_cdr_csv formats/mod_native_file formats/mod_sndfile
         formats/mod_tone_stream loggers/mod_console loggers/mod_logfile say/mod_say_en)

say() { echo "fslab: $*" >&2; }
die() { echo "fslab: ERROR: $*" >&2; exit 1; }

has_fs() { [[ -x "$PREFIX/bin/freeswitch" && -f "$PREFIX/lib/freeswitch/mod/mod_event_socket.so" ]]; }
# Our own build is complete only once stamped (an interrupted `make install` is not).
is_built() { has_fs && { [[ -n "${CALLCTL_FREESWITCH_PREFIX:-}" ]] || [[ -f "$PREFIX/.callctl-ready" ]]; }; }

apt_need() {   # apt_need PKG...: install the packages that are missing
    local missing=() p
    for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
}

# The FreeSWITCH tree asks for spandsp >= 3.1.1 and sofia-sip-ua >= 1.13.18; the upstream
# commits that raised them (1d77a57750, a75491a318) changed only these strings, and the
# tarballs beside it are spandsp 3.0.0 and sofia-sip 1.13.17(+55). Lower both. Visible on purpose.
patch_versions() {
    sed -i -e 's/spandsp >= 3\.1\.1/spandsp >= 3.0.0/' \
           -e 's/sofia-sip-ua >= 1\.13\.18/sofia-sip-ua >= 1.13.17/' "$1/configure.ac"
    grep -q 'spandsp >= 3.0.0' "$1/configure.ac" && grep -q 'sofia-sip-ua >= 1.13.17' "$1/configure.ac" \
        || die "configure.ac version patch did not apply"
}

cmd_build() {
    apt_need sip-tester espeak-ng sox
    if is_built; then say "FreeSWITCH cached at $PREFIX"; return 0; fi
    [[ -n "${CALLCTL_FREESWITCH_PREFIX:-}" ]] && die "CALLCTL_FREESWITCH_PREFIX=$PREFIX has no bin/freeswitch with mod_event_socket"
    local f
    for f in src-freeswitch.tar.xz src-sofia-sip.tar.xz src-spandsp.tar.xz; do
        [[ -f "$SRC/$f" ]] || die "$SRC/$f missing (set CALLCTL_FREESWITCH_SRC)"
    done
    apt_need "${BUILD_DEPS[@]}"
    mkdir -p "$CACHE"
    local build="$CACHE/freeswitch-build.$$" tmp="$PREFIX.tmp.$$" t0=$SECONDS t
    rm -rf "$CACHE"/freeswitch-build.* "$PREFIX".tmp.*
    trap 'rm -rf "'"$build"'" "'"$tmp"'"' EXIT
    mkdir -p "$build" "$tmp"
    for f in freeswitch sofia-sip spandsp; do tar -C "$build" -xJf "$SRC/src-$f.tar.xz"; done
    # configure scripts bake the prefix in; build into the final path, then move a finished copy.
    # (The prefix is the rpath below, so build into $PREFIX directly via a staging rename.)
    rm -rf "$PREFIX.old"; [[ -e "$PREFIX" ]] && mv "$PREFIX" "$PREFIX.old"
    rmdir "$tmp"; local P="$PREFIX"
    export PKG_CONFIG_PATH="$P/lib/pkgconfig"
    t=$SECONDS; say "sofia-sip (about 30 s)"
    (cd "$build/sofia-sip" && ./bootstrap.sh && ./configure --prefix="$P" --without-glib --without-doxygen --disable-static \
        && make -j2 && make install) > "$build/sofia-sip.log" 2>&1 || { tail -30 "$build/sofia-sip.log"; die "sofia-sip build failed"; }
    say "sofia-sip done in $((SECONDS - t)) s"
    t=$SECONDS; say "spandsp (about 20 s)"
    (cd "$build/spandsp" && ./bootstrap.sh && ./configure --prefix="$P" --disable-static \
        && make -j2 && make install) > "$build/spandsp.log" 2>&1 || { tail -30 "$build/spandsp.log"; die "spandsp build failed"; }
    say "spandsp done in $((SECONDS - t)) s"
    t=$SECONDS; say "FreeSWITCH (about 2 min)"
    patch_versions "$build/freeswitch"
    printf '%s\n' "${MODULES[@]}" > "$build/freeswitch/modules.conf"
    (cd "$build/freeswitch" && ./bootstrap.sh -j \
        && ./configure --prefix="$P" --disable-libvpx --disable-libyuv LDFLAGS="-Wl,-rpath,$P/lib" \
        && make -j2 && make install) > "$build/freeswitch.log" 2>&1 || { tail -40 "$build/freeswitch.log"; die "FreeSWITCH build failed"; }
    say "FreeSWITCH done in $((SECONDS - t)) s"
    # Only the binaries, libraries and modules are kept; the lab brings its own conf and sounds.
    rm -rf "$P/include" "$P/share/freeswitch/sounds" "$P/etc" "$P/lib/"*.la "$P/lib/freeswitch/mod/"*.la
    has_fs || die "build produced no $P/bin/freeswitch with mod_event_socket"
    touch "$P/.callctl-ready"
    rm -rf "$build" "$PREFIX.old"
    trap - EXIT
    say "FreeSWITCH ready at $P ($((SECONDS - t0)) s, $(du -sh "$P" | cut -f1))"
}

# The announcements of callctl.core.rejections, spoken by espeak-ng, as 8 kHz WAV files.
make_sounds() {
    local dir="$1" name text
    mkdir -p "$dir"
    PYTHONPATH="$REPO" python3 -c 'from callctl.core.rejections import REJECTIONS, EXTENSION_PROMPTS, SELFSERVICE_PROMPTS
for r in REJECTIONS.values(): print(f"{r.prompt}\t{r.text}")
for name, text in {**EXTENSION_PROMPTS, **SELFSERVICE_PROMPTS}.items(): print(f"{name}\t{text}")' |
    while IFS=$'\t' read -r name text; do
        [[ -s "$dir/$name.wav" ]] && continue
        espeak-ng -s 170 -w "$dir/$name.raw.wav" "$text" && sox -q "$dir/$name.raw.wav" -r 8000 -c 1 -b 16 "$dir/$name.wav"
        rm -f "$dir/$name.raw.wav"
    done
}

fs_pids() {   # our FreeSWITCH: the pidfile's, and any of our binary holding the lab's ports
    {
        [[ -f "$PIDFILE" ]] && cat "$PIDFILE"
        ss -H -lunp "sport = :$SIP_PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2
        ss -H -ltnp "sport = :$ESL_PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2
    } | sort -un | while read -r p; do
        [[ "$(readlink /proc/$p/exe 2>/dev/null)" == */bin/freeswitch ]] && echo "$p"
    done
    return 0
}

is_up() {
    ss -H -lun "sport = :$SIP_PORT" 2>/dev/null | grep -q . && ss -H -ltn "sport = :$ESL_PORT" 2>/dev/null | grep -q .
}

cmd_down() {
    local pids i
    pids="$(fs_pids)"
    if [[ -z "$pids" ]]; then say "not running"; rm -f "$PIDFILE"; return 0; fi
    kill -TERM $pids 2>/dev/null || true
    for i in $(seq 150); do pids="$(fs_pids)"; [[ -z "$pids" ]] && break; sleep 0.1; done
    if [[ -n "$pids" ]]; then say "killing $(echo $pids)"; kill -KILL $pids 2>/dev/null || true; sleep 0.2; fi
    rm -f "$PIDFILE"
    say "down"
}

cmd_up() {
    cmd_build
    cmd_down >/dev/null 2>&1 || true
    # A fresh PBX database each time: kept CDRs left by an earlier run (a benchmark's
    # overloaded steps, a killed test) are not this run's, and import-pbx would take them.
    rm -rf "$STATE/db"
    mkdir -p "$STATE"/{conf/dialplan,log,db,run,sounds}
    make_sounds "$STATE/sounds"
    cp "$REPO/conf/freeswitch/freeswitch.xml" "$STATE/conf/freeswitch.xml"
    cp "$REPO/dialplan/freeswitch/callctl.xml" "$STATE/conf/dialplan/callctl.xml"
    cat > "$STATE/conf/vars.xml" <<VARS
<include>
  <X-PRE-PROCESS cmd="set" data="callctl_lab=$STATE"/>
  <X-PRE-PROCESS cmd="set" data="callctl_esl=127.0.0.1:8084"/>
  <X-PRE-PROCESS cmd="set" data="callctl_outbound=sofia/gateway/phones"/>
  <X-PRE-PROCESS cmd="set" data="callctl_sounds=$STATE/sounds"/>
</include>
VARS
    : > "$STATE/log/freeswitch.log"   # this run's log only (the tests' leak check reads it)
    local t0=$SECONDS
    setsid "$PREFIX/bin/freeswitch" -nc -nf -np -nonat -nonatmap -conf "$STATE/conf" -log "$STATE/log" \
        -db "$STATE/db" -run "$STATE/run" -temp "$STATE/run" -mod "$PREFIX/lib/freeswitch/mod" \
        > "$STATE/log/console.log" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    local pid; pid="$(cat "$PIDFILE")"
    until is_up; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$STATE/log/console.log" "$STATE/log/freeswitch.log" >&2 2>/dev/null
            die "FreeSWITCH exited during startup (logs: $STATE/log)"
        fi
        (( SECONDS - t0 > BOOT_TIMEOUT )) && { cmd_down; die "FreeSWITCH not up within $BOOT_TIMEOUT s"; }
        sleep 0.2
    done
    say "up in $((SECONDS - t0)) s: pid $pid, SIP udp:127.0.0.1:$SIP_PORT, ESL 127.0.0.1:$ESL_PORT, logs $STATE/log"
}

cmd_status() {
    if is_up; then say "up (pid $(fs_pids | tr '\n' ' '))"; else say "down"; return 1; fi
}

case "${1:-}" in
    build) cmd_build ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 build|up|down|status" >&2; exit 2 ;;
esac
