"""The data error type, apart from the readers and checks that raise it (they import each other's
users, not each other)."""


class DataError(ValueError):
    """A dataset file that cannot be used, with what was wrong and how to fix it."""
