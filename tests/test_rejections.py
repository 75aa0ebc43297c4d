"""The one reason -> (cause, announcement) table (callctl/core/rejections.py) is what both
PBXs do: every Reason has an entry, the Asterisk dialplan's callctl-reject and
callctl-dialstatus contexts use its causes, and the FreeSWITCH dialplan's fail-closed
end is its `unavailable` entry."""
import re
from pathlib import Path

from callctl.core.decision import Reason
from callctl.core.rejections import DIAL_END_CAUSES, OTHER_DIAL_END_CAUSE, REJECTIONS, rejection

REPO = Path(__file__).resolve().parent.parent
ASTERISK = (REPO / "dialplan/asterisk/extensions_callctl.conf").read_text()
FREESWITCH = (REPO / "dialplan/freeswitch/callctl.xml").read_text()


def context(name: str) -> str:
    return ASTERISK.split(f"[{name}]", 1)[1].split("\n[", 1)[0]


def test_every_reason_has_one_entry_and_unknown_words_fail_closed():
    assert set(REJECTIONS) == set(Reason)
    assert len({r.prompt for r in REJECTIONS.values()}) == len(REJECTIONS)
    assert rejection("no_such_reason") == REJECTIONS[Reason.UNAVAILABLE]


def test_asterisk_reject_context_uses_the_tables_causes():
    causes = dict(re.findall(r"exten => (\w+),1,.*\n same => n,Set\(CALLCTL_CAUSE=(\d+)\)", context("callctl-reject")))
    assert causes == {str(reason): str(entry.cause) for reason, entry in REJECTIONS.items()}


def test_asterisk_dialstatus_context_uses_the_tables_causes():
    causes = dict(re.findall(r"exten => (\w+),1,Hangup\((\d+)\)", context("callctl-dialstatus")))
    assert causes == {**{k: str(v) for k, v in DIAL_END_CAUSES.items()}, "other": str(OTHER_DIAL_END_CAUSE)}


def test_freeswitch_fail_closed_is_the_unavailable_entry():
    unavailable = REJECTIONS[Reason.UNAVAILABLE]
    assert f"/{unavailable.prompt}.wav" in FREESWITCH
    assert f'<action application="hangup" data="{unavailable.cause}"/>' in FREESWITCH
