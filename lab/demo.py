"""`make demo`: callctl's main job, shown to a person.

A real Asterisk 22 in the local lab (lab/lab.sh), the daemon `callctl serve asterisk`
on the embedded SQLite default (or, with `--pbx freeswitch` / `make demo PBX=freeswitch`,
the real FreeSWITCH lab (lab/freeswitch.sh) and `callctl serve freeswitch`), two sample tenants provisioned with the real `callctl`
CLI as an administrator would, SIPp calls through Asterisk (a SIPp carrier on one side,
a SIPp phone on 127.0.0.1:5070 that checks what reaches it on the other), then the
CDRs printed with `callctl cdr list`. Then a customer opts out of one tenant and an agent
number goes on the shared blacklist, each refused on its next call.

Every number here is made up. Real numbers (customers, agents, strangers) are shown
masked on screen, as callctl itself shows them; virtual numbers X and the tenants'
hotlines are the businesses' own numbers and are shown as they are.

Exit status: 0 when every scenario behaved as expected, 1 when one did not, 2 when the
demo could not run (lab, daemon or CLI failure).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from lab import sipp
from callctl.core.numbers import mask
from lab import harness

WORK = REPO / "var" / "demo"
DB_PATH = WORK / "callctl.db"
DB_URL = f"sqlite:///{DB_PATH}"
KEY_FILE = WORK / "callctl.keys"  # made by `callctl keys generate` below; numbers at rest use it
TRACES = WORK / "sipp"
CALLCTL = Path(sys.executable).with_name("callctl")
LAB_CACHE = Path(os.environ.get("CALLCTL_LAB_CACHE", "/var/cache/callctl")) / "asterisk-sid"
PHONE_PORT = 5070
TALK_MS = 1000
# The PBX the demo runs through: `--pbx freeswitch` (make demo PBX=freeswitch) or Asterisk.
_ARGS = sys.argv[1:]
PBX = harness.FREESWITCH if "--pbx" in _ARGS and _ARGS[_ARGS.index("--pbx") + 1:][:1] == ["freeswitch"] \
    else harness.ASTERISK
PBX_NAME = "FreeSWITCH 1.11" if PBX is harness.FREESWITCH else "Asterisk 22"

# --- sample data (made up) -----------------------------------------------------------
ACME, BLUESKY = "acme-insurance", "bluesky-life"
ACME_HOTLINE = "+861058000000"          # Beijing, the insurer's public service line
ACME_AGENTS = ["+8613911110001", "+8613911110002"]
BLUESKY_HOTLINE = "+862150000000"       # Shanghai
BLUESKY_PREFIX = "+86215555"            # bluesky's agents call from +86 21 5555 xxxx
BLUESKY_AGENT = "+862155550123"
ACME_POOL = ["+8617100000001", "+8617100000002", "+8617100000003", "+8617100000004"]
BLUESKY_POOL = ["+8617100000101", "+8617100000102"]
WANG, LI, LIU, ZHAO = "+8613812345678", "+8613887654321", "+8613855550000", "+8613822223333"
STRANGER = "+8613700009999"
NOT_OURS = "+8617199999999"             # a 171 number in nobody's pool
EXPIRY_TTL = 5                          # seconds: Li's temporary binding

REAL_NUMBERS = ACME_AGENTS + [BLUESKY_AGENT, WANG, LI, LIU, ZHAO, STRANGER]

SIP_TEXT = {200: "OK", 403: "Forbidden", 404: "Not Found", 410: "Gone", 503: "Service Unavailable"}


def nsn(number: str) -> str:
    """National significant digits: what the phone must not see, in any form."""
    return number.removeprefix("+86")


def m(number: str) -> str:
    return mask(number)


def show(number: str) -> str:
    """A number the phone saw: hotlines are the tenants' public numbers, the rest is masked."""
    return number if number in (ACME_HOTLINE, BLUESKY_HOTLINE) else mask(number)


# --- output ---------------------------------------------------------------------------
def say(text: str = "") -> None:
    print(text, flush=True)


def heading(n: int, text: str) -> None:
    say()
    say(f"{n}. {text}")


def elapsed(since: float) -> str:
    return f"{time.monotonic() - since:.1f} s"


class DemoError(RuntimeError):
    pass


# --- the callctl CLI, as an administrator runs it ---------------------------------------
CLI_ENV = {
    "CALLCTL_CONFIG": str(REPO / "conf" / "callctl.yaml"),
    "CALLCTL_DATABASE_URL": DB_URL,
    "CALLCTL_SPOOL_DIR": str(WORK / "spool"),
    "CALLCTL_KEY_FILE": str(KEY_FILE),
    "CALLCTL_AUDIT_CHECKPOINT": str(WORK / "callctl.audit-head"),  # beside the demo's database
}


def callctl(*args: str, shown: str | None = None) -> str:
    """Run `callctl ARGS`; echo it (with real numbers masked) and return its stdout."""
    say(f"   $ callctl {shown or ' '.join(args)}")
    argv = [str(CALLCTL)] if CALLCTL.exists() else [sys.executable, "-m", "callctl.cli"]
    done = subprocess.run(argv + list(args), capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **CLI_ENV}, timeout=60)
    if done.returncode != 0:
        raise DemoError(f"callctl {args[0]} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def out(text: str) -> None:
    say(f"       {text}")


# The demo shows the same calls whenever it runs: its tenants may call customers all day
# (the default is 08:00-21:00 in the tenant's zone; tests/test_lab_policy.py shows that rule).
DEMO_HOURS = "00:00-24:00"


def provision() -> dict:
    """Tenants, pools and bindings through the CLI. Returns the bindings by name."""
    out(callctl("keys", "generate", "--id", "demo").strip())
    out(callctl("db", "upgrade").strip())

    t = json.loads(callctl(
        "tenant", "add", ACME, "--hotline", ACME_HOTLINE,
        *[a for agent in ACME_AGENTS for a in ("--caller", agent)], "--strict", "--max-call-seconds", "600",
        "--hours", DEMO_HOURS,
        shown=f"tenant add {ACME} --hotline {ACME_HOTLINE} "
              + " ".join(f"--caller {m(a)}" for a in ACME_AGENTS) + f" --strict --max-call-seconds 600 --hours {DEMO_HOURS}"))
    out(f"tenant {t['id']} {t['name']}: hotline {t['hotline']}, agents "
        f"{', '.join(m(c) for c in t['callers'])}, strict (strangers are rejected)")
    t = json.loads(callctl(
        "tenant", "add", BLUESKY, "--hotline", BLUESKY_HOTLINE, "--caller-prefix", BLUESKY_PREFIX, "--no-strict",
        "--hours", DEMO_HOURS,
        shown=f"tenant add {BLUESKY} --hotline {BLUESKY_HOTLINE} --caller-prefix {BLUESKY_PREFIX} --no-strict "
              f"--hours {DEMO_HOURS}"))
    out(f"tenant {t['id']} {t['name']}: hotline {t['hotline']}, agents {t['caller_prefixes'][0]}..., "
        f"lenient (strangers go to the hotline, never to a customer)")

    out(callctl("pool", "add", "--tenant", ACME, *ACME_POOL).strip())
    out(callctl("pool", "add", "--tenant", BLUESKY, *BLUESKY_POOL).strip())

    def bind(tenant: str, customer: str, reference: str, *extra: str, note: str = "") -> dict:
        b = json.loads(callctl("bind", "--tenant", tenant, "--customer", customer, "--reference", reference, *extra,
                               shown=" ".join(["bind --tenant", tenant, "--customer", m(customer),
                                               "--reference", reference, *extra])))
        expiry = f"expires {b['expires_at'][:19].replace('T', ' ')} UTC" if b["expires_at"] else "no expiry"
        out(f"binding {b['id']}: X {b['x']} -> customer {b['customer']} ({b['mode']}, {b['reference']}, "
            f"{expiry}){note}")
        return b

    bindings = {
        "wang": bind(ACME, WANG, "POL-2024-0001"),
        "li": bind(ACME, LI, "TMP-2024-0002", "--ttl", str(EXPIRY_TTL), note=f"  <- temporary, {EXPIRY_TTL} s"),
        "liu": bind(ACME, LIU, "POL-2019-0917"),
        "zhao": bind(BLUESKY, ZHAO, "BS-88001"),
        "wang_bluesky": bind(BLUESKY, WANG, "BS-88002", note="  <- Wang is insured by both"),
    }
    u = json.loads(callctl("unbind", str(bindings["liu"]["id"])))
    out(f"binding {u['id']}: {u['status']} (policy {u['reference']} ended); X {u['x']} rests in quarantine")
    status = json.loads(callctl("pool", "status", "--tenant", ACME))
    out("pool of " + ACME + ": " + ", ".join(f"{v} {k}" for k, v in status.items()))
    return bindings


# --- SIPp calls -------------------------------------------------------------------------
@dataclass
class Scenario:
    what: str                   # what is tried, for people (numbers masked)
    caller: str
    called: str
    code: int                   # the SIP final response the carrier must get
    expected: str               # what should happen, for people
    ruri: str | None = None     # bridged: the number the phone must be dialled as
    forbidden: list[str] = field(default_factory=list)  # bridged: real numbers the phone must not see
    cdr: tuple | None = None    # (decision, reason, callee) the CDR must show; None: no CDR
    cdr_x: str | None = None    # the X the CDR shows, when not `called` (an unknown X is masked)
    # results
    got: str = ""
    ok: bool = False
    problem: str = ""


_FINAL = re.compile(r"^SIP/2\.0 (\d{3}) ?(.*)$", re.M)


def _messages(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [block for block in text.split("----------------------------------------------- ")[1:]]


def carrier_view(trace: Path) -> tuple[list[int], int | None, str, str]:
    """From the carrier's SIPp trace: provisional codes, the INVITE's final code, its
    reason phrase and Q.850 cause."""
    provisional, final, phrase, cause = [], None, "", ""
    for block in _messages(trace):
        if "message received" not in block or not re.search(r"^CSeq:\s*\d+ INVITE", block, re.M | re.I):
            continue
        found = _FINAL.search(block)
        if not found:
            continue
        code = int(found.group(1))
        if code < 200:
            provisional.append(code)
            continue
        final, phrase = code, found.group(2).strip()
        q850 = re.search(r"^Reason:.*cause=(\d+)", block, re.M | re.I)
        cause = q850.group(1) if q850 else ""
        break
    return provisional, final, phrase, cause


def phone_view(trace: Path) -> tuple[str, str, list[str]] | None:
    """From the phone's SIPp trace: Request-URI user, From user, identity headers present."""
    for block in _messages(trace):
        if "message received" in block:
            invite = re.search(r"^INVITE sips?:([^@;> ]+)", block, re.M)
            if not invite:
                continue
            sender = re.search(r"^From:[^\n]*?sips?:([^@;>]+)", block, re.M | re.I)
            extra = [h for h in ("P-Asserted-Identity", "Remote-Party-ID", "Diversion", "History-Info")
                     if re.search(rf"^{h}:", block, re.M | re.I)]
            return invite.group(1), sender.group(1) if sender else "", extra
    return None


def place_call(n: int, sc: Scenario, uac_port: int = 5090) -> None:
    """One carrier call (with the caller's real number in P-Asserted-Identity, as real
    carriers send it). For a bridge, a phone on 5070 checks the outbound leg."""
    trace_dir = TRACES / f"{n:02d}"
    trace = lambda name: ["-trace_msg", "-message_file", str(trace_dir / f"{name}.msg")]  # noqa: E731
    phone = None
    if sc.code == 200:
        phone = sipp.start_uas(PHONE_PORT, expect_ruri=sc.ruri, expect_from=sc.called, forbidden=sc.forbidden,
                               workdir=trace_dir / "phone", extra_args=trace("phone"))
    try:
        if sc.code == 200:
            result = sipp.run_uac("uac_call", calls=[(sc.caller, sc.called)], talk_ms=TALK_MS, pai=True,
                                  timeout=30, local_port=uac_port, workdir=trace_dir / "carrier",
                                  extra_args=trace("carrier"), target=PBX.sip_target)
        else:
            result = sipp.run_uac("uac_expect_reject", calls=[(sc.caller, sc.called)], expect_code=sc.code,
                                  pai=True, timeout=30, local_port=uac_port, workdir=trace_dir / "carrier",
                                  extra_args=trace("carrier"), target=PBX.sip_target)
    finally:
        far = phone.stop() if phone else None

    provisional, final, phrase, cause = carrier_view(trace_dir / "carrier.msg")
    if final is None:
        sc.got = f"no final response (SIPp: {result.status})"
    else:
        sc.got = f"{final} {phrase}" + (f" (Q.850 cause {cause})" if cause else "")
        if final != 200 and 183 in provisional:
            sc.got = "183 + announcement, then " + sc.got
    problems = []
    if not result.ok or final != sc.code:
        reasons = ", ".join(f"{k} {v}" for k, v in result.failure_reasons.items())
        problems.append(f"carrier expected {sc.code}; SIPp {result.status}" + (f" ({reasons})" if reasons else ""))
    if far is not None:
        failed_checks = re.findall(r"callctl check failed: ([^\n]+)", far.log)
        if failed_checks:
            problems.append("phone check failed: " + "; ".join(failed_checks))
        elif not far.ok or far.successful != 1:
            problems.append(f"phone: SIPp {far.status}, {far.successful} call(s) completed")
        seen = phone_view(trace_dir / "phone.msg")
        if seen:
            ruri, sender, identity = seen
            sc.got += f"; phone dialled as {show(ruri)}, shown caller {sender}"
            sc.got += f", {'/'.join(identity)} present" if identity else ", no PAI/RPID/Diversion"
            if not failed_checks:
                sc.got += ", caller's real number nowhere in the INVITE"
    sc.problem = "; ".join(problems)
    sc.ok = not problems


def nobody_phone(tag: str) -> sipp.SippProcess:
    """A phone that fails any call offered to it: a rejected call must ring no one."""
    return sipp.start_uas(PHONE_PORT, expect_ruri="nobody", workdir=TRACES / f"nobody-{tag}")


def check_nobody(phone: sipp.SippProcess, scenarios: list[Scenario]) -> None:
    res = phone.stop()
    if res.attempted:
        for sc in scenarios:
            sc.ok = False
            sc.problem = (sc.problem + "; " if sc.problem else "") + f"a phone rang ({res.attempted} call(s))"
    else:
        for sc in scenarios:
            if sc.ok:
                sc.got += "; no phone rang"


def report(n: int, sc: Scenario) -> None:
    say(f"   {'PASS' if sc.ok else 'FAIL'}  {n:>2}. {sc.what}")
    say(f"             expected {sc.expected}")
    say(f"             got      {sc.got}")
    if sc.problem:
        say(f"             problem: {sc.problem}")


def settle() -> None:
    """Let the PBX finish the call (and the daemon write its CDR) before the next."""
    PBX.wait_no_channels()


# --- CDRs -----------------------------------------------------------------------------
def read_cdrs() -> list[dict]:
    from callctl.store.db import make_engine
    from callctl.store.cdrs import list_cdrs

    engine = make_engine(DB_URL, pool_size=1)
    try:
        return list_cdrs(engine, limit=1000)
    finally:
        engine.dispose()


def binding_state(binding_id: int) -> str:
    """The binding's stored status: `active` until housekeeping (or unbind) ends it."""
    from sqlalchemy import select

    from callctl.store.db import make_engine
    from callctl.store.models import Binding

    engine = make_engine(DB_URL, pool_size=1)
    try:
        with engine.connect() as conn:
            return conn.execute(select(Binding.status).where(Binding.id == binding_id)).scalar_one()
    finally:
        engine.dispose()


def check_cdrs(scenarios: list[Scenario], expected_rows: int) -> tuple[bool, str]:
    deadline = time.monotonic() + 5
    while len(rows := read_cdrs()) < expected_rows and time.monotonic() < deadline:
        time.sleep(0.1)
    want = Counter((sc.cdr_x or sc.called, m(sc.caller)) + sc.cdr for sc in scenarios if sc.cdr)
    have = Counter((r["virtual_number"], r["caller_masked"], r["decision"], r["reject_reason"], r["callee_masked"])
                   for r in rows)
    if want != have or len(rows) != expected_rows:
        missing = want - have
        extra = have - want
        return False, f"{len(rows)} CDRs; missing {dict(missing)}; unexpected {dict(extra)}"
    return True, f"{len(rows)} CDRs, one per call, each with the decision and reason expected"


def leak_check(daemon: harness.Process) -> tuple[bool, str]:
    everything = json.dumps(read_cdrs()) + daemon.output()
    leaked = [m(n) for n in REAL_NUMBERS if nsn(n) in everything]
    if leaked:
        return False, f"real number(s) found in CDRs or the daemon log: {', '.join(leaked)}"
    return True, f"none of the {len(REAL_NUMBERS)} real numbers appears in the CDRs or in the daemon log"


# --- the demo -------------------------------------------------------------------------
def run_calls(bindings: dict, daemon: harness.Process) -> list[Scenario]:
    x_wang, x_li, x_liu, x_zhao = (bindings[k]["x"] for k in ("wang", "li", "liu", "zhao"))
    agent = ACME_AGENTS[0]
    bridged = [
        Scenario(f"acme agent {m(agent)} dials X {x_wang} (Wang's policy)", agent, x_wang, 200,
                 f"200, the phone rings as customer {m(WANG)}, shown X as the caller",
                 ruri=WANG, forbidden=[nsn(a) for a in ACME_AGENTS],
                 cdr=("bridged", None, m(WANG))),
        Scenario(f"customer {m(WANG)} dials X {x_wang} back", WANG, x_wang, 200,
                 f"200, the phone rings as acme's hotline {ACME_HOTLINE}, shown X as the caller",
                 ruri=ACME_HOTLINE, forbidden=[nsn(WANG)],
                 cdr=("bridged", None, m(ACME_HOTLINE))),
        Scenario(f"bluesky agent {m(BLUESKY_AGENT)} (prefix {BLUESKY_PREFIX}) dials X {x_zhao}", BLUESKY_AGENT,
                 x_zhao, 200, f"200, the phone rings as customer {m(ZHAO)}, shown X",
                 ruri=ZHAO, forbidden=[nsn(BLUESKY_AGENT)],
                 cdr=("bridged", None, m(ZHAO))),
        Scenario(f"stranger {m(STRANGER)} dials bluesky's X {x_zhao} (lenient tenant)", STRANGER, x_zhao, 200,
                 f"200 at bluesky's hotline {BLUESKY_HOTLINE}, never at the customer",
                 ruri=BLUESKY_HOTLINE, forbidden=[nsn(STRANGER), nsn(ZHAO)],
                 cdr=("bridged", None, m(BLUESKY_HOTLINE))),
    ]
    rejected = [
        Scenario(f"stranger {m(STRANGER)} dials acme's X {x_wang} (strict tenant)", STRANGER, x_wang, 403,
                 "403 Forbidden (unknown_caller), no phone rings", cdr=("rejected", "unknown_caller", None)),
        Scenario(f"acme agent {m(agent)} dials {m(NOT_OURS)}, in nobody's pool (maybe someone's real number: "
                 "masked)", agent, NOT_OURS, 404, "404 Not Found (unknown_number)",
                 cdr=("rejected", "unknown_number", None), cdr_x=m(NOT_OURS)),
        Scenario(f"acme agent {m(agent)} dials X {x_liu}, unbound (Liu's policy ended)", agent, x_liu, 404,
                 "404 Not Found (unknown_number: X is quarantined)", cdr=("rejected", "unknown_number", None)),
        Scenario(f"acme agent {m(agent)} dials X {x_li}, its {EXPIRY_TTL} s binding has expired", agent, x_li,
                 404, "404 Not Found (unknown_number: the daemon's housekeeping ended the binding, X is quarantined)",
                 cdr=("rejected", "unknown_number", None)),
    ]
    down = Scenario(f"daemon stopped; acme agent {m(agent)} dials X {x_wang}", agent, x_wang, 503,
                    "503 Service Unavailable: fail closed, nobody is reached",
                    cdr=("rejected", "unavailable", None))  # kept by the PBX, imported in step 5
    back = Scenario(f"daemon restarted; acme agent {m(agent)} dials X {x_wang} again", agent, x_wang, 200,
                    f"200, the phone rings as customer {m(WANG)} again",
                    ruri=WANG, forbidden=[nsn(a) for a in ACME_AGENTS], cdr=("bridged", None, m(WANG)))
    everything = bridged + rejected + [down, back]
    n = 0

    say("   bridged calls, one after the other (each talks 1 s):")
    for sc in bridged:
        n += 1
        place_call(n, sc)
        settle()
        report(n, sc)

    # The temporary binding must be past its expiry and released by the daemon's
    # housekeeping (every housekeeping_seconds) before we call it: else the call could
    # meet it expired but not yet released (410 expired) or not yet expired at all.
    li = bindings["li"]["id"]
    say(f"   (waiting for binding {li} to expire and the daemon's housekeeping to release it)")
    waited = time.monotonic()
    while binding_state(li) == "active":
        if time.monotonic() - waited > 60:
            raise DemoError(f"binding {li} was not released by the daemon's housekeeping within 60 s")
        time.sleep(0.2)
    say(f"   (binding {li} {binding_state(li)} after {elapsed(waited)})")
    say("   rejected calls, placed at once (the PBX plays each reason's announcement as early media, up to 5 s):")
    phone = nobody_phone("rejects")
    try:
        with ThreadPoolExecutor(len(rejected)) as pool:
            list(pool.map(lambda job: place_call(*job), [(n + i + 1, sc, 5091 + i) for i, sc in enumerate(rejected)]))
    finally:
        check_nobody(phone, rejected)
    settle()
    for sc in rejected:
        n += 1
        report(n, sc)

    say("   fail closed, then recovery:")
    n += 1
    stopped_at = time.monotonic()
    daemon.stop()
    phone = nobody_phone("down")
    try:
        place_call(n, down)
    finally:
        check_nobody(phone, [down])
        settle()
        daemon.start()
    report(n, down)
    say(f"             (the daemon was down for {elapsed(stopped_at)}, then started again)")
    n += 1
    place_call(n, back)
    settle()
    report(n, back)
    return everything + customers_word(bindings, n)


def customers_word(bindings: dict, n: int) -> list[Scenario]:
    """Wang opts out of acme (support staff, on Wang's word; the insurer's app can do it
    over the API, the customer on the self-service line), then acme's next call to Wang
    is refused while bluesky, whom Wang did not refuse, still gets through. Then a bluesky
    agent number goes on the shared harassment blacklist (proposed with a CDR of its
    calls as evidence, approved by two people) and is refused on its very next call."""
    x_wang, x_wang_bs, x_zhao = (bindings[k]["x"] for k in ("wang", "wang_bluesky", "zhao"))
    agent = ACME_AGENTS[0]
    say("   the customer's word: Wang tells support he wants no more calls from acme (audited):")
    pref = json.loads(callctl("customer", "set", "--tenant", ACME, "--customer", WANG, "--calls", "none",
                              "--by", "support:li",
                              shown=f"customer set --tenant {ACME} --customer {m(WANG)} --calls none --by support:li"))
    out(f"{pref['tenant']} / {pref['customer']}: calls {pref['calls']}, set by {pref['updated_by']}")
    opted = [
        Scenario(f"acme agent {m(agent)} dials X {x_wang} (Wang opted out of acme)", agent, x_wang, 403,
                 "403 Forbidden (opted_out), no phone rings", cdr=("rejected", "opted_out", None)),
        Scenario(f"bluesky agent {m(BLUESKY_AGENT)} dials X {x_wang_bs} (Wang's bluesky policy)", BLUESKY_AGENT,
                 x_wang_bs, 200, f"200, the phone rings as customer {m(WANG)}: he refused acme only",
                 ruri=WANG, forbidden=[nsn(BLUESKY_AGENT)], cdr=("bridged", None, m(WANG))),
    ]
    n += 1
    phone = nobody_phone("opted-out")
    try:
        place_call(n, opted[0])
    finally:
        check_nobody(phone, opted[:1])
    settle()
    report(n, opted[0])
    n += 1
    place_call(n, opted[1])
    settle()
    report(n, opted[1])

    say(f"   the shared blacklist: bluesky agent {m(BLUESKY_AGENT)} is reported for harassment;")
    say("   platform staff propose it with one of its CDRs as evidence, two other people approve:")
    evidence = min(r["id"] for r in read_cdrs() if r["caller_masked"] == m(BLUESKY_AGENT))
    entry = json.loads(callctl("blacklist", "propose", "--caller", BLUESKY_AGENT, "--reason", "harassment reported",
                               "--cdr", str(evidence), "--by", "ops:chen",
                               shown=f"blacklist propose --caller {m(BLUESKY_AGENT)} --reason 'harassment reported' "
                                     f"--cdr {evidence} --by ops:chen"))
    out(f"entry {entry['id']}: {entry['caller']} {entry['status']}")
    for person in ("ops:wang", "ops:zhao"):
        entry = json.loads(callctl("blacklist", "approve", str(entry["id"]), "--by", person))
        out(f"entry {entry['id']}: {entry['status']}" + (", in force" if entry["in_force"] else ", not yet in force"))
    barred = Scenario(f"bluesky agent {m(BLUESKY_AGENT)} dials X {x_zhao} (now on the blacklist)", BLUESKY_AGENT,
                      x_zhao, 403, "403 Forbidden (blacklisted), no phone rings",
                      cdr=("rejected", "blacklisted", None))
    n += 1
    phone = nobody_phone("blacklisted")
    try:
        place_call(n, barred)
    finally:
        check_nobody(phone, [barred])
    settle()
    report(n, barred)
    return opted + [barred]


def demo(daemon: harness.Process, extra_checks: list) -> list[Scenario]:
    heading(1, f"The lab: {PBX_NAME} on {PBX.sip_target} with the product dialplan")
    t = time.monotonic()
    if PBX is harness.FREESWITCH:
        say("   starting FreeSWITCH (built once from source, about 3 min, cached in /var/cache/callctl/freeswitch)")
    elif (LAB_CACHE / ".callctl-ready").exists():
        say(f"   starting Asterisk (chroot cached in {LAB_CACHE})")
    else:
        say(f"   building the Asterisk chroot first (Debian sid + Asterisk 22): about 40 s, once; cached in {LAB_CACHE}")
    PBX.up()
    say(f"   {PBX_NAME} is up ({elapsed(t)})")

    heading(2, f"Provisioning with the callctl CLI (database {DB_PATH.relative_to(REPO)})")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    bindings = provision()

    heading(3, "The daemon")
    say(f"   $ callctl serve {PBX.name}      ({'ESL' if PBX is harness.FREESWITCH else 'FastAGI'} on "
        f"{harness.AGI_HOST}:{daemon.port}, log: {daemon.log_path.relative_to(REPO)})")
    t = time.monotonic()
    daemon.start()
    say(f"   listening ({elapsed(t)})")

    heading(4, f"Calls: a SIPp carrier dials {PBX_NAME}; a SIPp phone on 127.0.0.1:5070 takes every outbound leg")
    say("   The carrier also sends the caller's real number in P-Asserted-Identity. The phone fails the call")
    say("   if it is dialled as the wrong number, is not shown X, or sees the caller's real number anywhere.")
    scenarios = run_calls(bindings, daemon)

    heading(5, "CDRs, as support staff read them")
    say("   The call made while the daemon was stopped found no daemon at hangup either: the dialplan kept")
    if PBX is harness.FREESWITCH:
        say("   its CDR on the PBX (mod_db, docs/esl.md), which the operator imports:")
    else:
        say("   its CDR in a file on the PBX (CALLCTL_CDR_FALLBACK), which the operator imports:")
    out(callctl("cdr", "import-pbx", *PBX.import_args()).strip())
    table = callctl("cdr", "list")
    for line in table.rstrip().splitlines():
        say("     " + line)
    routed = [sc for sc in scenarios if sc.cdr]
    extra_checks.append(check_cdrs(routed, len(routed)))
    extra_checks.append(leak_check(daemon))
    events = harness.json_events(daemon.output())
    times = sorted(e["ms"] for e in events if e.get("event") == "call routed" and "ms" in e)
    if times:
        say(f"   daemon log: {len(times)} calls routed, decision time median "
            f"{times[len(times) // 2]:.1f} ms, max {times[-1]:.1f} ms")
    for ok, text in extra_checks:
        say(f"   {'PASS' if ok else 'FAIL'}  {text}")

    heading(6, "Findings (anomaly job, rules in conf/anomaly.yaml; docs/anomaly.md)")
    out(callctl("anomaly", "run").strip())
    for line in callctl("findings", "list").rstrip().splitlines():
        say("     " + line)
    say("   (a handful of demo calls breaks no threshold; tests/test_lab_anomaly.py shows a block at work)")
    return scenarios


def main() -> int:
    started = time.monotonic()
    say(f"callctl demo: privacy numbers through a real {PBX_NAME}, the daemon on SQLite")
    say("(all numbers are made up; real numbers are shown masked, as callctl shows them everywhere)")
    scenarios: list[Scenario] = []
    extra_checks: list[tuple[bool, str]] = []
    daemon = harness.callctl_daemon(DB_URL, WORK, log_format="json", pbx=PBX.name,
                                    extra_env={"CALLCTL_KEY_FILE": str(KEY_FILE)})
    waited = 0.0
    try:
        with harness.LabLock():
            waited = time.monotonic() - started
            started = time.monotonic()
            try:
                scenarios = demo(daemon, extra_checks)
            finally:
                say()
                say("7. Cleaning up")
                daemon.stop()
                say("   daemon stopped")
                try:
                    PBX.down()
                    say("   lab down")
                except harness.LabError as exc:
                    say(f"   lab down failed: {exc}")
    except (DemoError, harness.LabError, sipp.SippError) as exc:
        say()
        say(f"demo could not run: {exc}")
        return 2
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130

    failed = [sc for sc in scenarios if not sc.ok] + [c for c in extra_checks if not c[0]]
    say()
    passed = sum(sc.ok for sc in scenarios)
    say(f"{passed}/{len(scenarios)} call scenarios as expected, "
        f"{sum(ok for ok, _ in extra_checks)}/{len(extra_checks)} record checks passed, in {elapsed(started)}"
        + (f" (after {waited:.0f} s waiting for the lab lock)" if waited >= 1 else "")
        + (f"; {len(failed)} FAILED" if failed else ""))
    say(f"files: {WORK.relative_to(REPO)}/ (callctl.db, callctl.log, sipp/ traces)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
