"""The exceptions the policy engine raises; every one is a `PolicyError`, so the edge catches one type."""

from __future__ import annotations


class PolicyError(ValueError):
    """A policy that cannot be used. `str(exc)` is the message to show the operator."""


class HuJSONError(PolicyError):
    """The text is not valid HuJSON; `line` and `column` are 1-based (None when unknown)."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        self.message = message
        self.line = line
        self.column = column
        where = f"line {line}, column {column}: " if line is not None else ""
        super().__init__(f"policy is not valid HuJSON: {where}{message}")


class PolicyValidationError(PolicyError):
    """The text parses but says something impossible; `where` names the section and entry."""

    def __init__(self, where: str, message: str, line: int | None = None,
                 column: int | None = None) -> None:
        self.where = where
        self.message = message
        self.line = line
        self.column = column
        at = f" (line {line}, column {column})" if line is not None else ""
        super().__init__(f"{where}{at}: {message}")


class PolicyTestError(PolicyError):
    """The policy parses but its `tests` section fails; `failures` holds every failing check."""

    def __init__(self, failures: "tuple[object, ...]") -> None:
        self.failures = failures
        lines = "\n".join(f"  - {f}" for f in failures)
        super().__init__(f"policy tests failed ({len(failures)}):\n{lines}")
