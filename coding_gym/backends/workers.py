"""How the workers of a :class:`~coding_gym.backends.local.LocalBackend` start: forked by the
zygote or spawned, in the episode's cgroups, with the isolation layers asked for (a warning,
once per process, for each one the machine does not allow)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

from coding_gym.backends.episode import Episode
from coding_gym.errors import WorkerStartError
from coding_gym.models import Isolation, Limits
from coding_gym.sandbox import cgroups, isolation, zygote
from coding_gym.sandbox.cgroups import Cgroup
from coding_gym.sandbox.frozen import FrozenCopy
from coding_gym.sandbox.supervisor import WorkerProcess

logger = logging.getLogger(__name__)

StartMethod = Literal["zygote", "spawn"]

#: Isolation layers already reported as unavailable by this process (warned about once).
_warned_layers: set[str] = set()
#: Room the worker needs beyond the zygote's address space before its code can do anything.
_ZYGOTE_HEADROOM_BYTES = 64 << 20
#: Frozen copies a backend may hold at once (their parking cgroup's pids limit).
_MAX_PARKED = 4096
_MB = 1 << 20


class WorkerStarter:
    """Starts the workers of one backend's episodes, all with the same limits and layers."""

    def __init__(self, limits: Limits, layers: Isolation, start_method: StartMethod,
                 preload: tuple[str, ...] | None) -> None:
        self.limits = limits
        self.layers = layers
        self.start_method: StartMethod = start_method
        self.preload: Sequence[str] | None = preload
        #: Isolation layer -> {"active", "detail"}, as the latest worker applied it.
        self.report: dict[str, Any] = {}

    def start(self, episode: Episode, meanwhile: Callable[[], None] | None = None
              ) -> WorkerProcess:
        """A new worker in the episode's directory and cgroup; ``meanwhile`` runs while it
        starts up."""
        home = episode.home
        assert home is not None
        forker = self.zygote()
        config = isolation.worker_config(self.layers.layers(), vars(self.limits), home.path,
                                         uid=home.uid, strict=self.layers.strict,
                                         forked_by=forker.pid if forker is not None else None)
        worker = WorkerProcess.start(config, isolation.worker_environment(home.path),
                                     cgroup=self.cgroup(episode), zygote=forker,
                                     meanwhile=meanwhile)
        self.note(worker)
        return worker

    def wake(self, episode: Episode, copy: FrozenCopy,
             before_joining: Callable[[], None] | None = None) -> WorkerProcess:
        """The episode's worker woken from a frozen copy of an interpreter."""
        worker = WorkerProcess.wake(copy, cgroup=self.cgroup(episode), zygote=self.zygote(),
                                    parking=self.parking(episode) if copy.reusable else None,
                                    before_joining=before_joining)
        self.note(worker)
        return worker

    def zygote(self) -> zygote.Zygote | None:
        """The zygote that forks the workers, or None to spawn them."""
        if self.start_method != "zygote":
            return None
        found = zygote.get(self.preload)
        if found is not None and self.layers.rlimits \
                and found.vm_bytes + _ZYGOTE_HEADROOM_BYTES > self.limits.memory_mb * _MB:
            # The worker inherits the zygote's address space, and RLIMIT_AS counts it.
            logger.info("memory_mb=%d leaves no room in a worker forked from the zygote "
                        "(%d MB); spawning instead", self.limits.memory_mb,
                        found.vm_bytes // _MB)
            return None
        return found

    def cgroup(self, episode: Episode) -> Cgroup | None:
        """The cgroup of the episode's live worker, made on first use and kept for reuse."""
        if episode.cgroup is None and self.layers.cgroup:
            episode.cgroup = Cgroup.create(self.limits.memory_mb * _MB, self.limits.max_processes)
            if episode.cgroup is None and self.layers.strict:
                raise WorkerStartError("isolation is strict, and the cgroup layer could not be "
                                       f"applied: {cgroups.probe().reason}")
        return episode.cgroup

    def parking(self, episode: Episode) -> Cgroup | None:
        """Where frozen copies wait, out of the way of the live worker's cgroup kills."""
        if episode.parking is None and self.cgroup(episode) is not None:
            episode.parking = Cgroup.create(self.limits.memory_mb * _MB, _MAX_PARKED)
        return episode.parking

    def note(self, worker: WorkerProcess) -> None:
        """Take ``worker``'s isolation as the latest :attr:`report`, and warn of layers asked
        for that it could not apply."""
        worker.isolation = {**worker.isolation,
                            "cgroup": cgroups.layer_report(self.layers.cgroup, worker.cgroup)}
        self.report = worker.isolation
        for name, layer in worker.isolation.items():
            requested = getattr(self.layers, name, False)
            if requested and not layer.get("active") and name not in _warned_layers:
                _warned_layers.add(name)
                logger.warning("isolation layer %r is unavailable: %s", name,
                               layer.get("detail"))
