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
