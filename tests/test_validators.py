"""The shared numeric checks: every accepted value passes, every other raises the part's error
naming the field, through both the attrs validator and ``check``."""

from __future__ import annotations

import math

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from servekit._validators import int_at_least, number_in, prefixed
from servekit.errors import ServekitError


class ParamError(ServekitError, ValueError):
    """An error taking (name, message), like InvalidRouteParameterError."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class MessageError(ServekitError, ValueError):
    """An error taking one message, like LimitConfigError."""


not_numbers = st.one_of(
    st.booleans(), st.text(max_size=5), st.none(), st.lists(st.integers(), max_size=2),
    st.complex_numbers(allow_nan=False, allow_infinity=False).filter(lambda z: z.imag != 0),
)


@given(minimum=st.integers(-1000, 1000), offset=st.integers(0, 10**30))
def test_int_at_least_accepts_every_int_from_the_minimum(minimum: int, offset: int) -> None:
    value = minimum + offset
    assert int_at_least(minimum, error=ParamError).check("count", value) is value


@given(minimum=st.integers(-1000, 1000), below=st.integers(1, 10**30))
def test_int_at_least_rejects_smaller_ints(minimum: int, below: int) -> None:
    validator = int_at_least(minimum, error=ParamError)
    with pytest.raises(ParamError, match=rf"^count: must be an integer >= {minimum}, got ") as e:
        validator.check("count", minimum - below)
    assert e.value.param == "count"


@given(
    minimum=st.integers(-1, 1),
    value=st.one_of(not_numbers, st.floats(), st.integers(1, 5).map(float)),
)
def test_int_at_least_rejects_bools_floats_and_non_numbers(minimum: int, value: object) -> None:
    with pytest.raises(ParamError, match=r"^size: "):
        int_at_least(minimum, error=ParamError).check("size", value)


@given(low=st.floats(-1e6, 1e6), span=st.floats(0, 1e6), fraction=st.floats(0, 1))
def test_number_in_accepts_finite_numbers_in_range(low: float, span: float, fraction: float) -> None:
    high = low + span
    value = min(max(low + fraction * span, low), high)
    assert number_in(low, high, error=ParamError).check("x", value) == value
    assert number_in(low, error=ParamError).check("x", value) == value


@given(
    value=st.one_of(
        not_numbers,
        st.sampled_from([math.nan, math.inf, -math.inf, -1e-300, -1, 1.0000001, 2]),
    )
)
def test_number_in_rejects_out_of_range_non_finite_and_non_numbers(value: object) -> None:
    with pytest.raises(MessageError, match=r"^share must be a finite number in \[0, 1\], got "):
        number_in(0, 1, error=prefixed(MessageError)).check("share", value)


def test_number_in_low_open_excludes_the_low_end() -> None:
    positive = number_in(0, low_open=True, error=prefixed(MessageError))
    assert positive.check("rate", 1e-300) == 1e-300
    for bad in (0, 0.0, -1, math.inf, True):
        with pytest.raises(MessageError, match=r"^rate must be a finite number > 0, got "):
            positive.check("rate", bad)


@attrs.frozen
class Load:
    running: int = attrs.field(validator=int_at_least(0, error=ParamError))
    kv_usage: float = attrs.field(validator=number_in(0, 1, error=ParamError))


@given(running=st.integers(-5, 5), kv_usage=st.floats(-1, 2), bad=st.booleans())
def test_attrs_fields_raise_the_error_naming_the_attribute(
    running: int, kv_usage: float, bad: bool
) -> None:
    if running < 0:
        with pytest.raises(ParamError, match=r"^running: "):
            Load(running, 0.5)
    elif not 0 <= kv_usage <= 1:
        with pytest.raises(ParamError, match=r"^kv_usage: "):
            Load(running, kv_usage)
    else:
        assert Load(running, kv_usage).running == running
    with pytest.raises(ParamError, match=r"^running: "):
        Load(bad, 0.5)
