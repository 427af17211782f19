"""The one exception hierarchy of distbelief.

Every error raised at a process boundary (wire, shard, launcher) is a ``DistBeliefError``.
Bad user input stays ``ValueError``; internal invariants stay ``assert``.
"""

from __future__ import annotations


class DistBeliefError(Exception):
    """Base of every error this library raises on purpose."""


class PSError(DistBeliefError):
    """A parameter-server request failed."""


class ShardTimeoutError(PSError, TimeoutError):
    """A shard did not answer a request within its timeout."""


class HeldTooLongError(ShardTimeoutError):
    """A shard held a pull (bounded staleness, sync rounds) past ``hold_timeout_s`` waiting for
    slower workers. The shard answered every request: unlike its parent, this says nothing of
    the shard being down, so a ``close()`` after it still pushes what the worker holds."""


class ShardUnavailableError(PSError, ConnectionError):
    """A shard could not be reached, or closed or reset the connection."""


class ProtocolError(PSError):
    """A peer sent bytes that are not a valid message of this protocol."""


class NotAPeerError(ProtocolError):
    """The address answers in another protocol: another program listens there (a web server,
    say), not a server of this library."""


class AuthenticationError(ProtocolError):
    """The job keys do not match: the shard refused this process's key, asked for one this
    process was not given, or could not prove it holds the key (a wrong or missing key file,
    or another job's shard at the address)."""


class TLSMismatchError(AuthenticationError):
    """The two ends of a connection disagree on TLS: the shard speaks it and this process does
    not (no CA given), or the reverse, or the shard's certificate does not verify against the
    CA this process was given. The message says which."""


class BindError(ShardUnavailableError):
    """A server (a shard, a stage of a partitioned replica) could not listen at its address:
    another process holds the port, say. ``address`` is the address as given, ``problem`` says
    why (``address already in use``)."""

    def __init__(self, address: str, problem: str) -> None:
        self.address = address
        self.problem = problem
        super().__init__(f"cannot bind {address}: {problem}")

    def __reduce__(self) -> tuple:
        return type(self), (self.address, self.problem)


class RemoteError(PSError):
    """A shard received a valid request but refused it; the message says why."""


class UnknownOpError(RemoteError, ProtocolError):
    """The server at the address does not answer the request's op: it is another kind of
    server than the client expects (a shard where a pipeline stage was meant, say)."""


class ModelMismatchError(RemoteError):
    """The worker's model does not match the parameters the shards hold."""


class ShardListError(ModelMismatchError):
    """The shard addresses given are not the shards' own list: another number of shards, or
    another order (a user's ``--ps`` or ``ps=``)."""


class TableSizeMismatchError(ModelMismatchError):
    """A shard holds an embedding table of another number of rows than the client declared;
    the message names the table and both sizes (the client adds where its size came from)."""


class TableWidthMismatchError(ModelMismatchError):
    """A shard holds an embedding table with rows of another width than the client declared;
    the message names the table and both widths (the client adds where its width came from)."""


class LayoutMismatchError(ModelMismatchError):
    """The worker divides the model among the shards differently than a shard does (another
    partitioner); the message names both descriptions."""


class EvaluationNotOpenError(RemoteError):
    """A gradient bundle was pushed for a Sandblaster evaluation that the shard does not have
    open (closed already, or not opened yet): the pusher's work is not needed for it."""


class VectorMissingError(RemoteError, ValueError):
    """A shard has no vector of the name a read asked for. A Sandblaster worker meets it when
    the shard was restarted after the coordinator handed out the point to read: the shard holds
    its last checkpoint's vectors, which may lack that point (a line search's trial)."""


class TooManyConnectionsError(RemoteError):
    """A server (a shard) already held its maximum number of connections and refused this one;
    the message names the limit (a shard's ``--max-connections``)."""


class PlacementRefusedError(RemoteError):
    """A shard could not take a push from the client's shared memory: it uses TCP only, or
    cannot map the client's buffers (a shard restarted at the address as another kind, say).
    Nothing was applied; the client sends the push's tensors instead."""


class ShardRestartedError(RemoteError):
    """A shard answered a vector program from another process life than before: it was
    restarted, and its vectors are those of its last checkpoint, not of the program before."""


class ShardEmptyError(RemoteError, ValueError):
    """A shard holds no parameters to push to or pull from: no client has initialised it, or
    it was restarted with no checkpoint to restore from (a ``distbelief ps`` without
    ``--checkpoint-dir``), and what it held is lost."""


class ConsistencyMismatchError(PSError):
    """The shards of one model run different consistency settings (sync rounds, SSP bound,
    staleness policy, ...), or sync rounds of another number of workers than the worker's;
    the message names the shards, the setting and both values. ``field`` names the setting's
    config field (``section.field``; None where no one field holds it), so the command line
    can name the flag that sets it; ``problem`` says who runs which value."""

    def __init__(self, problem: str, field: str | None = None) -> None:
        self.problem = problem
        self.field = field
        super().__init__(problem if field is None else f"{field} differs: {problem}")

    def __reduce__(self) -> tuple:
        return type(self), (self.problem, self.field)


class ClosedError(DistBeliefError, RuntimeError):
    """An optimizer, embedding tables or client was used after its ``close()`` (or a
    ``ParameterServer`` run again after its ``run()`` returned, or a cluster, local or Ray,
    asked to start a process after ``stop_all()``): its connections are gone, so make a new
    one. The message names the object and the call."""

    def __init__(self, owner: str, action: str, after: str = "close()") -> None:
        self.owner = owner
        self.action = action
        self.after = after
        super().__init__(f"{owner}: {action} after {after}")

    def __reduce__(self) -> tuple:
        return type(self), (self.owner, self.action, self.after)


class RendezvousError(DistBeliefError):
    """The torch.distributed process group's store could not be reached, no
    ``ParameterServer`` published its address there in time, or another process holds this
    process's rank there."""


class DatasetUnavailableError(DistBeliefError, FileNotFoundError):
    """A data set's files are missing and could not be downloaded."""


class ChildFailedError(DistBeliefError):
    """A process started by the launcher exited with an error."""

    def __init__(self, name: str, exitcode: int | None, detail: str = "") -> None:
        self.name = name
        self.exitcode = exitcode
        self.detail = detail
        message = f"{name} failed" + ("" if exitcode is None else f" (exit code {exitcode})")
        self.head = message
        """``<name> failed (exit code N)``."""
        super().__init__(f"{message}:\n{detail}" if detail else message)

    def short(self) -> str:
        """``<name> failed (exit code N): <error>``, where the error is ``error()``."""
        error = self.error()
        return f"{self.head}: {error}" if error else self.head

    def error(self) -> str:
        """The exception line(s) at the end of ``detail``'s traceback (all of ``detail`` if it
        is none); empty without a detail."""
        lines = self.detail.rstrip().splitlines()
        frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
        if not frames:
            return self.detail.strip()
        rest = lines[frames[-1] + 1 :]
        while rest and rest[0].startswith(" "):  # the frame's source line and its ^^^ markers
            rest = rest[1:]
        return "\n".join(rest) or lines[-1]


class ClusterError(DistBeliefError):
    """The cluster engine cannot run the job: Ray cannot be reached, or has too few resources
    to place the job's processes; the message says which and what the job needs. ``field``
    names the config field whose value the cluster refuses (``cluster.ray_address``: no Ray
    to join there; ``cluster.num_workers``: too few CPUs for the job), so the command line can
    name its flag; None where no setting is to blame (a busy cluster)."""

    def __init__(self, problem: str, field: str | None = None) -> None:
        self.problem = problem
        self.field = field
        super().__init__(problem)

    def __reduce__(self) -> tuple:
        return type(self), (self.problem, self.field)


class CoordinatorError(DistBeliefError):
    """The Sandblaster coordinator could not carry out an evaluation (a commit on the shards
    failed, or the coordinator was stopped); the message says which evaluation and why."""


class CoordinatorUnavailableError(CoordinatorError, ConnectionError):
    """A worker could not reach the Sandblaster coordinator, or it did not answer, for longer
    than the worker's retry timeout."""


class EvaluationStalledError(CoordinatorError, TimeoutError):
    """No portion of an evaluation finished within the coordinator's timeout (no worker is
    computing, or every one is stuck)."""


class PipelineError(DistBeliefError):
    """A stage of a partitioned replica could not exchange activations or gradients with a
    neighbouring stage; the message names the stage, the peer and the step."""


class StageTimeoutError(PipelineError, TimeoutError):
    """A neighbouring stage did not send (or take) an activation or gradient in time."""


class StageUnavailableError(PipelineError, ConnectionError):
    """A neighbouring stage could not be reached, or closed the connection."""


class NotAStageError(PipelineError):
    """The address given as the next stage's answers, but not as a pipeline stage (a shard,
    say): a user's ``--next`` points at the wrong process."""


class CheckpointError(DistBeliefError, ValueError):
    """A checkpoint file is missing a part, corrupt, or belongs to another job or shard."""


class RunFolderError(DistBeliefError):
    """The launcher could not write a file of its run folder (made read-only, the disk full):
    the job was stopped in order, as for a failed process."""


class LauncherInterrupted(DistBeliefError):
    """Ctrl-C or SIGTERM reached the launcher; every process it started has been stopped."""


class ConfigFieldError(ValueError):
    """A config field holds a bad value. ``field`` names it (``section.field`` once it is part
    of a job), so the command line can name the flag the user typed instead."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        """What is wrong with the value, e.g. ``must be >= 0, got -1.0``."""
        super().__init__(f"{field} {problem}")

    def __reduce__(self) -> tuple:
        return type(self), (self.field, self.problem)
