"""Errors carry their HTTP status in their class (callctl/errors.py): no table of codes in
the API that a new code could miss and silently become 422."""
import re
from pathlib import Path

from callctl import errors

SOURCE = Path(__file__).resolve().parent.parent / "callctl"
# What a code's name promises, and the class that keeps the promise.
PROMISES = {r"_not_found\Z": errors.NotFound, r"_ended\Z|conflict\Z|_exists\Z|_exhausted\Z": errors.Conflict,
            r"_busy\Z": errors.Unavailable, r"\Aunauthorized\Z": errors.Unauthorized}


def test_each_kind_has_its_status():
    assert [k.status for k in (errors.ProvisionError, errors.Unauthorized, errors.Forbidden, errors.NotFound,
                               errors.Conflict, errors.Unavailable)] == [422, 401, 403, 404, 409, 503]
    assert issubclass(errors.NotFound, errors.ProvisionError)  # `except ProvisionError` catches every kind


def test_codes_are_raised_through_the_kind_their_name_promises():
    raised = re.compile(r"\b(\w+)\(\s*\"([a-z_]+)\"")
    checked, wrong = 0, []
    for path in SOURCE.rglob("*.py"):
        for kind, code in raised.findall(path.read_text()):
            for pattern, expected in PROMISES.items():
                if re.search(pattern, code) and isinstance(vars(errors).get(kind), type):
                    checked += 1
                    if not issubclass(vars(errors)[kind], expected):
                        wrong.append(f"{path.relative_to(SOURCE)}: {kind}({code!r}) should be {expected.__name__}")
    assert checked >= 10 and not wrong, wrong
