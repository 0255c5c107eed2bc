"""Replace a Ray actor that died (OOM killer, `faults.kind=kill`) instead of reusing the corpse.

Flower 1.42's Ray backend (`RayBackend.process_message`) puts the actor of a failed
job back into its pool whatever the failure. When the actor's process is dead, every
later message handed to it fails too ("The actor died unexpectedly"), so one killed
worker fails a share of every later round. `replace_dead_actors()` patches the pool
(in the driver process, where the simulation engine runs): when fetching a result
raises `RayActorError`, a fresh actor takes the dead one's place in the pool. The
message that was running on it still fails, and the grouped strategy records each of
its clients as failed with that reason; later rounds run normally.

Idempotent; a no-op where Flower's Ray backend is not importable. A stopping engine
that kills its actors on purpose sets `pool.<STOPPING> = True` first, so none is replaced.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
_PATCHED = "_fedkd_replaces_dead_actors"
#: set this attribute on a BasicActorPool to stop replacing its dead actors (engine shutdown)
STOPPING = "fedkd_stopping"


def replace_dead_actors() -> bool:
    """Install the patch (see the module docstring); True once it is in place."""
    try:
        import ray
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool
    except ImportError:  # no Ray: nothing to patch
        return False
    if getattr(BasicActorPool, _PATCHED, False):
        return True
    fetch = BasicActorPool.fetch_result_and_return_actor_to_pool

    def fetch_or_replace(self: Any, future: Any) -> Any:
        try:
            return fetch(self, future)
        except ray.exceptions.RayActorError:
            dead = self._future_to_actor.get(future)
            if dead is not None and not getattr(self, STOPPING, False):
                # Flower's error path then returns this mapping's actor to the pool: the new one
                self._future_to_actor[future] = self.create_actor_fn()
                try:
                    ray.kill(dead)
                except Exception:  # already gone
                    pass
                log.warning("fedkd: a Ray actor died; a new one replaces it in the pool")
            raise

    BasicActorPool.fetch_result_and_return_actor_to_pool = fetch_or_replace  # type: ignore[method-assign]
    setattr(BasicActorPool, _PATCHED, True)
    return True
