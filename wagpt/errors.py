"""
The errors of bad input, shared by every module (a leaf: it imports nothing of the project).

A UserError's message names the culprit (a key, a file, a value) and the fix; every command
prints it as one line `error: <message>` on stderr and exits with status 2
(configurator.main); ConfigErrors carries several, found together, one line each. Any other
exception is a bug and keeps its traceback.
"""

from contextlib import contextmanager


class UserError(Exception):
    """Bad input: the message names the culprit (key, file, value) and the fix."""
    every_node = False   # under torchrun: printed by each node's local rank 0, not by rank 0
                         # alone (for faults where rank 0 may be the process that is gone)


class ConfigError(UserError, ValueError):
    """A bad config key or value."""


class CheckpointError(UserError, ValueError):
    """A missing, corrupt, unsafe or mismatched checkpoint; the message names the file."""


class WriteError(UserError, OSError):
    """A file could not be written (a full disk, no permission, a read-only file system); the
    message names it and the cause. The files written before it are intact."""


class ConfigErrors(ConfigError):
    """Several problems of one input, found together: each is its own line `error: ...`."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Problems:
    """Collects every problem of an input before any is reported:

        problems = Problems()
        if bad: problems.add("key=... must be ...; do ... instead")
        with problems.check():      # a UserError or ValueError raised inside is collected
            validate_something()
        problems.raise_if_any()     # one ConfigError, or ConfigErrors for several
    """

    def __init__(self):
        self.found = []

    def add(self, message):
        if message not in self.found:   # two checks may trip over one value
            self.found.append(message)

    @contextmanager
    def check(self):
        try:
            yield self
        except (UserError, ValueError) as error:
            for message in getattr(error, "problems", None) or [str(error)]:
                self.add(message)

    def raise_if_any(self):
        if len(self.found) == 1:
            raise ConfigError(self.found[0])
        if self.found:
            raise ConfigErrors(self.found)
