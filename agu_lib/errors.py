"""Error types. An ``AguError`` is an expected user error: the CLI prints its message (which
says what was wrong and what to do) without a traceback; anything else is a bug."""


class AguError(Exception):
    """Base class of every error the library raises on purpose."""


class DataError(AguError):
    """A data set, image folder or IDX file is missing, malformed or of the wrong shape."""


class CheckpointError(AguError):
    """A GAN/classifier directory or a foreign checkpoint is missing, malformed or tampered with."""


class ConfigError(AguError, ValueError):
    """A configuration value is out of range or unknown."""


class FeedbackError(AguError):
    """The feedback (oracle) cannot give what was asked, e.g. too few negatives."""


class TrainingError(AguError):
    """Training diverged (NaN/Inf) or cannot proceed."""


def error_line(e: Exception) -> str:
    """One line for an error raised by someone else's code (a user's module or builder): agu's own
    message and torch's ``RuntimeError`` as they are, any other with its type (``ValueError: ...``)."""
    text = str(e).splitlines()[0] if str(e) else ""
    return text if isinstance(e, (AguError, RuntimeError)) else f"{type(e).__name__}: {text}"
