from dataclasses import dataclass
from typing import Literal

import pytest

from dca.checks import check_literal_fields, literal_choices
from dca.errors import ArgumentError


def test_literal_choices_reads_a_literal_also_when_optional():
    assert literal_choices(Literal["a", "b"]) == ("a", "b")
    assert literal_choices(Literal["a", "b"] | None) == ("a", "b")
    assert literal_choices(str) is None and literal_choices(int | None) is None


@dataclass
class Options:
    mode: Literal["fast", "exact"] = "fast"
    layout: Literal["after", "window"] | None = None
    name: str = "free text"


def test_check_literal_fields():
    check_literal_fields(Options())  # None where the annotation allows it; plain str fields are not checked
    check_literal_fields(Options(mode="exact", layout="window", name="anything"))
    for kwargs, name in (({"mode": "slow"}, "mode"), ({"layout": "before"}, "layout"), ({"mode": None}, "mode")):
        with pytest.raises(ArgumentError, match="must be one of") as caught:
            check_literal_fields(Options(**kwargs))
        assert caught.value.argument == name
