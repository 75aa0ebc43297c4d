"""How each rejection reason ends a call: its Q.850 cause and its announcement.

The one table for every PBX: the FreeSWITCH backend plays `prompt` (a sound file of that
name in the dialplan's `callctl_sounds` directory, `text` spoken) as early media and
hangs up with `cause`; the Asterisk dialplan's context callctl-reject uses the same
causes with Asterisk's stock prompts (tests/test_rejections.py holds it to this table).
A new Reason adds one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass

from callctl.core.decision import Reason


@dataclass(frozen=True)
class Rejection:
    cause: int  # Q.850; the SIP response follows from it (e.g. 1 -> 404, 21 -> 403)
    prompt: str  # file name, without extension, of the announcement
    text: str  # what the announcement says


REJECTIONS: dict[Reason, Rejection] = {
    Reason.UNKNOWN_NUMBER: Rejection(1, "unknown_number", "The number you have dialed is not in service."),
    Reason.UNKNOWN_CALLER: Rejection(21, "unknown_caller", "Your call cannot be completed as dialed."),
    Reason.BLOCKED: Rejection(21, "blocked", "I'm sorry. This call is not available on this line."),
    Reason.EXPIRED: Rejection(22, "expired", "I'm sorry, that number is no longer valid."),
    Reason.OUTSIDE_HOURS: Rejection(31, "outside_hours", "We're sorry. Please try your call again later."),
    Reason.UNAVAILABLE: Rejection(34, "unavailable", "All circuits are busy now. Please try your call again later."),
    Reason.OPTED_OUT: Rejection(21, "opted_out", "I'm sorry. Your call cannot be completed as dialed."),
    Reason.PURPOSE_NOT_ALLOWED: Rejection(21, "purpose_not_allowed", "Your call cannot be completed on this line."),
    Reason.BLACKLISTED: Rejection(21, "blacklisted", "I'm sorry. Your call cannot be completed as dialed. Goodbye."),
    # The PBX counts the tenant's live calls (Asterisk: GROUP_COUNT; FreeSWITCH: mod_hash's limit).
    Reason.CONCURRENT_LIMIT: Rejection(17, "concurrent_limit", "All circuits are busy now. Please try your call again later."),
    # AXE, wrong or no extension twice: the call was answered, so a BYE carries the cause.
    Reason.INVALID_EXTENSION: Rejection(28, "invalid_extension", "Please check the number and dial again."),
}

# Announcements of the AXE extension prompt (FreeSWITCH: files in callctl_sounds too).
EXTENSION_PROMPTS: dict[str, str] = {
    "enter_extension": "Please enter the extension of the person you wish to call.",
    "invalid_try_again": "That is not a valid extension. Please try again.",
}

# The customers' self-service line on FreeSWITCH (docs/esl.md, 1c): the menu says, per
# insurer, "press <n>" then "calls enabled" or "calls disabled" (Asterisk: stock prompts).
SELFSERVICE_PROMPTS: dict[str, str] = {
    "selfservice_press": "Press",
    **{f"selfservice_{n}": word for n, word in enumerate(
        ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"], start=1)},
    "selfservice_enabled": "calls enabled.",
    "selfservice_disabled": "calls disabled.",
    "selfservice_stopped": "De-activated. Thank you.",
    "selfservice_allowed": "Activated. Thank you.",
    "selfservice_invalid": "Invalid option.",
    "selfservice_nobody": "No insurer holds a number for you.",
}


def rejection(reason: str) -> Rejection:
    """The table's entry; an unknown word (a newer daemon, garbage) ends as unavailable."""
    try:
        return REJECTIONS[Reason(reason)]
    except ValueError:
        return REJECTIONS[Reason.UNAVAILABLE]

# How a bridge attempt that did not end the call ends the caller's leg, by its outcome
# (Asterisk's DIALSTATUS words; the Asterisk dialplan's context callctl-dialstatus).
DIAL_END_CAUSES: dict[str, int] = {
    "ANSWER": 16, "CANCEL": 16, "BUSY": 17, "NOANSWER": 19, "CHANUNAVAIL": 20, "CONGESTION": 34,
}
OTHER_DIAL_END_CAUSE = 41
