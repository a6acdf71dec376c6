"""One exception root for fedlora, with a subclass per area.

Libraries raise these with a message that names the field and the bad value; only the
CLIs catch them broadly, print the one-line reason and exit non-zero.
"""


class FedloraError(Exception):
    """Root of every error fedlora raises on purpose."""


class ConfigError(FedloraError):
    """A run, site or CLI setting is unknown, mistyped or out of range."""


class DataError(FedloraError):
    """A data file is missing, empty or has a row that does not fit the task."""


class ModelError(FedloraError):
    """The base model or an adapter cannot be found, loaded or applied."""


class BudgetRefused(FedloraError):
    """A site refuses a round that would pass its privacy budget (clients/site/ledger.py).

    The site answers the round with a refusal (strategies/protocol.py), which the server
    tells apart from a failure.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
