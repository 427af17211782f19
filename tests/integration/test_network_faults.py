"""A network that misbehaves between workers and shards (tests/netproxy.py): a partition shorter
than the retry timeout, a longer one, latency, a stall, reset connections and dropped bytes.

The shards are served in this process behind one proxy each and the workers are DownpourSGD
replicas with plain SGD and blocking steps, so every push is known: after any fault the shards
hold exactly the initial parameters minus the learning rate times the sum of the pushes, and
their version counts each push once. Each shard records the pushes that reached it, so a test
also shows that the fault did deliver some push twice (the retry) and the shard applied it once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from distbelief.errors import ShardTimeoutError
from distbelief.optim import DownpourSGD
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.wire import serve
from distbelief.wire.security import WireSecurity, generate_key
from tests.netproxy import DOWN, UP, FaultProxy

SERVER_LR = 0.5
"""A power of two: the shards' sums of small integer gradients stay exact in float32."""
TIMEOUT_S = 1.0
"""Each request's limit where a test needs requests to time out during a fault: short, so a
test sees several retries; a busy machine that exceeds it only causes more retries, never a
wrong result, and such tests leave many seconds of retries after the fault."""
PATIENT_TIMEOUT_S = 30.0
"""Each request's limit where a test needs the requests after a fault to succeed at their
first attempt (or at the one attempt left): no busy machine takes that long."""
SECURITY = WireSecurity(auth_key=generate_key())

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _tcp_only(monkeypatch) -> None:
    # The proxy and both ends are on this host: shared memory would carry the bytes past the
    # proxy, which would then see only the channel's wake-ups. These faults are the network's.
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "tcp")


class RecordingShard(ParameterShard):
    """A ParameterShard that notes the (worker, sequence number) of every push that reaches it,
    repeats included."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: list[tuple[str | None, int | None]] = []
        self._arrivals_lock = threading.Lock()

    def push(self, grads, *, worker=None, seq=None, **kwargs):
        with self._arrivals_lock:
            self.arrivals.append((worker, None if seq is None else seq[1]))
        return super().push(grads, worker=worker, seq=seq, **kwargs)

    def repeated_pushes(self) -> int:
        """Pushes that arrived more than once (retries of a push the shard had seen)."""
        with self._arrivals_lock:
            return len(self.arrivals) - len(set(self.arrivals))


@contextlib.contextmanager
def shards_behind_proxies(num_shards: int = 2) -> Iterator[tuple[list[RecordingShard], list]]:
    """Shards served on 127.0.0.1 in this process, each reached through its own FaultProxy."""
    shards = [
        RecordingShard(i, num_shards, server_optimizer_factory("sgd", lr=SERVER_LR))
        for i in range(num_shards)
    ]
    servers, proxies = [], []
    try:
        for shard in shards:
            servers.append(serve("tcp://127.0.0.1:0", ShardService(shard), security=SECURITY))
            proxies.append(FaultProxy(servers[-1].address))
        yield shards, proxies
    finally:
        for proxy in proxies:
            proxy.close()
        for server in servers:
            server.stop()


def gradient_value(rank: int, step: int) -> float:
    """Every element of replica ``rank``'s gradient at ``step``: a small integer."""
    return float((rank + 1) * (step % 3 + 1))


class Replica:
    """One worker: a zero-initialised linear model trained through DownpourSGD (blocking, n_push
    = n_pull = 1) with gradients set by hand, so each push is known."""

    def __init__(
        self,
        proxies: list[FaultProxy],
        rank: int,
        retry_timeout_s: float,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.rank = rank
        self.model = nn.Linear(16, 8)
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.zero_()
        self.optimizer = DownpourSGD(
            self.model.parameters(),
            lr=0.1,
            model=self.model,
            ps=[proxy.address for proxy in proxies],
            blocking=True,
            worker_id=f"worker{rank}",
            timeout_s=timeout_s,
            retry_timeout_s=retry_timeout_s,
            security=SECURITY,
        )
        self.steps = 0
        self.pushed_sum = 0.0

    def step(self) -> None:
        value = gradient_value(self.rank, self.steps)
        for parameter in self.model.parameters():
            parameter.grad = torch.full_like(parameter, value)
        self.optimizer.step()
        self.steps += 1
        self.pushed_sum += value


class BackgroundReplica(threading.Thread):
    """A Replica stepping on its own thread until told to stop; keeps its error if it fails."""

    def __init__(self, replica: Replica) -> None:
        super().__init__(name=f"replica{replica.rank}", daemon=True)
        self.replica = replica
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.replica.step()
        except BaseException as e:  # handed to the test
            self.error = e

    def wait_for_steps(self, num_steps: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.replica.steps < num_steps and self.is_alive():
            assert time.monotonic() < deadline, f"replica {self.replica.rank} stopped stepping"
            time.sleep(0.01)
        assert self.error is None, self.error

    def finish(self, timeout_s: float) -> None:
        self.stop.set()
        self.join(timeout_s)
        assert not self.is_alive(), f"replica {self.replica.rank} hangs"
        assert self.error is None, self.error
        self.replica.optimizer.close()


def assert_each_push_applied_once(shards: list[RecordingShard], replicas: list[Replica]) -> None:
    num_pushes = sum(replica.steps for replica in replicas)
    expected = -SERVER_LR * sum(replica.pushed_sum for replica in replicas)
    for shard in shards:
        assert shard.version == num_pushes
        for values in shard.parameters():
            assert torch.equal(values, torch.full_like(values, expected)), (values, expected)


def run_through(
    proxies: list[FaultProxy],
    fault,
    *,
    num_replicas: int = 1,
    retry_timeout_s: float = 10.0,
    timeout_s: float = TIMEOUT_S,
) -> list[Replica]:
    """Replicas step on their threads; ``fault(proxies)`` runs once each made a few steps; they
    go on until each made a few more once the fault is over."""
    threads = [
        BackgroundReplica(Replica(proxies, rank, retry_timeout_s, timeout_s))
        for rank in range(num_replicas)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.wait_for_steps(3, timeout_s=20)
        fault(proxies)
        healed_by = time.monotonic() + 30
        while any(not proxy.flowing for proxy in proxies):
            assert time.monotonic() < healed_by, "the proxies did not heal"
            time.sleep(0.01)
        after = [thread.replica.steps for thread in threads]
        for thread, steps in zip(threads, after, strict=True):
            thread.wait_for_steps(steps + 3, timeout_s=retry_timeout_s + 10)
    finally:
        for thread in threads:
            thread.finish(timeout_s=retry_timeout_s + 10)
    return [thread.replica for thread in threads]


@pytest.mark.parametrize("refuse", [False, True], ids=["black-hole", "refused"])
def test_replicas_ride_out_a_partition_shorter_than_the_retry_timeout(refuse):
    partition_s = 2.0
    with shards_behind_proxies() as (shards, proxies):
        accepted_before = [proxy.connections_accepted for proxy in proxies]

        def partition(proxies):
            for proxy in proxies:
                proxy.partition(partition_s, refuse=refuse)

        if refuse:
            # Refused attempts fail at once, on the backoff's schedule: after those at 0.05,
            # 0.15, 0.35, 0.75 and 1.55 s, the next (3.15 s) would be past a 3.1 s retry
            # timeout: the replicas go on retrying until its very end, not only while the next
            # backoff still fits in it, and reach the shards, healed 1.1 s before, in one
            # attempt that a busy machine does not time out.
            retry_timeout_s, timeout_s = partition_s + 1.1, PATIENT_TIMEOUT_S
        else:
            # Attempts time out in the black hole and are made again on new connections, until
            # one made after the heal is answered in time: seconds of retries for a busy machine.
            retry_timeout_s, timeout_s = partition_s + 20.0, TIMEOUT_S
        replicas = run_through(
            proxies,
            partition,
            num_replicas=2,
            retry_timeout_s=retry_timeout_s,
            timeout_s=timeout_s,
        )
        assert_each_push_applied_once(shards, replicas)
        # The partition was felt: the replicas reconnected (a replica waiting on one shard may
        # not have asked the other anything meanwhile).
        assert sum(proxy.connections_accepted for proxy in proxies) > sum(accepted_before)
        if refuse:
            assert sum(proxy.connections_refused for proxy in proxies) > 0


def test_a_partition_longer_than_the_retry_timeout_fails_clearly_and_in_time():
    retry_timeout_s = 2.0
    with shards_behind_proxies() as (shards, proxies):
        replica = Replica(proxies, 0, retry_timeout_s)
        replica.step()
        for proxy in proxies:
            proxy.partition(60.0)
        started = time.monotonic()
        # A black hole: the last attempt was not answered in time.
        with pytest.raises(ShardTimeoutError, match=r"shard \d .*gave up after retrying"):
            replica.step()
        elapsed_s = time.monotonic() - started
        replica.optimizer.client.close(wait=False)
        assert retry_timeout_s <= elapsed_s < retry_timeout_s + 2 * TIMEOUT_S + 5.0
        # The push that failed was applied at most once.
        assert all(shard.version in (1, 2) for shard in shards)


def test_latency_below_the_request_timeout_slows_the_replica_and_loses_nothing():
    delay_s = 0.1
    with shards_behind_proxies() as (shards, proxies):
        # No request may time out (it would be pushed again): far below a patient limit.
        replica = Replica(proxies, 0, retry_timeout_s=10.0, timeout_s=PATIENT_TIMEOUT_S)
        for proxy in proxies:
            proxy.set_delay(delay_s)
        started = time.monotonic()
        for _ in range(3):
            replica.step()
        # Each step is a push and a pull, each a request and a reply that wait delay_s.
        assert time.monotonic() - started >= 3 * 4 * delay_s
        replica.optimizer.close()
        assert_each_push_applied_once(shards, [replica])
        assert all(shard.repeated_pushes() == 0 for shard in shards)


def test_latency_above_the_request_timeout_fails_clearly_and_applies_the_push_once():
    retry_timeout_s = 1.0
    with shards_behind_proxies() as (shards, proxies):
        replica = Replica(proxies, 0, retry_timeout_s)
        replica.step()
        for proxy in proxies:
            proxy.set_delay(1.5 * TIMEOUT_S)
        started = time.monotonic()
        with pytest.raises(ShardTimeoutError, match="timed out"):
            replica.step()
        assert time.monotonic() - started < retry_timeout_s + 2 * TIMEOUT_S + 5.0
        replica.optimizer.client.close(wait=False)
        for proxy in proxies:
            proxy.set_delay(0.0)
        # The first attempt reached the shards late, after the replica had given it up, and was
        # applied once (the retries' new connections did not get past the job-key handshake).
        deadline = time.monotonic() + 10
        while any(shard.version < 2 for shard in shards) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5 * TIMEOUT_S)  # no later arrival is applied either
        assert all(shard.version == 2 for shard in shards)


def test_a_stall_is_ridden_out_and_the_late_bytes_apply_nothing_twice():
    with shards_behind_proxies() as (shards, proxies):
        replica = Replica(proxies, 0, retry_timeout_s=10.0)
        replica.step()
        for proxy in proxies:
            proxy.stall()
        # The step's push goes into the stalled proxies, times out, and is retried meanwhile.
        accepted_before = [proxy.connections_accepted for proxy in proxies]
        stepping = threading.Thread(target=replica.step, daemon=True)
        stepping.start()
        # Held until each shard's push has timed out and been retried on a new connection,
        # however long a busy machine takes to get there.
        retried_by = time.monotonic() + 30
        while any(
            proxy.connections_accepted == before
            for proxy, before in zip(proxies, accepted_before, strict=True)
        ):
            assert time.monotonic() < retried_by, "the stalled push was not retried"
            time.sleep(0.01)
        for proxy in proxies:
            proxy.resume()
        stepping.join(20)
        assert not stepping.is_alive() and replica.steps == 2
        replica.step()
        replica.optimizer.close()
        # The first attempt, held in the proxy, reaches each shard after the stall beside its
        # retry (perhaps after the last step): the shard sees the push twice, applies it once.
        # (A retry that a busy machine timed out just after the stall adds a repeat.)
        deadline = time.monotonic() + 10
        while any(s.repeated_pushes() < 1 for s in shards) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(shard.repeated_pushes() >= 1 for shard in shards), [
            shard.arrivals for shard in shards
        ]
        assert_each_push_applied_once(shards, [replica])


def test_connections_reset_again_and_again_lose_and_repeat_nothing():
    with shards_behind_proxies() as (shards, proxies):
        num_cut = 0

        def cut_repeatedly(proxies):
            # Until eight connections were reset: a busy machine's replicas may not have
            # reconnected by the next cut, 0.1 s later.
            nonlocal num_cut
            deadline = time.monotonic() + 30
            while num_cut < 8 and time.monotonic() < deadline:
                num_cut += sum(proxy.cut() for proxy in proxies)
                time.sleep(0.1)

        replicas = run_through(proxies, cut_repeatedly, num_replicas=2)
        assert num_cut >= 8
        assert_each_push_applied_once(shards, replicas)


@pytest.mark.parametrize("direction", [UP, DOWN])
def test_bytes_dropped_from_a_push_are_detected_and_the_push_applied_once(direction):
    with shards_behind_proxies() as (shards, proxies):
        replica = Replica(proxies, 0, retry_timeout_s=10.0)
        replica.step()
        # Ten bytes of the next push (UP) or of its reply (DOWN) on shard 0's way vanish: the
        # frame's header no longer parses, on the shard's side or on the replica's.
        proxies[0].drop(direction, 10)
        replica.step()
        replica.step()
        replica.optimizer.close()
        assert proxies[0].bytes_dropped[direction] == 10
        assert_each_push_applied_once(shards, [replica])
        if direction == DOWN:
            # The shard had applied the push whose reply was mangled: the retry was a repeat.
            assert shards[0].repeated_pushes() == 1
