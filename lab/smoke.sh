#!/usr/bin/env bash
# End-to-end smoke test of the lab: real Asterisk + product dialplan + bench/minimal_fastagi.py + SIPp.
#   lab/smoke.sh        (brings the lab up if needed; needs 127.0.0.1:4573 and :5070/:5090 free)
# Checks: bridge (R-URI = destination, From = X, no real number in any header either way),
# fail closed (AGI down -> 183 then 503), every reject reason -> 183 then its SIP code,
# busy phone -> 486, and the hangup AGI arguments.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SC="$REPO/lab/sipp"
X=+8613900000001          # virtual number dialed by the carrier
A=+8613800000001          # destination the AGI answers
CALLER=+8613700000009     # the caller's real number (must never reach the phone)
W="$(mktemp -d /tmp/callctl-smoke.XXXXXX)"
PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
fail=0
ok()  { echo "  ok   $*"; }
bad() { echo "  FAIL $*"; fail=1; }

bash "$REPO/lab/lab.sh" status >/dev/null 2>&1 || bash "$REPO/lab/lab.sh" up
cd "$W"

agi() {   # agi [--reject REASON]: (re)start the minimal FastAGI
    [[ -n "${AGI_PID:-}" ]] && { kill "$AGI_PID" 2>/dev/null || true; wait "$AGI_PID" 2>/dev/null || true; }
    python3 "$REPO/bench/minimal_fastagi.py" 127.0.0.1:4573 "$A" --verbose "$@" >>"$W/agi.out" 2>&1 &
    AGI_PID=$!; PIDS+=("$AGI_PID")
    for _ in $(seq 50); do ss -H -ltn 'sport = :4573' | grep -q . && return 0; sleep 0.1; done
    echo "minimal_fastagi did not start"; cat "$W/agi.out"; exit 1
}
uas() {   # uas SCENARIO-ARGS...: (re)start the phone on 5070
    [[ -n "${UAS_PID:-}" ]] && { kill "$UAS_PID" 2>/dev/null || true; wait "$UAS_PID" 2>/dev/null || true; }
    sipp "$@" -i 127.0.0.1 -p 5070 -trace_msg -message_file "$W/uas.log" -nostdin >/dev/null 2>&1 &
    UAS_PID=$!; PIDS+=("$UAS_PID"); sleep 0.3
}
uac() {   # uac SCENARIO LOG: one call from the carrier to X
    timeout 40 sipp 127.0.0.1:5060 -sf "$1" -s "$X" -i 127.0.0.1 -p 5090 -m 1 -nostdin -timeout 35 \
        -trace_msg -message_file "$2" >/dev/null 2>&1
}
last_hangup() { sleep 0.3; grep '^hangup ' "$W/agi.out" | tail -1; }

echo "bridge:"
agi; uas -sn uas
if uac "$SC/carrier_call.xml" "$W/bridge.log"; then ok "call answered and torn down"; else bad "call failed"; fi
inv="$(awk '/^INVITE /,/^$/' "$W/uas.log")"
echo "$inv" | sed 's/^/       | /'
echo "$inv" | grep -q "^INVITE sip:$A@" && ok "Request-URI user is $A" || bad "Request-URI"
echo "$inv" | grep -q "^From: .*<sip:$X@" && ok "From user is $X" || bad "From"
grep -q -- "${CALLER#+}" "$W/uas.log" && bad "caller's real number reached the phone" || ok "caller's number in no message the phone saw"
grep -q -- "${A#+}" "$W/bridge.log" && bad "destination number reached the caller" || ok "destination number in no message the caller saw"
grep -qiE '^(P-Asserted-Identity|Remote-Party-ID|Diversion|P-Preferred-Identity):' "$W/uas.log" && bad "identity header sent" || ok "no PAI/RPID/Diversion sent"
h="$(last_hangup)"; echo "       hangup AGI: $h"
[[ "$h" == *"called=$X caller=$CALLER dest=$A action=bridge"*"dialstatus=ANSWER"*"hangupcause=16 node=lab" ]] && ok "hangup AGI arguments" || bad "hangup AGI arguments"

echo "busy phone:"
uas -sf "$SC/phone_busy.xml"
sed 's/CODE/486/; s#<recv response="183"/>#<recv response="183" optional="true"/>#' "$SC/carrier_call_rejected.xml.in" > busy.xml
uac busy.xml busy.log && ok "caller got 486" || bad "busy: $(grep '^SIP/2.0' busy.log | tr '\n' ' ')"
[[ "$(last_hangup)" == *"dialstatus=BUSY"*"hangupcause=17"* ]] && ok "hangup AGI: dialstatus=BUSY hangupcause=17" || bad "busy hangup args"

echo "reject reasons (183 early media, then the code):"
for pair in unknown_number:404 unknown_caller:403 blocked:403 expired:410 unavailable:503 fail_closed:503; do
    r=${pair%:*}; c=${pair#*:}
    if [[ $r == fail_closed ]]; then kill "$AGI_PID"; wait "$AGI_PID" 2>/dev/null || true; AGI_PID=; else agi --reject "$r"; fi
    sed "s/CODE/$c/" "$SC/carrier_call_rejected.xml.in" > "rej_$c.xml"
    t0=$SECONDS
    if uac "rej_$c.xml" "rej_$r.log"; then
        ok "$r -> $(grep '^SIP/2.0' "rej_$r.log" | cut -d' ' -f2- | paste -sd' ' | sed 's/ Trying/ Trying,/; s/ Progress/ Progress,/') ($((SECONDS - t0)) s)"
    else
        bad "$r: expected 183 then $c, got $(grep '^SIP/2.0' "rej_$r.log" | tr '\n' ' ')"
    fi
done
echo "work dir: $W"
[[ $fail == 0 ]] && echo "SMOKE OK" || { echo "SMOKE FAILED"; exit 1; }
