"""
The errors of bad input, shared by every module (a leaf: it imports nothing of the project).

A UserError's message names the culprit (a key, a file, a value) and the fix; every command
prints it as one line `error: <message>` on stderr and exits with status 2
(configurator.main). Any other exception is a bug and keeps its traceback.
"""


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
