"""The device-side methods by name: ``@register("name")`` on a class, ``method_for`` to
find the one a train instruction names (``keys.METHOD``)."""

from __future__ import annotations

from flwr.app import ConfigRecord

from stamen import keys

METHODS: dict[str, type] = {}


def register(name: str):
    """Class decorator: serve instructions whose ``method`` is ``name``."""

    def add(cls: type) -> type:
        if name in METHODS:
            raise ValueError(f"device-side method {name!r} is registered twice ({METHODS[name].__name__}, {cls.__name__})")
        METHODS[name] = cls
        cls.name = name
        return cls

    return add


def method_for(instr: ConfigRecord):
    """The method a train instruction names; a clear error for a name this node lacks."""
    name = instr.get(keys.METHOD)
    if name is None:
        raise ValueError(f"the train instruction names no device-side method ({keys.METHOD!r}); is the server an older Stamen?")
    if str(name) not in METHODS:
        raise ValueError(f"the server asks for device-side method {name!r}; this node has {', '.join(sorted(METHODS))}")
    return METHODS[str(name)]()
