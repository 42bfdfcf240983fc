"""The one exception type for problems the user can fix by changing an input."""


class UserInputError(ValueError):
    """Bad configuration, data or file. Each line of the message is one problem and names its fix.

    The entry point prints these without a traceback and exits with status 2.
    """

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the message names the step and the loss components."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; `exit_code` is 128 + the signal."""

    def __init__(self, signum: int, message: str):
        self.exit_code = 128 + signum
        super().__init__(message)
