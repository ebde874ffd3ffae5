"""SecretStr: a string that no repr, str or format of it (or of what holds it) shows."""

from __future__ import annotations

from typing import final

MASK = "**********"


@final
class SecretStr:
    """Equal and hashed by value; the value itself comes out only by `get_secret_value()`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"SecretStr('{MASK}')" if self._value else "SecretStr('')"

    def __str__(self) -> str:
        return MASK if self._value else ""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretStr) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)
