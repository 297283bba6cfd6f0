"""Fails a multi-process run quickly and clearly when another process dies.

Without it, the survivors of a dead process wait in their next collective
until JAX's coordination service misses the dead one's heartbeats
(``heartbeat_timeout_seconds``, 100 s by default) and then abort with a
C++ fatal log and stack trace. `PeerWatchdog` is a daemon thread on every
process: each second it bumps a counter in the coordination service's
key-value store and reads the other processes' counters. A counter that has
not moved for ``timeout_s`` seconds (measured on this process's own clock),
or a coordinator that stopped answering for that long, ends this process
with one line on stderr and exit status `PEER_FAILURE_EXIT_STATUS`. The
checkpoints on disk are the last finished ones; rerunning every process
with the same command resumes from them.

When process 0 (the coordinator) itself dies, JAX's own error polling
usually aborts the others first, within a second or two, with its message
"Terminating process because the JAX distributed service detected fatal
errors".
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax

PEER_FAILURE_EXIT_STATUS = 3
_KEY = "jdistill/alive/{}"


class PeerWatchdog:
  """See the module docstring. ``start()`` after `jax.distributed`
  initialisation; ``stop()`` when the program's work is done."""

  def __init__(self, timeout_s: float = 60.0, interval_s: float = 1.0,
               exit_fn=os._exit):
    self.timeout_s = float(timeout_s)
    self.interval_s = float(interval_s)
    self._exit = exit_fn
    self._stop = threading.Event()
    self._thread = None

  def start(self) -> "PeerWatchdog":
    if jax.process_count() > 1 and self._thread is None:
      self._thread = threading.Thread(target=self._run, daemon=True,
                                      name="jdistill-peer-watchdog")
      self._thread.start()
    return self

  def wait_for_verdict(self) -> None:
    """Called when a collective failed: gives the watchdog the time it
    needs to tell a dead peer (it then ends the process with its one line)
    from a genuine error, which the caller re-raises afterwards."""
    if self._thread is not None and self._thread.is_alive():
      self._thread.join(timeout=self.timeout_s + 3 * self.interval_s)

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5 * self.interval_s)
      self._thread = None

  def _fail(self, message: str) -> None:
    if self._stop.is_set():
      return  # The run finished meanwhile: peers leave at different times.
    print(f"jdistill: error: process {jax.process_index()} of "
          f"{jax.process_count()}: {message}; stopping this process too "
          f"(exit status {PEER_FAILURE_EXIT_STATUS}). Rerun every process "
          "with the same command to resume from the last checkpoint.",
          file=sys.stderr, flush=True)
    self._exit(PEER_FAILURE_EXIT_STATUS)

  def _run(self) -> None:
    from jax._src import distributed
    client = distributed.global_state.client
    me, n = jax.process_index(), jax.process_count()
    peers = [j for j in range(n) if j != me]
    start = time.monotonic()
    seen = {j: (None, start) for j in peers}
    last_contact = start
    beat = 0
    while not self._stop.wait(self.interval_s):
      now = time.monotonic()
      beat += 1
      try:
        client.key_value_set(_KEY.format(me), str(beat), allow_overwrite=True)
        values = {j: _try_get(client, _KEY.format(j)) for j in peers}
      except Exception as e:  # noqa: BLE001 - the coordinator is unreachable.
        if now - last_contact > self.timeout_s:
          first = (str(e).strip().splitlines() or [type(e).__name__])[0]
          self._fail("the coordinator (process 0) has not answered for "
                     f"{now - last_contact:.0f} s ({first[:120]})")
          return
        continue
      last_contact = now
      for j, value in values.items():
        previous, since = seen[j]
        if value != previous:
          seen[j] = (value, now)
        elif now - since > self.timeout_s:
          self._fail(f"process {j} has sent no sign of life for "
                     f"{now - since:.0f} s (it died, was killed or hangs)")
          return


def _try_get(client, key: str) -> str | None:
  try:
    return client.key_value_try_get(key)
  except Exception as e:  # noqa: BLE001
    if "NOT_FOUND" in str(e):
      return None  # That process has not started its watchdog yet.
    raise
