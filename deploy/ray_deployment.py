"""The deployment on Ray: the one module that creates placement groups and worker actors.

A ``Deployment`` (itself a Ray actor, named so that `kvferry scale` finds it) keeps a pool of prefill
workers and a pool of decode workers at their targets:
- each worker is the plain `kvferry prefill|decode` command line in a ``WorkerProcess`` actor, inside a
  placement group of one bundle ``{kvferry_<role>: 1, CPU: n[, GPU: g]}``: Ray puts it on a node that
  carries its role's resource, together with its GPU;
- a target is a number, or auto (None): one worker per unit of the role's resource in the cluster, so a
  node that joins with ``kvferry_decode`` gets a decode worker without a restart;
- every ``RECONCILE_S`` it reaps workers that are gone, deregistering them from the router at once:
  an actor's death (its pending ``wait_exit`` raises ``RayActorError``: the node died, or the process was
  killed) or its worker's exit; then it adds or drains workers to meet the targets;
- scale-down drains: Deregister(draining) on the router, so nothing new is placed there, then SIGTERM:
  the worker lets its streams finish and exits; then its actor and placement group go. ``drain_node``
  does the same to every worker on one node and places no new ones there, so the node can leave.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import grpc
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kvferry.deploy.ray_args import ROLE_RESOURCES
from kvferry.deploy.router_control import RouterControl
from kvferry.deploy.worker_process import WorkerProcess
from kvferry.proto.cluster_security import TOKEN_ENV

logger = logging.getLogger(__name__)

RECONCILE_S = 0.5
START_BACKOFF_S = (2.0, 30.0)  # after a worker fails to start: first and longest wait before the next


@dataclass(frozen=True)
class PoolSpec:
    role: str  # "prefill" | "decode"
    argv: tuple[str, ...]  # the sub-command and its flags, without --name / --advertise-host
    target: int | None  # None: auto, one per unit of the role's resource
    cpus: float = 1.0
    gpus: float = 0.0
    env: tuple[tuple[str, str], ...] = ()  # over the deployment's environment, for this role's workers

    @property
    def resource(self) -> str:
        return ROLE_RESOURCES[self.role]

    def worker_env(self, base: dict[str, str]) -> dict[str, str]:
        """The environment one of this pool's workers starts with: the deployment's, then the pool's own."""
        return {**base, **dict(self.env)}

    def bundle(self) -> dict[str, float]:
        """What one worker reserves: its role's resource, its CPUs and (if any) its GPUs, on one node."""
        bundle = {self.resource: 1.0, "CPU": self.cpus}
        if self.gpus:
            bundle["GPU"] = self.gpus
        return bundle


class WorkerActor(WorkerProcess):
    """A ``WorkerProcess`` that advertises its node's address and tells which node it runs on."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        super().__init__([*argv, "--advertise-host", ray.util.get_node_ip_address()], env)

    def start_on_node(self, timeout_s: float) -> tuple[str, str]:
        return self.start(timeout_s), ray.get_runtime_context().get_node_id()


RemoteWorker = ray.remote(max_restarts=0, max_concurrency=4)(WorkerActor)


@dataclass
class Member:
    """One worker of a pool, from its placement group's creation to its removal."""

    role: str
    name: str
    pg: PlacementGroup
    actor: ray.actor.ActorHandle
    pg_ready: ray.ObjectRef
    started: ray.ObjectRef  # -> (address, node id)
    exited: ray.ObjectRef  # -> exit code; RayActorError when the actor died
    address: str | None = None
    node_id: str | None = None
    status: str = "pending"  # pending (no node yet) -> starting -> serving -> draining; or unreachable
    probe: ray.ObjectRef | None = None  # unreachable: a poll() that tells whether it is back

    def describe(self) -> dict:
        return {"role": self.role, "name": self.name, "status": self.status, "address": self.address,
                "node_id": self.node_id}


@dataclass
class Removal:
    role: str
    name: str
    address: str | None
    node_id: str | None
    reason: str
    at: float = field(default_factory=time.time)


class Deployment:
    def __init__(self, router_address: str, pools: list[PoolSpec], env: dict[str, str],
                 drain_timeout_s: float, start_timeout_s: float) -> None:
        self.router = RouterControl(router_address, token=env.get(TOKEN_ENV, ""))
        self.specs = {p.role: p for p in pools}
        self.targets: dict[str, int | None] = {p.role: p.target for p in pools}
        self.env = env
        self.drain_timeout_s = drain_timeout_s
        self.start_timeout_s = start_timeout_s
        self.members: list[Member] = []
        self.removals: list[Removal] = []
        self.excluded_nodes: set[str] = set()  # drained by drain_node: no new workers there
        self.start_failures: dict[str, str] = {}  # role -> the last start error
        self._next_start: dict[str, float] = {}  # role -> no new worker before (after a failed start)
        self._backoff: dict[str, float] = {}
        self._seq = itertools.count(1)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- API (Ray actor methods) -----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="reconcile", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout_s: float) -> dict:
        """Until every pool is at its target and serving with at least one worker; RuntimeError on
        timeout or when a worker failed to start, naming what is missing."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self.start_failures:
                    role, error = next(iter(self.start_failures.items()))
                    raise RuntimeError(f"a {role} worker failed to start: {error}")
                if all(self._settled(role) and self._count(role, "serving") for role in self.specs):
                    return self.state()
            time.sleep(0.25)
        raise RuntimeError(f"timed out after {timeout_s:.0f} s: {self.summary()}")

    def scale(self, role: str, target: int | None, timeout_s: float) -> dict:
        """Set a pool's target (None: auto) and wait until it is met (or ``timeout_s``); returns the state
        with ``settled``."""
        if role not in self.specs:
            raise ValueError(f"no {role} pool; pools: {', '.join(self.specs)}")
        with self._lock:
            self.targets[role] = target
            self.start_failures.pop(role, None)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._settled(role):
            time.sleep(0.25)
        return {**self.state(), "settled": self._settled(role)}

    def drain_node(self, node: str, timeout_s: float) -> dict:
        """Take the workers on ``node`` (a node id, or an IP: every node there) out of their pools and
        place no new ones there: an auto pool stops counting the node's resources, a fixed pool shrinks
        by the workers drained. Waits until they are gone (or ``timeout_s``); returns the state with
        ``settled``. Stop Ray on the node afterwards to take it out of the cluster."""
        ids = {n["NodeID"] for n in ray.nodes() if node in (n["NodeID"], n["NodeManagerAddress"])}
        if not ids:
            raise ValueError(f"no node {node!r} in this Ray cluster")
        with self._lock:
            self.excluded_nodes |= ids
            for m in [m for m in self.members if m.node_id in ids and m.status != "draining"]:
                if self.targets[m.role] is not None:
                    self.targets[m.role] = max(0, self.targets[m.role] - 1)
                self._begin_drain(m)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(m.node_id in ids for m in list(self.members)):
            time.sleep(0.25)
        return {**self.state(), "settled": not any(m.node_id in ids for m in list(self.members))}

    def state(self) -> dict:
        with self._lock:
            return {
                "targets": {r: ("auto" if t is None else t) for r, t in self.targets.items()},
                "wanted": {r: self._target(r) for r in self.specs},
                "workers": [m.describe() for m in self.members],
                "removed": [vars(r) for r in self.removals],
                "start_failures": dict(self.start_failures),
            }

    def summary(self) -> str:
        with self._lock:
            parts = []
            for role, spec in self.specs.items():
                counts = {s: self._count(role, s) for s in ("serving", "starting", "pending", "draining")}
                text = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none"
                parts.append(f"{role}: {text} of {self._target(role)} wanted")
                if counts["pending"]:
                    parts[-1] += f" (waiting for a node with free {spec.resource}" + (", GPU" if spec.gpus else "") + ")"
            return "; ".join(parts)

    def shutdown(self, grace_s: float) -> None:
        """Stop reconciling; SIGTERM every worker (they finish what they can in ``grace_s``), then remove
        their actors and placement groups."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            members, self.members = list(self.members), []
        drains = [m.actor.drain.remote(grace_s) for m in members if m.address is not None]  # (not pending ones)
        if drains:
            ray.wait(drains, num_returns=len(drains), timeout=grace_s + 15)
        for thread in [self._release(m) for m in members]:
            thread.join(timeout=10)
        self.router.close()

    # ---- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(RECONCILE_S):
            try:
                self._reconcile()
            except Exception:  # the loop must outlive one bad turn (a GCS hiccup, a router restart)
                logger.exception("reconcile failed")

    def _reconcile(self) -> None:
        with self._lock:
            self._reap()
            self._note_progress()
            for role in self.specs:
                active = [m for m in self.members if m.role == role and m.status not in ("draining", "unreachable")]
                wanted = self._target(role)
                if len(active) < wanted and time.monotonic() >= self._next_start.get(role, 0.0):
                    for _ in range(wanted - len(active)):
                        self._add(role)
                elif len(active) > wanted:
                    for m in self._surplus(active, len(active) - wanted):
                        self._begin_drain(m)

    def _begin_drain(self, m: Member) -> None:
        m.status = "draining"
        threading.Thread(target=self._drain, args=(m,), name=f"drain-{m.name}", daemon=True).start()

    def _target(self, role: str) -> int:
        """The pool's size now: its number, or (auto) its resource's units on the alive nodes that are
        not drained."""
        target = self.targets[role]
        if target is None:
            resource = self.specs[role].resource
            return int(sum(n["Resources"].get(resource, 0) for n in ray.nodes()
                           if n["Alive"] and n["NodeID"] not in self.excluded_nodes))
        return target

    def _add(self, role: str) -> None:
        spec = self.specs[role]
        name = f"{role}-{next(self._seq)}"
        pg = placement_group([spec.bundle()], strategy="PACK", name=f"kvferry-{name}")
        actor = RemoteWorker.options(
            num_cpus=spec.cpus, num_gpus=spec.gpus, resources={spec.resource: 1.0},
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0),
        ).remote([*spec.argv, "--name", name], spec.worker_env(self.env))
        member = Member(role, name, pg, actor, pg.ready(), actor.start_on_node.remote(self.start_timeout_s),
                        actor.wait_exit.remote())
        self.members.append(member)
        logger.info("%s: placement group for %s created", name, spec.bundle())

    def _note_progress(self) -> None:
        """pending -> starting when its node is found; starting -> serving once the router lists it."""
        try:
            registered = self.router.workers()
        except grpc.RpcError:
            registered = None
        for m in list(self.members):
            if m.status == "pending" and _done(m.pg_ready):
                m.status = "starting"
            if m.status == "starting" and m.address is None and _done(m.started):
                try:
                    m.address, m.node_id = ray.get(m.started)
                except RayError as exc:
                    self._start_failed(m, exc)
                    continue
                logger.info("%s serving gRPC on %s (node %s)", m.name, m.address, m.node_id)
            if m.status == "starting" and m.address is not None and registered is not None and m.address in registered:
                m.status = "serving"
                self._backoff.pop(m.role, None)

    def _start_failed(self, m: Member, exc: Exception) -> None:
        error = str(getattr(exc, "cause", None) or exc).strip()
        logger.error("%s failed to start: %s", m.name, error)
        self.start_failures[m.role] = error
        delay = min(self._backoff.get(m.role, START_BACKOFF_S[0] / 2) * 2, START_BACKOFF_S[1])
        self._backoff[m.role] = delay
        self._next_start[m.role] = time.monotonic() + delay
        self._forget(m, f"failed to start: {error.splitlines()[0] if error else exc!r}")

    def _reap(self) -> None:
        """Workers that are gone: the router forgets them now, not at the end of their lease."""
        for m in list(self.members):
            if m.status == "unreachable":
                self._probe(m)
                continue
            if m.status == "draining" or not _done(m.exited):
                continue
            try:
                reason = f"worker exited with code {ray.get(m.exited)}"
            except ActorUnavailableError:
                # Unreachable, perhaps only for a moment: no new requests go there, and a replacement
                # starts now rather than when Ray declares the node dead. If it answers again, it
                # registers at its next heartbeat and the surplus is drained like any other.
                logger.warning("%s (%s) is unreachable: removed from the router", m.name, m.address)
                self._deregister(m)
                m.status, m.probe = "unreachable", m.actor.poll.remote()
                continue
            except RayActorError:
                reason = "actor died (its node was lost or its process killed)"
            except RayError as exc:
                reason = f"actor failed: {exc!r}"
            self._deregister(m)
            logger.warning("%s (%s) is gone: %s; removed from the router", m.name, m.address, reason)
            self._forget(m, reason)

    def _probe(self, m: Member) -> None:
        """An unreachable worker's fate: back (it re-registers), exited, dead, or still unreachable."""
        if m.probe is None or not _done(m.probe):
            return
        try:
            code = ray.get(m.probe)
        except ActorUnavailableError:
            m.probe = m.actor.poll.remote()
            return
        except RayError as exc:
            self._forget(m, "actor died (its node was lost or its process killed)"
                         if isinstance(exc, RayActorError) else f"actor failed: {exc!r}")
            return
        if code is not None:
            self._forget(m, f"worker exited with code {code}")
            return
        logger.info("%s (%s) answers again", m.name, m.address)
        m.status, m.probe, m.exited = "starting", None, m.actor.wait_exit.remote()

    def _deregister(self, m: Member) -> None:
        if m.address is None:
            return
        try:
            self.router.deregister(m.address, draining=False)
        except grpc.RpcError as exc:
            logger.warning("could not deregister %s from the router: %s", m.address, exc.code().name)

    def _surplus(self, active: list[Member], n: int) -> list[Member]:
        """The workers to take out: not yet serving first, then the least busy, the newest first."""
        try:
            registered = self.router.workers()
        except grpc.RpcError:
            registered = {}
        order = {"pending": 0, "starting": 1, "serving": 2}  # (unreachable and draining ones are not active)

        def cost(m: Member) -> tuple[int, int, int]:
            info = registered.get(m.address or "")
            running = info.capacity.running_requests + info.capacity.waiting_requests if info else 0
            return order[m.status], running, -int(m.name.rsplit("-", 1)[1])

        return sorted(active, key=cost)[:n]

    def _drain(self, m: Member) -> None:
        """Deregister (draining) so the router places nothing new here, then let the worker finish its
        streams and exit (its own SIGTERM path), then remove the actor and its placement group."""
        if m.address is not None:
            try:
                self.router.deregister(m.address, draining=True)
            except grpc.RpcError as exc:
                logger.warning("could not mark %s draining on the router: %s", m.address, exc.code().name)
        try:
            # The worker's own --shutdown-grace is the drain timeout; it then stops its server: a margin.
            code = ray.get(m.actor.drain.remote(self.drain_timeout_s + 15), timeout=self.drain_timeout_s + 45)
            reason = f"drained (exit code {code})"
        except (RayError, GetTimeoutError) as exc:
            reason = f"drain failed: {exc!r}"
        logger.info("%s (%s): %s", m.name, m.address, reason)
        with self._lock:
            self._forget(m, reason)

    def _forget(self, m: Member, reason: str) -> None:
        if m in self.members:
            self.members.remove(m)
        self.removals.append(Removal(m.role, m.name, m.address, m.node_id, reason))
        self._release(m)

    @staticmethod
    def _release(m: Member) -> threading.Thread:
        """Kill the actor, then remove its placement group, on a thread of their own: removing a group
        can block in Ray (while an actor is still being created in it: hence the kill first), and the
        reconcile loop must never wait on it."""

        def release() -> None:
            try:
                ray.kill(m.actor)
            except RayError:
                pass
            try:
                remove_placement_group(m.pg)
            except Exception:  # already gone (its node died with it): nothing to release
                pass

        thread = threading.Thread(target=release, name=f"release-{m.name}", daemon=True)
        thread.start()
        return thread

    def _settled(self, role: str) -> bool:
        with self._lock:
            mine = [m for m in self.members if m.role == role]
            return len(mine) == self._target(role) and all(m.status == "serving" for m in mine)  # none unreachable

    def _count(self, role: str, status: str) -> int:
        return sum(1 for m in self.members if m.role == role and m.status == status)


def _done(ref: ray.ObjectRef) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)
