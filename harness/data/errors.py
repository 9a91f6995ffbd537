"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """Bad data or data settings; the message names the file, line or row, and field or key."""
