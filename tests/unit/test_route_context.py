"""Query-parameter parsing shared by the routes (a1111_proxy/routes/context.py)."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from a1111_proxy.errors import InvalidRequest
from a1111_proxy.routes.context import bool_param, choice, int_param


def request_with(query: str) -> Request:
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/",
            "query_string": query.encode(),
            "headers": [],
        }
    )


@pytest.mark.parametrize(
    ("query", "default", "expected"),
    [
        ("", False, False),
        ("", True, True),
        ("x=true", False, True),
        ("x=1", False, True),
        ("x=Yes", False, True),
        ("x=on", False, True),
        ("x=false", False, False),
        ("x=maybe", False, False),
        ("x=false", True, False),
        ("x=0", True, False),
        ("x=%20NO%20", True, False),
        ("x=off", True, False),
        ("x=true", True, True),
        ("x=maybe", True, True),
    ],
)
def test_a_yes_or_no_parameter_keeps_its_default_unless_a_word_says_otherwise(
    query: str, default: bool, expected: bool
) -> None:
    assert bool_param(request_with(query), "x", default=default) is expected


def test_a_number_parameter_is_read_within_its_range_and_defaults_when_absent() -> None:
    assert int_param(request_with("limit=7"), "limit", default=50, low=1, high=200) == 7
    assert int_param(request_with(""), "limit", default=50, low=1, high=200) == 50
    assert int_param(request_with(""), "cursor", default=None, low=1, high=9) is None


@pytest.mark.parametrize("value", ["0", "201", "-1", "2.5", "ten", ""])
def test_a_number_parameter_out_of_range_or_not_whole_is_refused_naming_it(value: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        int_param(request_with(f"limit={value}"), "limit", default=50, low=1, high=200)
    assert refused.value.errors == [
        {
            "loc": ["query", "limit"],
            "type": "int_parsing",
            "msg": "must be a whole number from 1 to 200",
        }
    ]


def test_a_choice_parameter_outside_its_choices_is_refused_listing_them() -> None:
    assert choice(request_with("status=queued"), "status", ("queued", "failed")) == "queued"
    assert choice(request_with(""), "status", ("queued", "failed")) is None
    with pytest.raises(InvalidRequest) as refused:
        choice(request_with("status=done"), "status", ("queued", "failed"))
    assert refused.value.errors == [
        {"loc": ["query", "status"], "type": "enum", "msg": "must be one of queued, failed"}
    ]


class StoreStoredMeanwhile:
    """A catalogue store whose model list a worker stores between the route's two reads."""

    def __init__(self) -> None:
        self.reads = 0

    async def entry(self, name: str) -> object:
        from a1111_proxy.catalogue import Entry

        self.reads += 1
        return None if self.reads == 1 else Entry([{"title": "m.safetensors"}], 0.0)

    async def ever_fetched(self) -> bool:
        return self.reads >= 1  # stored by now


@pytest.mark.anyio
async def test_a_model_list_stored_between_the_routes_reads_is_answered_not_read_as_empty() -> None:
    from a1111_proxy.routes.context import read_catalogue

    request = Request(
        {"type": "http", "headers": [], "state": {"catalogue": StoreStoredMeanwhile()}}
    )
    body, headers = await read_catalogue(request, "sd-models")
    assert body == [{"title": "m.safetensors"}] and "Age" in headers
