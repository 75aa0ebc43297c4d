"""The `callctl` command."""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from callctl import config as config_mod
from callctl.anomaly.config import RULES as ANOMALY_RULES
from callctl import logs


def _engine(cfg):
    from callctl.store.db import make_engine

    return make_engine(cfg.database_url, pool_size=cfg.db_threads)


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain fixed-width table for people."""
    cells = [[("" if r.get(key) is None else str(r.get(key))) for key, _ in columns] for r in rows]
    widths = [max([len(title)] + [len(c[i]) for c in cells]) for i, (_, title) in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    return "\n".join([line([t for _, t in columns]), line(["-" * w for w in widths])] + [line(c) for c in cells])


def _non_negative(text: str) -> int:
    if not text.isdigit() or int(text) > 3660:
        raise argparse.ArgumentTypeError("a whole number of days, 0 to 3660")
    return int(text)


def cmd_db_upgrade(cfg, args):
    from callctl.store.db import upgrade

    applied = upgrade(_engine(cfg))
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")


def cmd_db_partitions(cfg, args):
    from callctl.store.partitions import cdr_partitions, ensure_cdr_partitions

    engine = _engine(cfg)
    if engine.dialect.name != "postgresql":
        print("CDR partitions are a PostgreSQL feature; this database is not partitioned")
        return
    created = ensure_cdr_partitions(engine, days_ahead=args.days)
    if args.json:
        _print_json({"created": created, "partitions": cdr_partitions(engine)})
        return
    print("created: " + ", ".join(created) if created else "CDR partitions are up to date")
    print(_table(cdr_partitions(engine), [("partition", "partition"), ("range", "range"),
                                          ("rows_estimate", "rows (estimate)")]))


def cmd_tenant_add(cfg, args):
    from callctl.store.provision import add_tenant

    _print_json(
        add_tenant(
            _engine(cfg), args.name, args.hotline,
            callers=args.caller, caller_prefixes=args.caller_prefix, strict=args.strict,
            ring_timeout=args.ring_timeout, max_call_seconds=args.max_call_seconds,
            hours=args.hours, time_zone=args.tz, region=cfg.region,
        )
    )


def cmd_tenant_update(cfg, args):
    from callctl.store.provision import update_tenant

    _print_json(
        update_tenant(
            _engine(cfg), args.name, hours=args.hours, time_zone=args.tz, ring_timeout=args.ring_timeout,
            max_call_seconds=args.max_call_seconds, strict=args.strict,
            max_concurrent_calls=args.max_concurrent_calls,
        )
    )


def cmd_tenant_list(cfg, args):
    from callctl.store.provision import list_tenants

    _print_json(list_tenants(_engine(cfg)))


def cmd_pool_add(cfg, args):
    from callctl.store.provision import add_numbers

    count = add_numbers(_engine(cfg), args.tenant, args.numbers, region=cfg.region)
    print(f"added {count} virtual number(s) to {args.tenant}")


def cmd_pool_status(cfg, args):
    from callctl.store.provision import pool_status

    _print_json(pool_status(_engine(cfg), args.tenant))


def _expiry(text: str | None, option: str = "--expires"):
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"callctl: {option} must be an ISO date-time with zone, e.g. 2027-01-01T00:00:00+08:00") from None


def _bulk(run, file: str) -> None:
    """Run a bulk job with a progress bar on stderr; every rejected row is listed."""
    from tqdm import tqdm

    try:
        with open(file, "rb") as handle:
            total = max(sum(1 for _ in handle) - 1, 0)
    except OSError as exc:
        raise SystemExit(f"callctl: {file}: {exc.strerror}") from None
    with tqdm(total=total, unit="row", file=sys.stderr, dynamic_ncols=True) as bar:
        result = run(bar.update)
    for problem in result.errors:
        print(f"callctl: {file}: {problem}", file=sys.stderr)
    _print_json({  # rows = done + existing + rejected
        "rows": result.rows, "done": result.done, "existing": result.existing, "rejected": len(result.errors),
        "bound_file": str(result.bound_file) if result.bound_file else None,
        "rejected_file": str(result.rejected_file) if result.rejected_file else None,
    })
    if result.errors:
        print(f"callctl: {len(result.errors)} row(s) rejected, listed above and kept in {result.rejected_file}; "
              "the other rows are done", file=sys.stderr)
        raise SystemExit(1)


def cmd_pool_import(cfg, args):
    from callctl.store.bulk import import_pool

    _bulk(lambda progress: import_pool(_engine(cfg), args.file, tenant_name=args.tenant, region=cfg.region,
                                       progress=progress), args.file)


def cmd_bind(cfg, args):
    from callctl.store.provision import bind

    if (args.customer is None) == (args.bulk is None):
        raise SystemExit("callctl: give --customer (one binding) or --bulk FILE")
    if args.bulk:
        from callctl.store.bulk import bind_bulk

        return _bulk(lambda progress: bind_bulk(
            _engine(cfg), args.bulk, tenant_name=args.tenant, region=cfg.region,
            extension_digits=cfg.axe_extension_digits, out=args.out, progress=progress), args.bulk)
    if args.tenant is None:
        raise SystemExit("callctl: --tenant is needed")

    _print_json(
        bind(
            _engine(cfg), args.tenant, args.customer, mode=args.mode, other_party=args.other_party,
            reference=args.reference, expires_at=_expiry(args.expires), ttl_seconds=args.ttl,
            region=cfg.region, extension_digits=cfg.axe_extension_digits, purposes=args.purpose,
            profile=args.profile, quarantine=timedelta(days=cfg.quarantine_days),
        )
    )


def cmd_unbind(cfg, args):
    from callctl.store.provision import unbind

    _print_json(unbind(_engine(cfg), args.binding_id, timedelta(days=cfg.quarantine_days)))


def _login() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        raise SystemExit("callctl: cannot tell who you are; give --by NAME") from None


BLOCK_TABLE = [
    ("id", "id"), ("tenant", "tenant"), ("scope", "scope"), ("direction", "direction"),
    ("binding_id", "binding"), ("x", "X"), ("caller", "caller"), ("status", "status"),
    ("starts_at", "starts (UTC)"), ("ends_at", "ends (UTC)"), ("created_by", "by"), ("reason", "reason"),
]


def cmd_block_add(cfg, args):
    from callctl.store.blocks import add_block

    _print_json(
        add_block(
            _engine(cfg), scope=args.scope, direction=args.direction, reason=args.reason, created_by=args.by or _login(),
            tenant=args.tenant, binding_id=args.binding, number=args.number, caller=args.caller,
            starts_at=_expiry(args.starts, "--starts"), ends_at=_expiry(args.ends, "--ends"),
            duration_seconds=args.duration, region=cfg.region,
        )
    )


def cmd_block_add_and_cut(cfg, args):
    """block add; with --cut-active, then hang up the live calls it now refuses."""
    if not args.cut_active:
        return cmd_block_add(cfg, args)
    from callctl import live
    from callctl.asterisk.ami import AmiError
    from callctl.store.blocks import add_block

    engine = _engine(cfg)
    made = add_block(
        engine, scope=args.scope, direction=args.direction, reason=args.reason, created_by=args.by or _login(),
        tenant=args.tenant, binding_id=args.binding, number=args.number, caller=args.caller,
        starts_at=_expiry(args.starts, "--starts"), ends_at=_expiry(args.ends, "--ends"),
        duration_seconds=args.duration, region=cfg.region,
    )
    try:
        made["calls_cut"] = live.cut(cfg, engine, cfg.region)
    except AmiError as exc:
        _print_json(made)
        print(f"callctl: block added, live calls NOT cut: {exc}", file=sys.stderr)
        raise SystemExit(4)
    _print_json(made)


def cmd_calls(cfg, args):
    from callctl import live
    from callctl.asterisk.ami import AmiError

    try:
        rows = live.calls(cfg, _engine(cfg))
    except AmiError as exc:
        print(f"callctl: {exc}", file=sys.stderr)
        raise SystemExit(4)
    if args.json:
        _print_json(rows)
        return
    print(_table(rows, [("uniqueid", "call"), ("tenant", "tenant"), ("x", "X"), ("direction", "direction"),
                        ("caller", "caller"), ("callee", "callee"), ("seconds", "seconds")]))
    print(f"({len(rows)} bridged call(s))")


def cmd_doctor(cfg, args):
    from callctl import doctor

    checks = doctor.run(cfg)
    print(doctor.report(checks))
    if any(check.status is doctor.Status.FAIL for check in checks):
        raise SystemExit(1)


def cmd_block_list(cfg, args):
    from callctl.store.blocks import list_blocks

    rows = list_blocks(
        _engine(cfg), tenant=args.tenant, scope=args.scope, binding_id=args.binding, number=args.number,
        caller=args.caller, active=args.active, limit=args.limit, region=cfg.region,
    )
    if args.json:
        _print_json(rows)
        return
    for row in rows:
        for key in ("starts_at", "ends_at"):
            row[key] = (row[key] or "")[:19].replace("T", " ")
    print(_table(rows, BLOCK_TABLE))
    print(f"({len(rows)} block(s))")


def cmd_block_lift(cfg, args):
    from callctl.store.blocks import lift_block

    _print_json(lift_block(_engine(cfg), args.block_id, args.by or _login()))


def cmd_binding_get(cfg, args):
    from callctl.store.provision import get_binding

    _print_json(get_binding(_engine(cfg), args.binding_id))


BINDING_TABLE = [
    ("id", "id"), ("tenant", "tenant"), ("x", "X"), ("mode", "mode"), ("customer", "customer"),
    ("other_party", "other party"), ("extension", "ext"), ("reference", "reference"),
    ("status", "status"), ("expires_at", "expires (UTC)"),
]


def cmd_binding_list(cfg, args):
    from callctl.store.provision import list_bindings, tenant_id_of

    engine = _engine(cfg)
    page = list_bindings(
        engine, tenant_id=tenant_id_of(engine, args.tenant) if args.tenant else None,
        reference=args.reference, status=args.status, after=args.after, limit=args.limit,
    )
    if args.json:
        _print_json(page)
        return
    for row in page["items"]:
        row["expires_at"] = (row["expires_at"] or "")[:19].replace("T", " ")
    print(_table(page["items"], BINDING_TABLE))
    more = f"; next page: --after {page['next']}" if page["next"] else ""
    print(f"({len(page['items'])} binding(s){more})")


def cmd_binding_extend(cfg, args):
    from callctl.store.provision import extend_binding

    if args.expires is None and args.ttl is None and not args.no_expiry:
        raise SystemExit("callctl: give --expires, --ttl or --no-expiry")
    _print_json(extend_binding(_engine(cfg), args.binding_id, _expiry(args.expires), ttl_seconds=args.ttl))


def cmd_binding_update(cfg, args):
    from callctl.store.provision import update_binding

    if args.customer is None and args.reference is None:
        raise SystemExit("callctl: give --customer and/or --reference")
    _print_json(update_binding(_engine(cfg), args.binding_id, customer=args.customer,
                               reference=args.reference, region=cfg.region))


CDR_TABLE = [
    ("started_at", "started (UTC)"), ("call_id", "call id"), ("tenant_id", "tenant"),
    ("virtual_number", "X"), ("direction", "direction"), ("caller_masked", "caller"),
    ("callee_masked", "callee"), ("decision", "decision"), ("reject_reason", "reason"),
    ("dial_status", "dial"), ("ring_seconds", "ring s"), ("talk_seconds", "talk s"),
    ("hangup_cause", "cause"),
]


def _cdr_filter(cfg, args):
    from callctl.store.cdrs import CdrFilter

    return CdrFilter.parse(tenant=args.tenant, x=args.x, binding=args.binding, since=args.since,
                           until=getattr(args, "until", None), decision=args.decision, reason=args.reason,
                           region=cfg.region)


def _cdr_line(row: dict) -> dict:
    return {**row, "started_at": (row["started_at"] or "")[:19].replace("T", " ")}


def cmd_cdr_list(cfg, args):
    from callctl.store.cdrs import list_cdrs

    rows = list_cdrs(_engine(cfg), _cdr_filter(cfg, args), limit=args.limit)
    if args.json:
        _print_json(rows)
        return
    print(_table([_cdr_line(row) for row in rows], CDR_TABLE))
    print(f"({len(rows)} call(s))")


def _rules(cfg, args):
    from callctl.anomaly.config import load

    return load(args.rules or cfg.anomaly_rules)


def cmd_anomaly_run(cfg, args):
    from callctl.anomaly.job import follow, run_pass

    if args.interval is not None and not args.interval > 0:
        raise SystemExit("callctl: --interval must be a positive number of seconds")
    rules = _rules(cfg, args)
    engine = _engine(cfg)
    report = lambda r: print(json.dumps({
        "cdrs": r.cdrs, "from_id": r.from_id, "to_id": r.to_id, "new_findings": r.new_findings,
        "by_rule": {k: v for k, v in r.findings.items() if v}, "blocks": r.blocks,
        "blacklist_proposals": r.blacklist, "seconds": round(r.seconds, 3)}), flush=True)
    if not args.follow:
        report(run_pass(engine, rules))
        return
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())  # the pass under way finishes, then we exit
    follow(engine, rules, stop, interval=args.interval, on_pass=report)


FINDING_TABLE = [
    ("id", "id"), ("window_end", "last call (UTC)"), ("tenant", "tenant"), ("rule", "rule"),
    ("subject", "subject"), ("calls", "calls"), ("measure", "measure"), ("threshold", "threshold"),
    ("severity", "severity"), ("action", "action"), ("block_id", "block"),
]


def _since(text: str | None):
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise SystemExit("callctl: --since must be an ISO date-time with zone, e.g. 2026-11-01T00:00:00+08:00")
    return moment


def cmd_findings_list(cfg, args):
    from callctl.anomaly.job import list_findings

    rows = list_findings(_engine(cfg), tenant=args.tenant, rule=args.rule, since=_since(args.since),
                         limit=args.limit)
    if args.json:
        _print_json(rows)
        return
    for row in rows:
        row["window_end"] = row["window_end"][:19].replace("T", " ")
        if row["subject_kind"] == "caller":
            row["subject"] = "caller " + row["subject"][:12]  # a hash: its head tells callers apart
        else:
            row["subject"] = f"{row['subject_kind']} {row['subject']}"
        row["measure"] = f"{row['measure']:g}"
        row["threshold"] = f"{row['threshold']:g}"
    print(_table(rows, FINDING_TABLE))
    print(f"({len(rows)} finding(s))")




def cmd_keys_generate(cfg, args):
    from callctl.store.crypto import append_key

    key_id = args.id or "k" + datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    path = args.file or cfg.keys.file
    append_key(path, key_id)
    print(f"added key '{key_id}' to {path}; as the last key listed it is the current key "
          "unless keys.current names another (docs/keys.md)")


def cmd_keys_list(cfg, args):
    from callctl.store import crypto
    from callctl.store.reencrypt import key_usage

    ring = crypto.ring()
    usage = key_usage(_engine(cfg))
    rows = [{"key": k, "role": "current (writes)" if k == ring.current else "read only",
             "numbers": usage.get(k, 0)} for k in ring.keys]
    rows += [{"key": k, "role": "MISSING from the ring" if k != "plaintext" else "not encrypted yet",
              "numbers": n} for k, n in sorted(usage.items()) if k not in ring.keys]
    print(_table(rows, [("key", "key"), ("role", "role"), ("numbers", "stored numbers")]))


def cmd_keys_rotate(cfg, args):
    from callctl.store import crypto
    from callctl.store.reencrypt import reencrypt

    def progress(table, count):
        print(f"  {table}: {count} row(s) re-encrypted", file=sys.stderr)

    done = reencrypt(_engine(cfg), batch=args.batch, rehash=args.rehash, progress=progress)
    if args.rehash:  # every hash is under the ring's lookup secret now: it is the database's
        from callctl.store import keycheck

        keycheck.store_lookup(_engine(cfg))
    print(f"re-encrypted under key '{crypto.ring().current}': "
          + ", ".join(f"{table} {count}" for table, count in done.items()))
def cmd_cdr_tail(cfg, args):
    """Follow new CDRs. A table needs its widths up front: fixed ones, wide enough."""
    from callctl.store.cdrs import follow_cdrs

    widths = {"started_at": 19, "call_id": 24, "virtual_number": 15, "caller_masked": 15, "callee_masked": 15}
    cell = lambda key, value: ("" if value is None else str(value)).ljust(widths.get(key, 9))
    rows = follow_cdrs(_engine(cfg), _cdr_filter(cfg, args), backlog=args.backlog, every=args.every)
    try:
        if not args.json:
            print("  ".join(cell(key, title) for key, title in CDR_TABLE).rstrip(), flush=True)
        for row in rows:
            if args.json:
                print(json.dumps(row, ensure_ascii=False), flush=True)
            else:
                line = _cdr_line(row)
                print("  ".join(cell(key, line.get(key)) for key, _ in CDR_TABLE).rstrip(), flush=True)
    except KeyboardInterrupt:
        pass


def cmd_cdr_import_pbx(cfg, args):
    from callctl.asterisk.fallback import import_fallback
    from callctl.service import CallService

    service = CallService(_engine(cfg), spool=None, region=cfg.region, node=cfg.node)
    counts = import_fallback(service, Path(args.file))
    if args.json:
        _print_json(counts)
    else:
        print(f"imported from {args.file}: {counts['written']} written, {counts['duplicate']} already there"
              + (f", {counts['unreadable']} unreadable line(s) skipped" if counts["unreadable"] else ""))


def cmd_serve_api(cfg, args):
    from callctl.api.app import serve

    if args.config:  # the server (and each worker process) loads the same file
        os.environ["CALLCTL_CONFIG"] = args.config
    serve(cfg)


def cmd_token_create(cfg, args):
    from callctl.store.tokens import create_token

    made = create_token(_engine(cfg), role=args.role, tenant_name=args.tenant, name=args.name or "")
    _print_json(made)
    print("keep the token now: it is stored hashed and cannot be shown again", file=sys.stderr)


def cmd_token_list(cfg, args):
    from callctl.store.tokens import list_tokens

    _print_json(list_tokens(_engine(cfg)))


def cmd_token_revoke(cfg, args):
    from callctl.store.tokens import revoke_token

    _print_json(revoke_token(_engine(cfg), args.token_id))


def cmd_export_regulator(cfg, args):
    from callctl import regulator

    start, end = regulator.period(args.start, args.end)
    rendered = regulator.RENDER[args.format](regulator.report(_engine(cfg), start, end))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(rendered)
    else:
        sys.stdout.write(rendered if rendered.endswith("\n") else rendered + "\n")


def cmd_export_contacts(cfg, args):
    from callctl import register

    lines = register.csv_lines(register.rows(_engine(cfg), args.tenant, args.as_of))  # bad input stops here
    out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
    try:
        out.writelines(lines)
    finally:
        if args.output:
            out.close()


def cmd_reveal_request(cfg, args):
    from callctl.store import reveal

    _print_json(reveal.request(_engine(cfg), args.binding, args.party, args.scenario, args.case, args.by,
                               max_uses=args.uses, ttl_seconds=args.ttl))


def cmd_reveal_decide(cfg, args):
    from callctl.store import reveal

    decide = reveal.approve if args.sub == "approve" else reveal.refuse
    _print_json(decide(_engine(cfg), args.grant_id, args.by, note=args.note or ""))


def cmd_reveal_use(cfg, args):
    from callctl.store import reveal

    _print_json(reveal.use(_engine(cfg), args.grant_id, args.by))


def cmd_reveal_list(cfg, args):
    from callctl.store import reveal

    _print_json(reveal.list_grants(_engine(cfg), binding_id=args.binding))


def cmd_audit_verify(cfg, args):
    from callctl.store import reveal

    try:
        result = reveal.verify(_engine(cfg), args.checkpoint)
    except reveal.CheckpointError as exc:
        print(f"audit log NOT VERIFIED: {exc}", file=sys.stderr)
        raise SystemExit(4) from None
    if not result["ok"]:
        print(f"audit log TAMPERED: row {result['bad_row']}: {result['problem']} "
              f"({result['rows']} row(s) before it are intact)", file=sys.stderr)
        raise SystemExit(4)
    print(f"audit log intact: {result['rows']} row(s), head {result['head'][:16]}")
    if result["rows"]:  # a copy kept elsewhere is what `--checkpoint FILE` reads back
        print(f"checkpoint: {reveal.checkpoint_line(result['rows'], result['head'])}")


def cmd_audit_export(cfg, args):
    from callctl.store import reveal

    data = reveal.export(_engine(cfg), args.format)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(data)
    else:
        sys.stdout.write(data)


def cmd_regulator_feed(cfg, args):
    """JSON lines, one event each, oldest first; --follow keeps reading (SIGTERM stops it
    after the line under way). --cursor-file keeps the position across restarts."""
    import signal
    import threading

    from callctl import feed

    if not args.interval > 0:
        raise SystemExit("callctl: --interval must be a positive number of seconds")
    cursor = args.after
    state = Path(args.cursor_file) if args.cursor_file else None
    if cursor is None and state is not None and state.exists():
        cursor = state.read_text().strip() or None
    feed.decode(cursor)  # a bad cursor is an error before anything is read
    engine, stop = _engine(cfg), threading.Event()
    if args.follow:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        got = feed.page(engine, cursor, args.limit)
        for event in got["events"]:
            sys.stdout.write(json.dumps(event, ensure_ascii=False, default=str) + "\n")
        sys.stdout.flush()
        if state is not None and got["next"] != cursor:
            temporary = state.with_name(state.name + ".tmp")
            temporary.write_text(got["next"] + "\n")
            os.replace(temporary, state)  # whole or not at all, across a crash
        cursor = got["next"]
        if not got["more"]:
            if not args.follow:
                return
            stop.wait(args.interval)


BLACKLIST_TABLE = [
    ("id", "id"), ("caller", "caller"), ("status", "status"), ("origin", "origin"), ("tenants", "tenants"),
    ("starts_at", "starts (UTC)"), ("ends_at", "ends (UTC)"), ("proposed_by", "proposed by"), ("reason", "reason"),
]


def cmd_blacklist(cfg, args):
    """callctl blacklist propose|approve|refuse|appeal|uphold|lift|show|list."""
    from callctl.store import blacklist

    engine, by = _engine(cfg), getattr(args, "by", None) or _login()
    if args.sub == "propose":
        result = blacklist.propose(engine, caller=args.caller, reason=args.reason, proposed_by=by,
                                   seconds=args.duration, findings=args.finding or [], cdrs=args.cdr or [],
                                   region=cfg.region)
    elif args.sub in ("approve", "show"):
        result = (blacklist.approve(engine, args.entry_id, by) if args.sub == "approve"
                  else blacklist.get(engine, args.entry_id))
    elif args.sub in ("refuse", "uphold", "lift"):
        result = getattr(blacklist, args.sub)(engine, args.entry_id, by, note=args.note or "")
    elif args.sub == "appeal":
        result = blacklist.appeal(engine, args.entry_id, by, args.note)
    elif args.tenant:
        result = blacklist.tenant_entries(engine, args.tenant)
    else:
        result = blacklist.list_entries(engine, status=args.status, caller=args.caller, region=cfg.region)
        if not args.json:
            for row in result:
                row["tenants"] = ",".join(row["tenants"])
                for key in ("starts_at", "ends_at"):
                    row[key] = (row[key] or "")[:19].replace("T", " ")
            print(_table(result, BLACKLIST_TABLE))
            print(f"({len(result)} entr{'y' if len(result) == 1 else 'ies'})")
            return
    _print_json(result)


def _blacklist_parser(top) -> None:
    blacklist = top.add_parser(
        "blacklist", help="the shared harassment blacklist (docs/regulator.md)").add_subparsers(dest="sub", required=True)
    propose = blacklist.add_parser("propose", help="propose a caller number; in force after two approvals")
    propose.add_argument("--caller", required=True, help="the caller's number")
    propose.add_argument("--reason", required=True, help="why (no phone numbers in here)")
    propose.add_argument("--finding", type=int, action="append", help="evidence: a finding about this caller")
    propose.add_argument("--cdr", type=int, action="append", help="evidence: a CDR of a call from this caller")
    propose.add_argument("--duration", type=int, help="seconds in force from the second approval (default: until lifted)")
    steps = {"approve": "approve (the second approval puts it in force)", "refuse": "refuse a proposal",
             "appeal": "record an appeal against an entry in force", "uphold": "decide an appeal: the entry stays",
             "lift": "end an entry in force now (it stays on record)", "show": "one entry with its evidence"}
    for name, what in steps.items():
        step = blacklist.add_parser(name, help=what)
        step.add_argument("entry_id", type=int)
        if name not in ("show", "approve"):
            step.add_argument("--note", required=name == "appeal", help="why (an appeal's grounds)")
        step.set_defaults(func=cmd_blacklist)
    for command in (propose, *(blacklist.choices[n] for n in steps if n != "show")):
        command.add_argument("--by", help="who does it (default: your login)")
    propose.set_defaults(func=cmd_blacklist)
    listing = blacklist.add_parser("list", help="entries, newest first")
    listing.add_argument("--status", choices=["proposed", "active", "refused", "lifted"])
    listing.add_argument("--caller", help="entries on this number")
    listing.add_argument("--tenant", help="what this tenant is shown: its own callers, its own evidence (JSON)")
    listing.add_argument("--json", action="store_true", help="JSON for programs")
    listing.set_defaults(func=cmd_blacklist)


def cmd_serve_pbx(cfg, args):
    from callctl.daemon import serve

    serve(args.sub, cfg)


def build_parser() -> argparse.ArgumentParser:
    from callctl.core.decision import Reason

    parser = argparse.ArgumentParser(prog="callctl", description="Privacy-number call control")
    parser.add_argument("--config", help="config file (default conf/callctl.yaml or $CALLCTL_CONFIG)")
    top = parser.add_subparsers(dest="command", required=True)

    db = top.add_parser("db", help="database schema").add_subparsers(dest="sub", required=True)
    db.add_parser("upgrade", help="create or migrate the schema").set_defaults(
        func=cmd_db_upgrade, checks_keys=False)  # it checks the ring once the schema has its table
    parts = db.add_parser("partitions", help="create the coming days' CDR partitions (PostgreSQL; the daemon does it hourly)")
    parts.add_argument("--days", type=_non_negative, default=7, help="days ahead (default 7)")
    parts.add_argument("--json", action="store_true", help="JSON for programs")
    parts.set_defaults(func=cmd_db_partitions, needs_keys=False)  # touches no stored number

    tenant = top.add_parser("tenant", help="tenants (businesses)").add_subparsers(dest="sub", required=True)
    add = tenant.add_parser("add", help="add a tenant")
    add.add_argument("name")
    add.add_argument("--hotline", required=True, help="the number customers reach (N)")
    add.add_argument("--caller", action="append", default=[], help="an agent's number (repeatable)")
    add.add_argument("--caller-prefix", action="append", default=[], help="agents' number prefix, e.g. +86105555")
    add.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                     help="reject unknown callers (default) or send them to the hotline")
    add.add_argument("--ring-timeout", type=int, default=30, help="seconds (default 30)")
    add.add_argument("--max-call-seconds", type=int, default=3600, help="default 3600")
    add.add_argument("--hours", default="08:00-21:00",
                     help="when the tenant may call customers, local time (default 08:00-21:00)")
    add.add_argument("--tz", default="Asia/Shanghai", help="the tenant's time zone (default Asia/Shanghai)")
    add.set_defaults(func=cmd_tenant_add)
    tenant.add_parser("list", help="list tenants").set_defaults(func=cmd_tenant_list)
    update = tenant.add_parser("update", help="change a tenant's calling hours, zone and limits")
    update.add_argument("name")
    update.add_argument("--hours", help="HH:MM-HH:MM local time; crossing midnight is fine (22:00-06:00)")
    update.add_argument("--tz", help="IANA time zone, e.g. Asia/Shanghai")
    update.add_argument("--ring-timeout", type=int, help="seconds")
    update.add_argument("--max-call-seconds", type=int, help="the PBX cuts the call there")
    update.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None)
    update.add_argument("--max-concurrent-calls", type=int,
                        help="calls of the tenant up at once on one PBX (486 past it); 0: no limit")
    update.set_defaults(func=cmd_tenant_update)

    pool = top.add_parser("pool", help="virtual number pools").add_subparsers(dest="sub", required=True)
    padd = pool.add_parser("add", help="add virtual numbers to a tenant's pool")
    padd.add_argument("--tenant", required=True)
    padd.add_argument("numbers", nargs="+")
    padd.set_defaults(func=cmd_pool_add)
    pimport = pool.add_parser("import", help="add virtual numbers from a CSV file: number[,tenant]")
    pimport.add_argument("file")
    pimport.add_argument("--tenant", help="for rows without a tenant column")
    pimport.set_defaults(func=cmd_pool_import)
    pstat = pool.add_parser("status", help="free/bound/quarantined counts")
    pstat.add_argument("--tenant", required=True)
    pstat.set_defaults(func=cmd_pool_status)

    bind = top.add_parser("bind", help="bind a virtual number to a customer; prints the binding")
    bind.add_argument("--tenant", help="the tenant (in --bulk: for rows without a tenant column)")
    bind.add_argument("--customer", help="the customer's real number (A)")
    bind.add_argument("--bulk", metavar="FILE",
                      help="CSV with a header: customer[,tenant,mode,other_party,reference,expires_at,ttl_seconds]")
    bind.add_argument("--out", help="--bulk: where the bindings made go (default FILE.bound.csv)")
    bind.add_argument("--mode", default="AXN", choices=["AXN", "AXB", "AXE"],
                      help="AXN: X for this customer alone; AXB: X shared by pairs (needs --other-party); "
                           "AXE: X shared through an extension")
    bind.add_argument("--other-party", help="AXB: the other party's real number (B)")
    bind.add_argument("--reference", help="external reference, e.g. a policy number")
    bind.add_argument("--purpose", action="append", choices=["service", "claims", "renewal", "marketing"],
                      help="a purpose of calls the customer accepts (repeatable; default: all but marketing)")
    bind.add_argument("--profile", choices=["elderly", "claims"], help="protection profile (tighter hours)")
    expiry = bind.add_mutually_exclusive_group()
    expiry.add_argument("--expires", help="ISO date-time with zone")
    expiry.add_argument("--ttl", type=int, help="seconds from now")
    bind.set_defaults(func=cmd_bind)

    unbind = top.add_parser("unbind", help="end a binding; its X is quarantined")
    unbind.add_argument("binding_id", type=int)
    unbind.set_defaults(func=cmd_unbind)

    block = top.add_parser("block", help="block calls (never deleted: lift ends them)").add_subparsers(
        dest="sub", required=True)
    badd = block.add_parser("add", help="block calls; effective on the next call on every daemon")
    badd.add_argument("--scope", required=True, choices=["binding", "caller", "number", "tenant"],
                      help="binding (--binding), caller (--tenant, --caller), number (--number X), "
                           "tenant (--tenant: suspends its calling rights)")
    badd.add_argument("--direction", required=True, choices=["to_customer", "from_customer", "both"])
    badd.add_argument("--reason", required=True, help="why (no phone numbers in here)")
    badd.add_argument("--by", help="who sets it (default: your login)")
    badd.add_argument("--tenant")
    badd.add_argument("--binding", type=int, help="binding id")
    badd.add_argument("--number", help="virtual number X")
    badd.add_argument("--caller", help="the caller's number")
    badd.add_argument("--starts", help="ISO date-time with zone (default now)")
    bend = badd.add_mutually_exclusive_group()
    bend.add_argument("--ends", help="ISO date-time with zone (default: until lifted)")
    bend.add_argument("--duration", type=int, help="seconds from the start")
    badd.add_argument("--cut-active", action="store_true",
                      help="also hang up the live calls it refuses now (over AMI, within a second)")
    badd.set_defaults(func=cmd_block_add_and_cut)
    blist = block.add_parser("list", help="blocks, newest first")
    blist.add_argument("--tenant")
    blist.add_argument("--scope", choices=["binding", "caller", "number", "tenant"])
    blist.add_argument("--binding", type=int)
    blist.add_argument("--number")
    blist.add_argument("--caller")
    blist.add_argument("--active", action="store_true", help="only blocks in force now")
    blist.add_argument("--limit", type=int, default=100)
    blist.add_argument("--json", action="store_true", help="JSON for programs")
    blist.set_defaults(func=cmd_block_list)
    blift = block.add_parser("lift", help="end a block now (it stays on record)")
    blift.add_argument("block_id", type=int)
    blift.add_argument("--by", help="who lifts it (default: your login)")
    blift.set_defaults(func=cmd_block_lift)

    _blacklist_parser(top)

    regulator = top.add_parser("regulator", help="the regulator's live feed (docs/regulator.md)").add_subparsers(
        dest="sub", required=True)
    rfeed = regulator.add_parser("feed", help="contact-behaviour events as JSON lines, oldest first")
    rfeed.add_argument("--after", help="start after this cursor (an event's `cursor`); default: the beginning")
    rfeed.add_argument("--cursor-file", help="resume from the cursor kept in this file and keep it up to date")
    rfeed.add_argument("--follow", action="store_true", help="keep reading new events (SIGTERM stops it)")
    rfeed.add_argument("--interval", type=float, default=2.0, help="--follow: seconds between reads when idle")
    rfeed.add_argument("--limit", type=int, default=500, help="events per read (1-1000)")
    rfeed.set_defaults(func=cmd_regulator_feed)

    binding = top.add_parser("binding", help="read and change bindings").add_subparsers(dest="sub", required=True)
    bget = binding.add_parser("get", help="one binding (numbers masked)")
    bget.add_argument("binding_id", type=int)
    bget.set_defaults(func=cmd_binding_get)
    blist = binding.add_parser("list", help="bindings in id order, a page at a time")
    blist.add_argument("--tenant")
    blist.add_argument("--reference", help="external reference, e.g. a policy number")
    blist.add_argument("--status", choices=["active", "expired", "ended"],
                       help="active: in force; expired: past its expiry (its X released by housekeeping); "
                            "ended: unbound")
    blist.add_argument("--after", type=int, default=0, help="show ids after this one (paging)")
    blist.add_argument("--limit", type=int, default=100, help="1-1000 (default 100)")
    blist.add_argument("--json", action="store_true", help="JSON for programs")
    blist.set_defaults(func=cmd_binding_list)
    bext = binding.add_parser("extend", help="set a new expiry (renewal; an expired binding is revived on "
                                             "its X unless X serves someone else now)")
    bext.add_argument("binding_id", type=int)
    new_expiry = bext.add_mutually_exclusive_group()
    new_expiry.add_argument("--expires", help="ISO date-time with zone")
    new_expiry.add_argument("--ttl", type=int, help="seconds from now")
    new_expiry.add_argument("--no-expiry", action="store_true", help="never expires (until unbound)")
    bext.set_defaults(func=cmd_binding_extend)
    bupd = binding.add_parser("update", help="change the customer's number or the reference")
    bupd.add_argument("binding_id", type=int)
    bupd.add_argument("--customer", help="the customer's new real number (A)")
    bupd.add_argument("--reference")
    bupd.set_defaults(func=cmd_binding_update)

    cdr = top.add_parser("cdr", help="call detail records").add_subparsers(dest="sub", required=True)
    clist = cdr.add_parser("list", help="newest calls first")
    clist.add_argument("--limit", type=int, default=50)
    ctail = cdr.add_parser("tail", help="the last calls, then new ones as they are written (Ctrl-C stops)")
    ctail.add_argument("--backlog", type=int, default=10, help="calls shown first (default 10)")
    ctail.add_argument("--every", type=float, default=1.0, help="seconds between looks (default 1)")
    for sub in (clist, ctail):
        sub.add_argument("--tenant", help="tenant name")
        sub.add_argument("--x", help="virtual number")
        sub.add_argument("--binding", type=int, help="binding id")
        sub.add_argument("--since", help="ISO date/date-time with zone, or an age: 15m, 2h, 7d")
        sub.add_argument("--decision", choices=["bridged", "rejected"])
        sub.add_argument("--reason", choices=[str(reason) for reason in Reason])
        sub.add_argument("--json", action="store_true", help="JSON for programs (tail: one object per line)")
    clist.add_argument("--until", help="exclusive end, same forms as --since")
    clist.set_defaults(func=cmd_cdr_list)
    ctail.set_defaults(func=cmd_cdr_tail)
    cimp = cdr.add_parser("import-pbx", help="CDRs the dialplan kept while no daemon answered (CALLCTL_CDR_FALLBACK)")
    cimp.add_argument("file", help="the PBX's file; removed once every line is in the database")
    cimp.add_argument("--json", action="store_true")
    cimp.set_defaults(func=cmd_cdr_import_pbx)

    export = top.add_parser("export", help="exports").add_subparsers(dest="sub", required=True)
    reg = export.add_parser("regulator", help="contact statistics per tenant, per day, findings and reveals")
    reg.add_argument("--from", dest="start", required=True, help="ISO date (UTC) or date-time with zone")
    reg.add_argument("--to", dest="end", required=True, help="exclusive end, same forms")
    reg.add_argument("--format", choices=["csv", "json", "html"], default="csv",
                     help="csv (default), json, or html: a self-contained report with charts")
    reg.add_argument("--output", "-o", help="write to this file instead of standard output")
    reg.set_defaults(func=cmd_export_regulator)

    contacts = export.add_parser("contacts", help="the EAST contact register: policy -> virtual number (CSV)")
    contacts.add_argument("--tenant", required=True)
    contacts.add_argument("--as-of", required=True, help="YYYY-MM-DD (end of that day, tenant's zone) or ISO date-time")
    contacts.add_argument("--output", "-o", help="write to this file instead of stdout")
    contacts.set_defaults(func=cmd_export_contacts)

    anomaly = top.add_parser("anomaly", help="the anomaly job over CDRs").add_subparsers(dest="sub", required=True)
    arun = anomaly.add_parser("run", help="one pass from the stored watermark (--follow: keep going)")
    arun.add_argument("--rules", help="rules file (default: anomaly_rules in the config)")
    arun.add_argument("--follow", action="store_true", help="keep consuming new CDRs until SIGTERM")
    arun.add_argument("--interval", type=float, help="--follow: seconds between passes (default from the rules file)")
    arun.set_defaults(func=cmd_anomaly_run, needs_keys=False)  # reads masked CDRs and hashes only

    findings = top.add_parser("findings", help="what the anomaly job found").add_subparsers(dest="sub", required=True)
    flist = findings.add_parser("list", help="newest first")
    flist.add_argument("--tenant")
    flist.add_argument("--rule", choices=list(ANOMALY_RULES))
    flist.add_argument("--since", help="ISO date-time with zone: findings whose last call is at or after it")
    flist.add_argument("--limit", type=int, default=100)
    flist.add_argument("--json", action="store_true", help="JSON for programs")
    flist.set_defaults(func=cmd_findings_list, needs_keys=False)

    keys = top.add_parser("keys", help="keys of the real numbers at rest (docs/keys.md)").add_subparsers(
        dest="sub", required=True)
    kgen = keys.add_parser("generate", help="create the key file or add a new (current) key to it")
    kgen.add_argument("--file", help="key file (default: keys.file of the config)")
    kgen.add_argument("--id", help="key id (default: k + UTC date and time)")
    kgen.set_defaults(func=cmd_keys_generate, needs_keys=False)
    keys.add_parser("list", help="keys in the ring and the stored numbers under each").set_defaults(
        func=cmd_keys_list)
    krot = keys.add_parser("rotate", help="re-encrypt stored numbers under the current key")
    krot.add_argument("--batch", type=int, default=1000, help="rows per transaction (default 1000)")
    krot.add_argument("--rehash", action="store_true",
                      help="rewrite every row, hashes too (after the lookup secret changed)")
    krot.set_defaults(func=cmd_keys_rotate)

    reveal = top.add_parser("reveal", help="audited reveals of a real number (docs/reveal.md)").add_subparsers(
        dest="sub", required=True)
    rreq = reveal.add_parser("request", help="ask for a grant to see one party's real number")
    rreq.add_argument("--binding", type=int, required=True)
    rreq.add_argument("--party", choices=["a", "b"], default="a", help="a: the customer (default); b: AXB's other")
    rreq.add_argument("--scenario", choices=["claim", "complaint", "aml"], required=True)
    rreq.add_argument("--case", required=True, help="the case reference")
    rreq.add_argument("--by", required=True, help="your name (the requester)")
    rreq.add_argument("--uses", type=int, default=1, help="reveals allowed (default 1)")
    rreq.add_argument("--ttl", type=int, default=3600, help="seconds the grant lasts after approval (default 3600)")
    rreq.set_defaults(func=cmd_reveal_request)
    for name, what in (("approve", "approve a grant (a second person)"), ("refuse", "refuse a grant")):
        rdec = reveal.add_parser(name, help=what)
        rdec.add_argument("grant_id", type=int)
        rdec.add_argument("--by", required=True, help="your name (not the requester's)")
        rdec.add_argument("--note")
        rdec.set_defaults(func=cmd_reveal_decide)
    ruse = reveal.add_parser("use", help="see the real number under an active grant (audited)")
    ruse.add_argument("grant_id", type=int)
    ruse.add_argument("--by", required=True, help="your name (the requester)")
    ruse.set_defaults(func=cmd_reveal_use)
    rlist = reveal.add_parser("list", help="grants and their state")
    rlist.add_argument("--binding", type=int)
    rlist.set_defaults(func=cmd_reveal_list)

    audit = top.add_parser("audit", help="the hash-chained audit log").add_subparsers(dest="sub", required=True)
    averify = audit.add_parser("verify", help="check the chain and the checkpoints; names the first bad row (exit 4)")
    averify.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                         help="also hold the log against this checkpoint (a copy kept elsewhere); repeatable")
    averify.set_defaults(func=cmd_audit_verify)
    aexp = audit.add_parser("export", help="the whole log (no real numbers in it)")
    aexp.add_argument("--format", choices=["json", "csv"], default="json")
    aexp.add_argument("--output", "-o", help="file (default: standard output)")
    aexp.set_defaults(func=cmd_audit_export, needs_keys=False)

    calls = top.add_parser("calls", help="bridged calls now up on this PBX (over AMI; parties masked)")
    calls.add_argument("--json", action="store_true")
    calls.set_defaults(func=cmd_calls)
    doctor = top.add_parser("doctor", help="check this box end to end and say what to fix")
    doctor.set_defaults(func=cmd_doctor, needs_keys=False)
    serve = top.add_parser("serve", help="run the daemon").add_subparsers(dest="sub", required=True)
    serve.add_parser("asterisk", help="FastAGI server for Asterisk").set_defaults(
        func=cmd_serve_pbx, checks_keys=False)  # checks the ring itself: the database may be down at start
    serve.add_parser("api", help="provisioning HTTP API (api.listen)").set_defaults(func=cmd_serve_api)

    token = top.add_parser("token", help="provisioning API tokens").add_subparsers(dest="sub", required=True)
    tcreate = token.add_parser("create", help="make a token; it is printed once, stored hashed")
    tcreate.add_argument("--tenant", help="the tenant it acts for (role tenant)")
    tcreate.add_argument("--role", default="tenant", help="what the token may do (default tenant)")
    tcreate.add_argument("--name", help="what it is for, e.g. the insurer's policy system")
    tcreate.set_defaults(func=cmd_token_create)
    token.add_parser("list", help="tokens (never the tokens themselves)").set_defaults(func=cmd_token_list)
    trevoke = token.add_parser("revoke", help="stop a token working, at once")
    trevoke.add_argument("token_id", type=int)
    trevoke.set_defaults(func=cmd_token_revoke)
    from callctl import cli_customers

    cli_customers.add_parsers(top, tenant, binding)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from callctl.store import crypto, reveal
    from callctl.store.provision import ProvisionError
    from callctl.store.spool import SpoolError
    from sqlalchemy.exc import OperationalError, ProgrammingError

    try:
        cfg = config_mod.load(args.config)
        logs.setup(cfg.log.format, cfg.log.level)
        if getattr(args, "needs_keys", True):
            # At startup, so a missing or bad key stops us here and not at the first call.
            crypto.install(crypto.load_ring(cfg.keys.file, cfg.keys.current))
            if getattr(args, "checks_keys", True):  # the ring must be the database's (keycheck.py)
                from callctl.store import keycheck

                engine = _engine(cfg)
                try:
                    keycheck.verify(engine, new_lookup=getattr(args, "rehash", False))
                finally:
                    engine.dispose()  # e.g. `serve api` would keep its connection open
        reveal.use_checkpoint(cfg.audit_checkpoint)
        args.func(cfg, args)
    except (config_mod.ConfigError, SpoolError) as exc:
        print(f"callctl: config error: {exc}", file=sys.stderr)
        return 2
    except crypto.KeyConfigError as exc:
        print(f"callctl: key error: {exc}", file=sys.stderr)
        return 2
    except crypto.DecryptError as exc:
        print(f"callctl: key error: {exc} (is every key still in the ring? 'callctl keys list')",
              file=sys.stderr)
        return 2
    except ProvisionError as exc:
        print(f"callctl: {exc} [{exc.code}]", file=sys.stderr)
        return 1
    except (OperationalError, ProgrammingError) as exc:
        print(f"callctl: database error: {type(exc.orig).__name__}: {str(exc.orig).splitlines()[0]}"
              " (is the database reachable, and did you run 'callctl db upgrade'?)", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
