"""The one exception type for mistakes a user can fix.

Entry points catch `UserError` and print its message as one paragraph with no traceback, then
exit non-zero. Everything else is a bug in jaxlm and keeps its traceback.
"""

import difflib
from collections.abc import Iterable


class UserError(Exception):
  """A bad config, a missing file, a vocabulary mismatch: something the user can fix."""


def closest(name: str, candidates: Iterable[str]) -> str:
  """Returns ' Did you mean X?' for the candidate closest to `name`, or ''."""
  match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
  return f" Did you mean '{match[0]}'?" if match else ""
