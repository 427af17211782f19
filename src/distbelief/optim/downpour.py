"""DownpourSGD: the replica side of Downpour SGD (Dean et al. 2012) as a torch.optim.Optimizer.

Each step applies the gradient locally (``w -= lr * g``) and accrues it on the parameters'
device; every ``n_push`` steps the accrued gradient is copied to host memory and goes to the
shards (compressed, if asked: what a push leaves out stays accrued), every ``n_pull`` steps fresh
parameters are fetched. Pushes and pulls run on background I/O threads, overlapped with compute;
fetched parameters are copied into the model inside ``step()``, never while a forward or backward
pass is running.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import itertools
import os
import socket
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from distbelief.client import ParameterServerClient
from distbelief.client.compression import PushCompressor
from distbelief.config import MAX_RATE, amount_problem, check_count, environment_setting
from distbelief.optim.closing import ClosingOptimizer
from distbelief.optim.connection_settings import (
    AUTH_KEY_FILE_ENV,
    DEFAULT_TIMEOUT_S,
    PS_ADDRESS_ENV,
    TIMEOUT_ENV,
    _key_bytes,
    _key_from_environment,
    check_optional_callback,
    check_optional_str,
    check_worker_id,
    hosts_of_ps_named,
    ps_addresses,
    request_timeout_s,
)
from distbelief.optim.device_copies import DeviceCopies
from distbelief.optim.param_checks import (
    UNAPPLIED_DEFAULTS,
    check_param_groups,
    check_params,
    check_plain_sgd,
    check_rates,
    common_device,
    named_params,
    param_form,
    rate_value,
)
from distbelief.optim.push_pull import PushPullPipeline
from distbelief.optim.torch_methods import TorchOptimizerMethods
from distbelief.sharding import FlatLayout, TensorSpec, tensor_specs
from distbelief.wire.compression import WireCompression
from distbelief.wire.process_group import (
    DEFAULT_STORE_TIMEOUT_S,
    GroupStore,
    ServerRecord,
    process_group_active,
)
from distbelief.wire.security import WireSecurity

__all__ = [
    "AUTH_KEY_FILE_ENV",
    "DEFAULT_TIMEOUT_S",
    "PS_ADDRESS_ENV",
    "TIMEOUT_ENV",
    "DownpourSGD",
    "check_optional_str",
    "check_param_groups",
    "check_plain_sgd",
    "check_rates",
    "ps_addresses",
    "rate_value",
    "request_timeout_s",
]
"""Besides the optimizer, the connection settings it reads (optim/connection_settings.py) and
the checks of its param groups (optim/param_checks.py), importable from here as before."""


def _check_arguments(
    lr: object,
    blocking: object,
    model: object,
    worker_id: object,
    source_host: object,
    group: object,
) -> None:
    """Refuses DownpourSGD's ``lr`` (no rate), ``blocking`` (no bool), ``worker_id``,
    ``source_host`` or ``group`` (no str) or ``model`` (no module), naming it."""
    problem = amount_problem(rate_value(lr), zero_ok=True, most=MAX_RATE)
    if problem is not None:
        raise ValueError(f"lr {problem}, got {lr!r}")
    if not isinstance(blocking, bool):
        raise TypeError(f"blocking must be True or False, got {blocking!r}")
    check_worker_id(worker_id)
    check_optional_str("source_host", source_host)
    check_optional_str("group", group)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_counts(
    n_push: object, n_pull: object, num_workers: object, start_after_version: object
) -> int:
    """Refuses DownpourSGD's counts that are not ones (named); returns
    ``start_after_version``, 0 for None."""
    counts = {"n_push": n_push, "n_pull": n_pull}
    if num_workers is not None:
        counts["num_workers"] = num_workers
    for name, value in counts.items():
        check_count(name, value)
    if start_after_version is None:
        start_after_version = 0
    check_count("start_after_version", start_after_version, least=0)
    return start_after_version


def _zeros(layout: FlatLayout, device: torch.device) -> dict:
    return {
        dtype: torch.zeros(total, dtype=dtype, device=device)
        for dtype, total in layout.sizes.items()
    }


class DownpourSGD(PushPullPipeline, ClosingOptimizer, TorchOptimizerMethods, torch.optim.Optimizer):
    """Asynchronous SGD against a sharded parameter server.

    Args:
        params: Parameters or param groups, as for ``torch.optim.SGD``.
        lr: Local learning rate (a group may override it): a finite number >= 0, or a
            one-element tensor of one, as is every group's, also when a scheduler changes it
            (checked at each step).
        n_push: Push the accrued gradient every this many steps (n_push in Dean et al. 2012).
        n_pull: Fetch fresh parameters every this many steps (n_fetch in Dean et al. 2012).
        model: The module owning ``params``; its parameter names label the shards' tensors
            (without it, the names ``params`` were given with, as ``named_parameters()``).
        ps: Shard addresses (list or comma-separated), in shard-id order. Default: the
            ``DISTBELIEF_PS`` environment variable, else (in a torch.distributed process
            group) the ``ParameterServer`` published in the group's store, with its job key.
        timeout_s: Limit for each request to a shard. Default: ``DISTBELIEF_TIMEOUT_S`` or 30.
        blocking: Wait for each push and pull to finish inside ``step()`` (for exact
            reproducibility and parity tests); default overlaps them with compute.
        worker_id: This replica's name at the shards (liveness, SSP clocks); default unique.
        start_after_version: Warmstart: wait until the shards have applied this many updates
            (from another replica) before starting from their parameters: an int >= 0
            (0 or None: start at once). A shard told that the warm start is over
            (``END_WARMSTART``: the launcher gave that replica up) ends the wait at once.
        hold_timeout_s: Longest a pull may be held by the shards (SSP, sync rounds) or a
            warmstart may wait before ShardTimeoutError, and the longest to wait for a
            ParameterServer to publish its address (it may still be loading its data).
        retry_timeout_s: How long a shard may stay unreachable (e.g. restarting from its
            checkpoint) before requests fail; they are retried with backoff meanwhile.
        auth_key: The job's secret: its bytes, or the hex text of a key file (what
            ``distbelief keygen`` writes). Default: the key published with the
            ParameterServer, else read from the file named by ``DISTBELIEF_AUTH_KEY_FILE``,
            else none.
        security: Full wire security (key and TLS); overrides ``auth_key``.
        group: The parameter group on the shards that ``params`` are (one per partition of a
            model-parallel replica: each with its own layout, version and server optimizer);
            default: the shards' default group.
        wire_dtype: "fp32" (default: slices travel as they are), "bf16" or "fp16": pushes and
            pulls of floating slices travel narrowed to it; the shards keep their own dtype.
        push_compression: "none" (default) or "topk:F": each push carries only the fraction F
            of each slice's accrued gradient of largest magnitude, as indices and values.
        source_host: The address of this machine the connections to the shards leave from
            (default: the one the operating system picks).
        num_workers: The job's number of workers: shards that run sync rounds of another
            number refuse this optimizer (ConsistencyMismatchError). Default: not checked.
        on_push_applied: Called with the step of each push once every shard has applied it
            (``applied_step``), on the thread that calls ``step()``, ``flush()`` or
            ``close()``: what a restarted replica resumes at. It may close the optimizer
            (to stop after so many applied steps): the step it runs in then ends there, and
            the next ``step()`` raises ``ClosedError``. Default: none.

    A lossy push (narrowed or top-k) keeps what it leaves out in the accrued gradient, which
    the next push carries (error feedback: nothing is lost, some is delayed); ``flush()`` and
    ``close()`` send what is left at full width, uncut.

    The shards' consistency model is learned at the handshake: with synchronous rounds every
    step pushes and then waits for the round's aggregated update (n_push = n_pull = 1). A
    ParameterServer given no rate of its own asks for updates instead of gradients: each
    step's gradient is accrued scaled by that step's rate (of its param group), so an LR
    scheduler on this optimizer steers the server's steps too.

    Parameters may live on any one device: the accrued gradient stays there and only a push
    copies it to (pinned) host memory; pulled parameters are copied back inside ``step()``.

    Found through a process group, ``close()`` (run at exit if the script does not call it)
    tells the ParameterServer this rank has finished; it stops once every rank has (or is
    lost: killed, say).

    Every call that reaches the shards (``step``, ``pull_now``, ``flush``) raises
    ``ClosedError`` after ``close()``, before it changes anything: make a new optimizer.

    Raises:
        ValueError: bad hyperparameters (a param group's ``lr`` included, named by its
            index; a group's ``momentum``, ``dampening``, ``weight_decay``, ``nesterov`` or
            ``maximize`` other than plain SGD's), a parameter the shards cannot hold (named:
            given twice, on the meta device, of a dtype the wire does not carry or not
            floating, or with elements that share memory), an empty ``worker_id`` or no shard
            address (neither ``ps`` nor ``DISTBELIEF_PS``).
        TypeError: ``ps``, ``worker_id``, ``auth_key``, ``group``, ``source_host``, ``model``
            or ``on_push_applied`` of the wrong type. Pickling or copying the optimizer is
            refused too (it holds connections): save its ``state_dict()``.
        RendezvousError: no ParameterServer published its address within hold_timeout_s, or
            the process group's store could not be reached within it (its rank is gone), or
            another process holds this rank (names it).
        ModelMismatchError: the shards hold a different model.
        ConsistencyMismatchError: the shards run different consistency settings, or sync
            rounds of another number of workers than ``num_workers``.
        ShardTimeoutError / ShardUnavailableError: a shard did not answer in time.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.01,
        n_push: int = 1,
        n_pull: int = 1,
        model: nn.Module | None = None,
        *,
        ps: str | Sequence[str] | None = None,
        timeout_s: float | None = None,
        blocking: bool = False,
        worker_id: str | None = None,
        start_after_version: int | None = 0,
        hold_timeout_s: float = 300.0,
        retry_timeout_s: float = 60.0,
        auth_key: bytes | str | None = None,
        security: WireSecurity | None = None,
        group: str = "",
        wire_dtype: str = "fp32",
        push_compression: str = "none",
        source_host: str | None = None,
        num_workers: int | None = None,
        on_push_applied: Callable[[int], None] | None = None,
    ) -> None:
        _check_arguments(lr, blocking, model, worker_id, source_host, group)
        check_optional_callback("on_push_applied", on_push_applied)
        auth_key = _key_bytes(auth_key)
        start_after_version = _check_counts(n_push, n_pull, num_workers, start_after_version)
        self.compression = WireCompression.parse(wire_dtype, push_compression)
        # Plain SGD's settings ride along in every group: torch.optim.SGD can then load this
        # optimizer's state dict and step (its step reads each group's momentum).
        super().__init__(params, {"lr": lr, **UNAPPLIED_DEFAULTS})
        check_param_groups(self.param_groups)
        self.n_push, self.n_pull, self.blocking = n_push, n_pull, blocking
        self._lay_out_params(model)
        self._push_futures: list[cf.Future] = []
        self._pull_futures: list[cf.Future] = []
        self.num_steps = 0
        self.applied_step = 0
        """The step of the last push every shard has applied (answered): the shards' parameters
        hold this replica's updates up to it, and none after it but a push still in flight."""
        self._in_flight_step = 0
        """The step of the push whose replies are ``_push_futures``."""
        self._held_until = 0
        """Steps below it are a resumed replica's that every shard took from its previous life
        (``resume()``): done again, pushed to none."""
        self._on_push_applied = on_push_applied
        self._closed = False
        self._closing = False
        """close() runs: a close by on_push_applied during its flush does nothing."""
        self._server: ServerRecord | None = None
        self._store: GroupStore | None = None
        worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        if ps is None and not environment_setting(PS_ADDRESS_ENV) and process_group_active():
            ps, auth_key = self._find_server(worker_id, auth_key, hold_timeout_s)
        with hosts_of_ps_named(ps):
            self.client = ParameterServerClient(
                ps_addresses(ps),
                self.specs,
                timeout_s=request_timeout_s(timeout_s),
                worker_id=worker_id,
                hold_timeout_s=hold_timeout_s,
                retry_timeout_s=retry_timeout_s,
                security=security or WireSecurity(auth_key=auth_key or _key_from_environment()),
                group=group,
                pull_dtype=self.compression.dtype,
                source_host=source_host,
                # After top-k pushes, few elements change between pulls (with a shard optimizer
                # that moves only pushed elements): pulls then bring only those.
                pull_changes=self.compression.topk_fraction is not None,
                num_workers=num_workers,
            )
        try:
            self._join_shards(start_after_version, hold_timeout_s)
        except BaseException:
            # No optimizer is returned to close: its I/O threads and sockets would outlive it.
            self.client.close(wait=False)
            raise
        if not self._copies.is_cuda and self._compressor is None:
            # Shards on this host then apply a push where it lies: no copy of the gradient.
            # Made once joined: a constructor that fails leaves no memory file open. Not for
            # compressed pushes, which travel encoded: only their last, whole one uses the
            # outbox, and it is copied into push buffers then.
            self._outbox = self.client.shared_outbox(self.layout.sizes)
        if self._server is not None:
            # Seed scripts never call close(); the server waits for it to stop by itself.
            atexit.register(self._close_at_exit)

    def _lay_out_params(self, model: nn.Module | None) -> None:
        """Check the parameters and make the shards' layout of them, and the buffers that
        follow it."""
        self._params = [p for group in self.param_groups for p in group["params"]]
        named = named_params(self.param_groups, model)
        check_params(named)
        self.specs: list[TensorSpec] = tensor_specs(named)
        # What each parameter was when the shards' layout was made of it: step() and
        # pull_now() refuse one changed since (its .data replaced, or the model moved).
        self._param_forms = [param_form(p) for p in self._params]
        self.layout = FlatLayout(self.specs)
        self._allocate_buffers(common_device(self._params))
        # Param groups are contiguous runs of self._params (and of the accrued views).
        bounds = list(
            itertools.accumulate([len(g["params"]) for g in self.param_groups], initial=0)
        )
        self._group_ranges = list(itertools.pairwise(bounds))

    def _find_server(
        self, worker_id: str, auth_key: bytes | None, hold_timeout_s: float
    ) -> tuple[str, bytes | None]:
        """The address and key of the ParameterServer published in the process group's store
        (``auth_key``, if given, over its key), with this rank registered as its worker."""
        # Within hold_timeout_s also when the rank serving the store is gone.
        self._store = GroupStore(min(DEFAULT_STORE_TIMEOUT_S, hold_timeout_s))
        self._server = self._store.find_server(hold_timeout_s)
        # By it the server tells this rank's connections, and so whether it is still there.
        self._store.register_worker(self._server.session, worker_id)
        return self._server.address, auth_key or self._server.auth_key

    def _join_shards(self, start_after_version: int, hold_timeout_s: float) -> None:
        """Handshake (initialising empty shards from the model), wait for a warmstart's
        version, pull the shards' parameters."""
        self._compressor = (
            PushCompressor(self.compression, self.client.slices)
            if self.compression.lossy_push
            else None
        )
        self._model_versions = [0] * self.client.num_shards
        self._window_base: list[int] | None = None
        self.client.handshake(self.layout.flatten(self._params))
        self.sync_rounds = bool(self.client.consistency.get("sync"))
        self.apply_worker_lr = bool(self.client.consistency.get("apply_worker_lr"))
        if start_after_version > 0:
            self.client.wait_for_version(start_after_version, hold_timeout_s)
        self.pull_now()

    def _allocate_buffers(self, device: torch.device) -> None:
        """The accrued gradient on ``device``; the wire's outbox and inbox in host memory,
        pinned for a CUDA device so the copies to and from it run at full speed."""
        self.device = device
        self._copies = DeviceCopies(device)
        self._accrued = _zeros(self.layout, device)
        self._accrued_views = self.layout.views(self._accrued)
        self._outbox = self._copies.host_zeros(self.layout.sizes)
        self._inbox = self._copies.host_zeros(self.layout.sizes)
        self._inbox_views = self.layout.views(self._inbox)

    @property
    def version(self) -> int:
        """Updates applied by the most advanced shard, as of the last completed push or pull."""
        return max(self.client.versions)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Apply the gradients locally, then push and pull on schedule.

        Raises:
            ValueError: a param group's ``lr`` is no rate (set since, by a scheduler say) or
                its ``momentum``, ``weight_decay``... not plain SGD's (set since), or a
                parameter's shape, dtype or device changed since the constructor (named);
                nothing is applied, pushed or counted.
            ShardTimeoutError / ShardUnavailableError / RemoteError: a past push or pull failed.
            ClosedError: called after ``close()`` (nothing is applied or counted).
        """
        self._check_open("step")
        self._check_unchanged()
        check_param_groups(self.param_groups)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._finish_pull_if_done()
        self._finish_push_if_done()
        # on_push_applied may close the optimizer: then this step comes after the close.
        self._check_open("step")
        # A resumed replica's step whose update the shards took from its previous life: done
        # again (its neighbouring stages need it), but not pushed again.
        on_the_shards = self.num_steps < self._held_until and not self.sync_rounds
        if self._window_base is None and not on_the_shards:
            self._window_base = list(self._model_versions)
        if not on_the_shards:
            self._accrue()
        self.num_steps += 1
        if self.sync_rounds:
            # The round's aggregated update replaces the parameters: no local step needed.
            self._push_accrued()
            if self._closed:  # by on_push_applied: its close pushed this round's gradient
                return loss
            self._start_pull(after_versions=self._model_versions)
            self._finish_pull_if_done(block=True)
            return loss
        self._local_update()
        # A step some shards hold from the previous life ends a push: the next one's steps
        # are then all new to them.
        due = self.num_steps % self.n_push == 0 or self.num_steps in self.client.held_steps
        if due and not on_the_shards:
            self._push_accrued(now=self.blocking)
            if self._closed:  # by on_push_applied: its close pushed this step's gradient
                return loss
        if self.num_steps % self.n_pull == 0:
            if self.blocking:
                self.pull_now()
            else:
                self._start_pull()
        return loss

    def resume(self, step: int, applied_step: int | Sequence[int | None] | None = None) -> None:
        """Go on from ``step`` (a restarted replica's). ``applied_step``: the step of the last
        push the shards took from the replica's previous life, one for all of them or one per
        shard (``client.pushed_steps`` of a restarted replica; None: none). No shard is sent a
        push of a step up to its own again: the steps up to the lowest are done again and
        pushed to none, later ones only to the shards that lack them, so each step's update is
        applied once on every shard. Under sync rounds it is not used: a round's update is
        no worker's own to leave out.

        Raises:
            ValueError: ``step`` is no count >= 0, or ``applied_step`` no count >= 0 nor one
                per shard (each a count >= 0 or None).
            ClosedError: called after ``close()``, whose ``applied_step`` it would overwrite.
        """
        self._check_open("resume")
        check_count("step", step, least=0)
        if applied_step is not None and not isinstance(applied_step, Sequence):
            check_count("applied_step", applied_step, least=0)
            applied_step = [applied_step] * self.client.num_shards
        self.client.hold_steps(applied_step, "applied_step")
        if self.sync_rounds:
            self.client.hold_steps(None, "applied_step")
        self.num_steps = step
        self._held_until = min(self.client.held_steps)
        self.applied_step = max(step, self._held_until)

    def _take_step_count(self, num_steps: int) -> None:
        """Go on from the step count a loaded state dict brings. One below the current takes
        the replica back to a saved state: the steps after it are done again from there, new
        updates that every shard is pushed (no previous life's, as after ``resume()``), and the
        pushes of the steps undone are no longer this count's applied ones."""
        if num_steps < self.num_steps:
            self.client.hold_steps(None, "applied_step")
            self._held_until = 0
            self.applied_step = min(self.applied_step, num_steps)
            self._in_flight_step = min(self._in_flight_step, num_steps)
        self.num_steps = num_steps

    def _accrue(self) -> None:
        """Add this step's gradients (scaled by their group's rate if the server asks for
        updates) to the accrued buffer, on its device."""
        grads = []
        for param in self._params:
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            grads.append(grad if grad.device == self.device else grad.to(self.device))
        self._copies.claim_accrued()
        if not self.apply_worker_lr:
            torch._foreach_add_(self._accrued_views, grads)
            return
        for group, (start, stop) in zip(self.param_groups, self._group_ranges, strict=True):
            torch._foreach_add_(
                self._accrued_views[start:stop], grads[start:stop], alpha=float(group["lr"])
            )

    def _local_update(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                alpha = -rate_value(group["lr"])
                torch._foreach_add_(params, [p.grad for p in params], alpha=alpha)

    def _layout_changed(self) -> bool:
        """Whether a parameter's shape, dtype or device changed since the constructor."""
        return [param_form(p) for p in self._params] != self._param_forms

    def _check_unchanged(self) -> None:
        """Refuses parameters whose shape, dtype or device changed since the constructor (the
        shards hold the layout made then; a pulled value would not fit).

        Raises:
            ValueError: naming the first such parameter, as it was and as it is.
        """
        if not self._layout_changed():
            return
        for spec, param, (shape, dtype, device) in zip(
            self.specs, self._params, self._param_forms, strict=True
        ):
            if param_form(param) != (shape, dtype, device):
                raise ValueError(
                    f"parameter {spec.name!r} changed since DownpourSGD was made: it was "
                    f"{list(shape)} {dtype} on {device}, it is {list(param.shape)} "
                    f"{param.dtype} on {param.device} (the shards hold the parameters as they "
                    "were): make a new optimizer for the changed model"
                )
