"""The entry points' restart with malloc on huge pages."""

import os
import platform
import subprocess
import sys

from jaxlm import huge_pages

_PROBE = ("import os; from jaxlm import huge_pages; huge_pages.reexec_with_huge_pages(); "
          "print(os.environ.get('GLIBC_TUNABLES', ''), huge_pages.enabled_in_this_process())")


def _probe(**env):
  environ = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", huge_pages.OPT_OUT)}
  environ.update(env)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=environ, check=True,
                       capture_output=True, text=True).stdout
  return out.splitlines()


def test_restart_sets_the_tunable_once_where_the_machine_offers_huge_pages():
  lines = _probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000000")
  assert len(lines) == 1  # The replaced process printed nothing; the restarted one once.
  possible = (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
              and huge_pages._kernel_offers_huge_pages())
  if possible:
    # The user's own tunables are kept, ours appended.
    assert lines[0] == "glibc.malloc.trim_threshold=1000000000:glibc.malloc.hugetlb=1 True"
  else:
    assert lines[0] == "glibc.malloc.trim_threshold=1000000000 False"


def test_opt_out_leaves_malloc_alone():
  assert _probe(**{huge_pages.OPT_OUT: "0"}) == [" False"]
