"""Errors of the controller's registry: what an operator must fix in the mesh configuration."""

from __future__ import annotations

from collections.abc import Sequence

PathPart = str | int


def format_path(path: Sequence[PathPart]) -> str:
    """`("spec", "rules", 0, "from")` → `spec.rules[0].from`; keys that are not plain names in brackets."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.replace("_", "a").isalnum() and not part[:1].isdigit():
            out += f".{part}" if out else part
        else:
            out += f"[{part}]"
    return out


def describe(message: str, *, file: str = "", line: int | None = None, obj: str = "", field: str = "") -> str:
    """The one-line form of a problem shown to operators: `file:line: object: field: message`, the
    parts that are known (errors and warnings alike)."""
    where = file
    if where and line is not None:
        where = f"{where}:{line}"
    return ": ".join([*(p for p in (where, obj, field) if p), message])


class RegistryError(Exception):
    """Base of the registry's errors."""


class ConfigError(RegistryError):
    """One problem in the configuration: where (file, line, object), which field, and what is wrong.

    `str()` is the one-line form shown to operators, e.g.
    `shop.yaml:12: AuthorizationPolicy shop/allow-web: spec.action: Input should be 'ALLOW', ...`.
    Errors compare equal when they say the same thing at the same place (used to log new errors once).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str = "",
        line: int | None = None,
        obj: str = "",
        path: Sequence[PathPart] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.obj = obj  # "<Kind> <namespace>/<name>" (or "<Kind> <name>" when cluster-scoped), if known
        self.path: tuple[PathPart, ...] = tuple(path)

    @property
    def field(self) -> str:
        """The field path in the object (`spec.rules[0].from[0].source.principals`), or ""."""
        return format_path(self.path)

    def located(self, file: str, line: int | None = None) -> ConfigError:
        """The same error placed in `file` (at `line` when given, else the line it already had)."""
        return ConfigError(
            self.message,
            file=file,
            line=line if line is not None else self.line,
            obj=self.obj,
            path=self.path,
        )

    def _key(self) -> tuple[str, int | None, str, tuple[PathPart, ...], str]:
        return (self.file, self.line, self.obj, self.path, self.message)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConfigError) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return describe(self.message, file=self.file, line=self.line, obj=self.obj, field=self.field)

    def __repr__(self) -> str:
        return f"ConfigError({str(self)!r})"
