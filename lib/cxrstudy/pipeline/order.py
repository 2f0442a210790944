"""Which notebooks may start now: a dependency graph of notebook names and nothing else.

No processes, files or clocks here, so the order rules can be checked by hand: a notebook
starts once every upstream notebook of this run has finished; a failed (or blocked) upstream
blocks its dependents, and through them theirs, unless the notebook runs after a failed
upstream (08, which reports what is missing); notebooks of other branches carry on.
"""
from __future__ import annotations

from typing import Iterable


class DependencyCycleError(ValueError):
    """Notebooks that wait for each other, named in the order of the cycle."""


def dependency_order(names: Iterable[str], depends_on: dict[str, Iterable[str]]) -> list[str]:
    """``names`` with every notebook after its upstream ones, otherwise in the given order.

    Upstream notebooks not among ``names`` are ignored: they are not run now, their last result
    is used. Raises :class:`DependencyCycleError` naming the cycle.
    """
    names = list(dict.fromkeys(names))
    chosen = set(names)
    upstream = {n: [d for d in depends_on.get(n, ()) if d in chosen] for n in names}
    ordered: list[str] = []
    placed: set[str] = set()
    visiting: list[str] = []

    def place(name: str) -> None:
        if name in placed:
            return
        if name in visiting:
            cycle = visiting[visiting.index(name):] + [name]
            raise DependencyCycleError("notebooks depend on each other: " + " → ".join(cycle))
        visiting.append(name)
        for dependency in upstream[name]:
            place(dependency)
        visiting.pop()
        placed.add(name)
        ordered.append(name)

    for name in names:
        place(name)
    return ordered


class RunProgress:
    """Which notebooks of one run are pending, running and finished (ok or not); the
    training recipe is another thing, :class:`cxrstudy.train.Schedule`.

    The caller asks :meth:`ready`, :meth:`start`\\ s some, and reports each one's end with
    :meth:`finish`. A ready notebook whose upstream failed is still handed out, so the caller
    can record it: :meth:`blocked_by` says which upstream failed (empty when it may run).
    """

    def __init__(self, order: list[str], depends_on: dict[str, Iterable[str]],
                 runs_after_failed_upstream: Iterable[str] = ()):
        self.order = dependency_order(order, depends_on)
        chosen = set(self.order)
        self.upstream = {n: [d for d in depends_on.get(n, ()) if d in chosen] for n in self.order}
        self.runs_after_failure = set(runs_after_failed_upstream)
        self.pending = list(self.order)
        self.running: set[str] = set()
        self.succeeded: set[str] = set()
        self.failed: set[str] = set()

    def ready(self) -> list[str]:
        """Pending notebooks whose upstream (in this run) have all finished, in study order."""
        done = self.succeeded | self.failed
        return [n for n in self.pending if all(d in done for d in self.upstream[n])]

    def blocked_by(self, name: str) -> list[str]:
        """The failed upstream that keep ``name`` from running (empty: it may run)."""
        if name in self.runs_after_failure:
            return []
        return [d for d in self.upstream[name] if d in self.failed]

    def start(self, name: str) -> None:
        if name not in self.ready():
            raise ValueError(f"{name} is not ready to start (pending: {', '.join(self.pending)})")
        self.pending.remove(name)
        self.running.add(name)

    def finish(self, name: str, ok: bool) -> None:
        """``ok``: it succeeded or was up to date; otherwise it failed or was blocked."""
        if name not in self.running:
            raise ValueError(f"{name} was not started")
        self.running.discard(name)
        (self.succeeded if ok else self.failed).add(name)

    @property
    def done(self) -> bool:
        return not self.pending and not self.running
