"""The base of the errors `roi` reports as one line and exit status 2.

Each module raises its own kind (ConfigError, DataError, ModelError, PromptError, TrackingError), already
phrased for the user: it names the file, key, row or URI. The CLI catches the base, so it need not import
torch, transformers or MLflow just to know these errors: `roi report` and `roi data check` start in a
fraction of the time.
"""


class UserError(Exception):
    """A problem with what the user gave or set up, phrased as the one line they see."""
