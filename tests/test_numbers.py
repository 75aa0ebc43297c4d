import pytest

from callctl.core.numbers import InvalidNumber, caller_e164, mask, to_e164


@pytest.mark.parametrize("raw, expected", [
    ("13812345678", "+8613812345678"),
    ("+86 138 1234 5678", "+8613812345678"),
    ("008613812345678", "+8613812345678"),
    ("010 5800 0000", "+861058000000"),
    ("+44 20 7946 0958", "+442079460958"),
    ("+1 212 555 0100", "+12125550100"),
])
def test_to_e164(raw, expected):
    assert to_e164(raw) == expected


@pytest.mark.parametrize("raw", ["", "abc", "123", "+86 123", "+999 1234567"])
def test_invalid_numbers_are_refused_without_echo(raw):
    with pytest.raises(InvalidNumber) as info:
        to_e164(raw)
    assert raw.strip() == "" or raw not in str(info.value)


@pytest.mark.parametrize("raw, expected", [
    ("", None), ("anonymous", None), ("unknown", None), (None, None),
    ("13812345678", "+8613812345678"), ("+8613812345678", "+8613812345678"),
])
def test_caller_e164(raw, expected):
    assert caller_e164(raw) == expected


@pytest.mark.parametrize("number, masked", [
    ("+8613812345678", "+86138****5678"),
    ("+442079460958", "+44207***0958"),
    ("+12125550100", "+1212***0100"),
    ("+3531234", "+353**34"),
    ("", ""),
])
def test_mask(number, masked):
    assert mask(number) == masked
    assert number == "" or number not in mask(number)
