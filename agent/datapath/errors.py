"""Errors raised by the datapath: each says what failed, on which object, and why."""


class DatapathError(Exception):
    """A datapath operation failed; ``what`` names the object, ``why`` the cause."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")
        self.what = what
        self.why = why
