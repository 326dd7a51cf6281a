"""Value classes for firma's data: `@record` (frozen by default) with `field`, `replace` and
`asdict`, the subset of `dataclasses` this project uses.

Why not `dataclasses`: it writes each class's `__init__`, `__eq__`, `__repr__`, `__hash__` and
`__setattr__` as source text and compiles it at import time, ≈0.5–0.9 ms per class on the
machines firma targets. The launch path defines ~50 such classes, so `dataclasses` alone cost
~25 ms of a `firma run` (the launch benchmark's budget is ~70 ms). A record shares generic
methods driven by the class's field table instead: defining one costs microseconds, building
one costs a few microseconds more than a dataclass, which no hot path notices.

Semantics kept from `dataclasses` (tested in tests/core/test_record.py): fields in annotation order
(bases first), defaults and `field(default_factory=…)`, positional or keyword construction with
the same TypeErrors, mutable defaults refused, non-default after default refused, `ClassVar`
skipped, frozen instances raise `FrozenInstanceError` (an AttributeError) on assignment,
equality only between instances of the same class, frozen records hashable, mutable ones not."""

from __future__ import annotations

from typing import Any, Callable, TypeVar, dataclass_transform, overload

_T = TypeVar("_T")

__all__ = ["FrozenInstanceError", "field", "record", "replace", "asdict", "fields"]

_MISSING: Any = object()
_FIELDS = "__record_fields__"  # tuple[_Field, ...] in constructor order


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a frozen record."""


class _Field:
    __slots__ = ("name", "default", "default_factory", "repr")

    def __init__(self, default: Any = _MISSING, default_factory: Any = _MISSING, repr: bool = True) -> None:
        self.name = ""
        self.default = default
        self.default_factory = default_factory
        self.repr = repr

    @property
    def has_default(self) -> bool:
        return self.default is not _MISSING or self.default_factory is not _MISSING


def field(*, default: Any = _MISSING, default_factory: Callable[[], Any] = _MISSING, repr: bool = True) -> Any:
    if default is not _MISSING and default_factory is not _MISSING:
        raise ValueError("cannot specify both default and default_factory")
    return _Field(default, default_factory, repr)


def fields(obj_or_cls: Any) -> tuple[_Field, ...]:
    return getattr(obj_or_cls, _FIELDS)


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    table = getattr(type(self), _FIELDS)
    if len(args) > len(table):
        raise TypeError(f"{type(self).__name__}() takes {len(table)} positional arguments but {len(args)} were given")
    put = object.__setattr__
    for i, f in enumerate(table):
        if i < len(args):
            if f.name in kwargs:
                raise TypeError(f"{type(self).__name__}() got multiple values for argument '{f.name}'")
            value = args[i]
        elif f.name in kwargs:
            value = kwargs.pop(f.name)
        elif f.default_factory is not _MISSING:
            value = f.default_factory()
        elif f.default is not _MISSING:
            value = f.default
        else:
            raise TypeError(f"{type(self).__name__}() missing required argument: '{f.name}'")
        put(self, f.name, value)
    if kwargs:
        raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument '{next(iter(kwargs))}'")


def _values(self: Any) -> tuple[Any, ...]:
    return tuple(getattr(self, f.name) for f in getattr(type(self), _FIELDS))


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash(_values(self))


def _repr(self: Any) -> str:
    parts = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in getattr(type(self), _FIELDS) if f.repr)
    return f"{type(self).__qualname__}({parts})"


def _frozen_setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field '{name}'")


def _frozen_delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field '{name}'")


def _is_classvar(annotation: Any) -> bool:
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar"))


def _build(cls: type, frozen: bool) -> type:
    table: dict[str, _Field] = {}
    for base in reversed(cls.__mro__[1:]):
        for f in base.__dict__.get(_FIELDS, ()):
            table[f.name] = f
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        if _is_classvar(annotation):
            continue
        value = cls.__dict__.get(name, _MISSING)
        spec = value if isinstance(value, _Field) else _Field(default=value)
        if isinstance(spec.default, (list, dict, set)):
            raise ValueError(f"mutable default {type(spec.default).__name__} for field {name} is not allowed: use default_factory")
        spec.name = name
        if isinstance(value, _Field):
            if spec.default is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, spec.default)
        table[name] = spec
    seen_default = False
    for f in table.values():
        if f.has_default:
            seen_default = True
        elif seen_default:
            raise TypeError(f"non-default argument '{f.name}' follows default argument")
    setattr(cls, _FIELDS, tuple(table.values()))
    cls.__init__ = _init  # type: ignore[misc]  # a shared __init__ driven by the field table
    cls.__repr__ = _repr  # type: ignore[method-assign,assignment]  # the record's generic methods take the instance explicitly
    cls.__eq__ = _eq  # type: ignore[method-assign,assignment]  # the record's generic methods take the instance explicitly
    if frozen:
        cls.__hash__ = _hash  # type: ignore[method-assign,assignment]  # the record's generic methods take the instance explicitly
        cls.__setattr__ = _frozen_setattr  # type: ignore[method-assign,assignment]  # the record's generic methods take the instance explicitly
        cls.__delattr__ = _frozen_delattr  # type: ignore[method-assign,assignment]  # the record's generic methods take the instance explicitly
    else:
        cls.__hash__ = None  # type: ignore[assignment]  # mutable and comparable: unhashable
    return cls


@overload
def record(cls: type[_T], /) -> type[_T]: ...
@overload
def record(cls: None = None, /, *, frozen: bool = True) -> Callable[[type[_T]], type[_T]]: ...


# Type checkers read a record as a dataclass (frozen by default, `field` its field specifier).
@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: type | None = None, /, *, frozen: bool = True) -> Any:
    """Class decorator: `@record` (frozen) or `@record(frozen=False)`."""
    if cls is None:
        return lambda c: _build(c, frozen)
    return _build(cls, frozen)


def replace(obj: Any, /, **changes: Any) -> Any:
    """A copy of `obj` with `changes` applied (through the constructor, so unknown names fail)."""
    for f in getattr(type(obj), _FIELDS):
        if f.name not in changes:
            changes[f.name] = getattr(obj, f.name)
    return type(obj)(**changes)


def asdict(obj: Any) -> dict[str, Any]:
    """Fields to a dict, recursing into records, lists, tuples and dicts (like dataclasses.asdict)."""

    def conv(v: Any) -> Any:
        if hasattr(type(v), _FIELDS):
            return {f.name: conv(getattr(v, f.name)) for f in getattr(type(v), _FIELDS)}
        if isinstance(v, (list, tuple)):
            return type(v)(conv(x) for x in v)
        if isinstance(v, dict):
            return {conv(k): conv(x) for k, x in v.items()}
        return v

    return conv(obj)
