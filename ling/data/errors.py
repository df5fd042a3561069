"""The one error type for unusable data; its message is a single sentence naming the bad value."""


class DataError(ValueError):
    """Data that cannot be used for training: missing, empty, malformed or too short."""
