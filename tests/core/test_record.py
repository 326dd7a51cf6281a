"""firma.core.record keeps the dataclasses semantics the code relies on; each case is checked
against a real dataclass so a difference shows up as a failing comparison, not a guess."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest

from firma.core.record import FrozenInstanceError, asdict, field, fields, record, replace


@record
class Point:
    x: int
    y: int = 0
    tags: tuple = field(default_factory=tuple)
    secret: str = field(default="", repr=False)
    KIND: ClassVar[str] = "point"


@dataclasses.dataclass(frozen=True)
class DPoint:
    x: int
    y: int = 0
    tags: tuple = dataclasses.field(default_factory=tuple)
    secret: str = dataclasses.field(default="", repr=False)
    KIND: ClassVar[str] = "point"


@record(frozen=False)
class Box:
    items: list = field(default_factory=list)


def test_construction_matches_dataclasses():
    for args, kwargs in [((1,), {}), ((1, 2), {}), ((), {"x": 3, "y": 4}), ((5,), {"tags": ("a",)})]:
        r, d = Point(*args, **kwargs), DPoint(*args, **kwargs)
        assert (r.x, r.y, r.tags, r.secret) == (d.x, d.y, d.tags, d.secret)
    assert [f.name for f in fields(Point)] == [f.name for f in dataclasses.fields(DPoint)]
    assert Point.KIND == "point" and "KIND" not in [f.name for f in fields(Point)]


@pytest.mark.parametrize(
    "args,kwargs",
    [((), {}), ((1, 2, (), "", 9), {}), ((1,), {"x": 2}), ((1,), {"z": 2})],
    ids=["missing", "too-many", "twice", "unknown"],
)
def test_bad_construction_raises_typeerror_like_dataclasses(args, kwargs):
    with pytest.raises(TypeError):
        DPoint(*args, **kwargs)
    with pytest.raises(TypeError):
        Point(*args, **kwargs)


def test_frozen_eq_hash_repr():
    a, b = Point(1, 2), Point(1, 2)
    assert a == b and hash(a) == hash(b) and a != Point(1, 3)
    assert len({a, b, Point(2)}) == 2
    with pytest.raises(FrozenInstanceError):
        a.x = 5
    with pytest.raises(AttributeError):
        del a.y
    assert repr(Point(1, 2, secret="s")) == repr(DPoint(1, 2, secret="s")).replace("DPoint", "Point")
    assert "s" not in repr(Point(1, secret="s")).split("tags")[1]


def test_equality_needs_the_same_class():
    @record
    class Other:
        x: int
        y: int = 0
        tags: tuple = ()
        secret: str = ""

    assert Point(1) != Other(1)
    assert Point(1) != (1, 0, (), "")


def test_mutable_record_is_unhashable_and_factories_are_fresh():
    a, b = Box(), Box()
    a.items.append(1)
    assert b.items == [] and a != b
    a.items = [2]
    assert a == Box([2])
    with pytest.raises(TypeError):
        hash(a)


def test_replace_and_asdict():
    p = Point(1, 2, ("t",))
    q = replace(p, y=7)
    assert (q.x, q.y, q.tags) == (1, 7, ("t",)) and p.y == 2
    with pytest.raises(TypeError):
        replace(p, nope=1)
    assert asdict(p) == dataclasses.asdict(DPoint(1, 2, ("t",)))
    assert asdict(Box([Point(1)])) == {"items": [{"x": 1, "y": 0, "tags": (), "secret": ""}]}


def test_definition_errors_like_dataclasses():
    with pytest.raises(ValueError):

        @record
        class BadDefault:
            items: list = []

    with pytest.raises(TypeError):

        @record
        class BadOrder:
            a: int = 1
            b: int


def test_fields_are_inherited_bases_first():
    @record
    class Base:
        a: int

    @record
    class Child(Base):
        b: int = 2

    c = Child(1)
    assert (c.a, c.b) == (1, 2) and [f.name for f in fields(Child)] == ["a", "b"]
