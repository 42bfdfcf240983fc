"""The one exception type for problems the user can fix by changing an input."""


class UserInputError(ValueError):
    """Bad configuration, data or file. Each line of the message is one problem and names its fix.

    The entry point prints these without a traceback and exits with status 2.
    """

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))
