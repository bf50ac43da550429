"""Error types whose messages a person can act on.

Every message is one line: what was found, what was expected, what to do.
Pages catch `RetrainError` and show `str(err)`; the CLI prints it and exits 2.
"""


class RetrainError(ValueError):
    """Base class of every input error Retrain Studio reports to a person."""


class DatasetError(RetrainError):
    """The uploaded images cannot be used as a dataset (bad zip, no classes, ...)."""


class ModelError(RetrainError):
    """A model cannot be loaded, described or operated on (bad file, unsafe layer, bad cut)."""


class ConfigError(RetrainError):
    """A training, evaluation or export setting is invalid."""


class RunError(RetrainError):
    """A run directory is missing, unfinished or unusable for the requested action."""
