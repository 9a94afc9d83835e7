"""The one exception type freevlm raises for bad user input.

Every message is a single line that names the problem (the file, the value, the expected range), so that the CLI can
print it as `error: <message>` and exit with status 2 instead of a traceback.
"""

from __future__ import annotations


class FreeVLMError(RuntimeError):
    """Bad input: a wrong path, a corrupt file, a mismatched checkpoint, an out-of-range setting."""
