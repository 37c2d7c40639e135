"""Host memory on transparent huge pages, for the `python -m jaxlm.<verb>` processes.

XLA:CPU allocates a step's large temporaries afresh at every step (a [32, 20, 32000] float32
array of MLM logits is 80 MB). glibc's malloc serves any block above 32 MiB with its own `mmap`
and unmaps it on free, so the kernel zero-fills the block again on every step, one 4 KiB page
fault at a time: 20,000 faults for that array. On the 2-core CPU machine, `x * 2` on it took
37 ms (59 ms of system time) that way, against 11-15 ms with malloc asking for huge pages
(`glibc.malloc.hugetlb=1`: `madvise(MADV_HUGEPAGE)` on its mappings, 583 faults). The bench's
BERT-mini step gained 9-30% and half its system time (see README, Throughput).

glibc reads `GLIBC_TUNABLES` only when a process starts, so `reexec_with_huge_pages` starts the
entry point again with it set, once, before any heavy import. It does nothing when the variable
already names the tunable, off Linux/glibc, where the kernel offers no transparent huge pages,
or with `JAXLM_HUGE_PAGES=0`.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JAXLM_HUGE_PAGES"  # "0": leave malloc as it is.
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def enabled_in_this_process() -> bool:
  """Whether this process started with malloc asking for huge pages."""
  return "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "").split(":")


def _kernel_offers_huge_pages() -> bool:
  try:
    with open(_THP_SETTING) as f:
      setting = f.read()
  except OSError:
    return False
  return "[always]" in setting or "[madvise]" in setting


def reexec_with_huge_pages() -> None:
  """Replaces this process by the same command with `GLIBC_TUNABLES` asking for huge pages,
  when that helps and is possible; otherwise returns and the process goes on as it is."""
  if (enabled_in_this_process() or os.environ.get(OPT_OUT) == "0" or sys.platform != "linux"
      or platform.libc_ver()[0] != "glibc" or not _kernel_offers_huge_pages()
      or not getattr(sys, "orig_argv", None)):
    return
  env = dict(os.environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), TUNABLE) if t)
  env[OPT_OUT] = "0"  # A glibc that drops the tunable must not make this loop.
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
