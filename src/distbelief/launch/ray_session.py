"""Ray for one job: importing it (a clear error when the extra is missing), checking the address
the user gave, and joining that cluster or starting the embedded instance: on this machine, on
loopback only, with a fresh token, its files in a temporary folder, shut down at the end. Only
this module and the Ray cluster import Ray, and only when a job uses it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from distbelief.config import JobConfig
from distbelief.deferred_signals import signals_deferred
from distbelief.errors import ClusterError, ConfigFieldError
from distbelief.hosts import is_host
from distbelief.launch.process_groups import in_a_process_group_of_their_own
from distbelief.launch.ray_probe import GRPC_UNAUTHENTICATED, GRPC_UNIMPLEMENTED, ask_gcs
from distbelief.telemetry.progress import is_terminal

logger = logging.getLogger(__name__)

RAY_EXTRA = "pip install 'distbelief[ray]'"
ADDRESS_CHECK_TIMEOUT_S = 5.0
"""Longest wait for the Ray head at the address to answer before a job starts."""
OBJECT_STORE_BYTES = 128 * 1024**2
"""The embedded instance's object store: nothing big goes through Ray (parameters and
gradients travel on the project's wire), so the smallest store Ray accepts, roughly."""


def import_ray() -> ModuleType:
    """Ray, imported.

    Raises:
        ConfigFieldError: Ray is not installed (names the extra to install).
    """
    try:
        import ray
    except ImportError as e:
        raise ConfigFieldError(
            "cluster.engine", f"ray needs Ray, which is not installed: {RAY_EXTRA}"
        ) from e
    return ray


def check_address(address: str) -> None:
    """Refuses an address Ray cannot be joined at for a job, within about
    ``ADDRESS_CHECK_TIMEOUT_S``: Ray's own client would retry it for minutes.

    Raises:
        ConfigFieldError: not HOST:PORT or auto (auto: no Ray runs on this machine, nor at
            RAY_ADDRESS); a Ray Client address (ray://), whose driver runs off the cluster,
            where the processes' event links and the shards' stats could not reach it; no Ray
            head answers there (nothing listens, or what answers is no gRPC server, or one
            without Ray's GCS: Ray Client's port, say); or the head refuses this process's
            token. Or Ray is not installed (``cluster.engine``).
        ValueError: RAY_AUTH_MODE=token, but Ray finds no token.
    """
    if address.startswith("ray://"):
        raise ConfigFieldError(
            "cluster.ray_address",
            "cannot be a Ray Client address: run distbelief on a node of the cluster and give "
            f"its head's HOST:PORT (or auto), got {address!r}",
        )
    if address == "auto":
        _check_ray_address_variable()
    elif not _is_host_port(address):
        raise ConfigFieldError(
            "cluster.ray_address",
            f"must be HOST:PORT of a Ray head, auto or local, got {address!r}",
        )
    import_ray()
    found = _address_of_auto() if address == "auto" else _address_dialed(address)
    if found is None:  # this Ray cannot say where auto leads (ray.init finds out)
        return
    _check_head_answers(found, shown=_address_shown(address, found))


def _is_host_port(address: str) -> bool:
    host, colon, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # an IPv6 address in brackets
    # ASCII digits only: str.isdigit() takes other scripts' digits (int() reads them, Ray's
    # client does not) and superscripts (int() refuses them).
    digits = port.isascii() and port.isdigit()
    return bool(colon and is_host(host) and digits and 0 < int(port) < 65536)


def _check_ray_address_variable() -> None:
    """Refuses a RAY_ADDRESS that auto would read and that is not a head's HOST:PORT: Ray
    would start an instance of its own for "local" (on every interface, sized to this
    machine, left running), or say only "Invalid address format" for the others.

    Raises:
        ConfigFieldError: it is not.
    """
    value = os.environ.get("RAY_ADDRESS", "")
    if not value or value == "auto" or _is_host_port(value):  # "auto": Ray's as ours
        return
    if value == "local":
        problem = "give --ray-address local for an instance of the job's own"
    elif value.startswith("ray://"):
        problem = "a Ray Client address: run distbelief on a node of the cluster"
    else:
        problem = "not HOST:PORT of a Ray head"
    raise ConfigFieldError(
        "cluster.ray_address",
        f"auto reads RAY_ADDRESS={value!r}: {problem} (or unset RAY_ADDRESS, or give the "
        "head's HOST:PORT)",
    )


def _address_shown(address: str, found: str) -> str:
    """``address`` as typed, with what Ray dials for it where that differs; for auto, where
    Ray found it (RAY_ADDRESS, when set: a stale one is then named)."""
    if address == found:
        return address
    if address == "auto" and os.environ.get("RAY_ADDRESS"):
        address = f"auto (RAY_ADDRESS={os.environ['RAY_ADDRESS']})"
    return f"{address}, which Ray dials as {found}"


def _address_dialed(address: str) -> str:
    """HOST:PORT that Ray's client dials for ``address``: loopback (127.0.0.1, localhost) is
    this machine's network address unless Ray runs as a single-machine instance. A head that
    listens on loopback alone answers the address typed, not that one, and Ray's client then
    waits on it without end."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return address
    try:
        return canonicalize_bootstrap_address(address) or address
    except (OSError, ValueError):  # no network address to say: Ray's client finds out
        return address


def _check_head_answers(address: str, *, shown: str | None = None) -> None:
    """Refuses HOST:PORT unless a Ray head's GCS answers there and accepts this process's token;
    errors name it as ``shown`` (default: ``address``).

    Raises:
        ConfigFieldError: it does not (``check_address``'s cases).
        ValueError: RAY_AUTH_MODE=token, but Ray finds no token.
    """
    shown = shown or address
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # an IPv6 address in brackets ([::1]:6379): the name lookup takes it bare
    try:
        if _ray_uses_tls():  # the probe speaks plain HTTP/2: a TLS head can only be reached
            socket.create_connection((host, int(port)), timeout=ADDRESS_CHECK_TIMEOUT_S).close()
            return
        answer = ask_gcs(
            host, int(port), headers=_auth_headers(), timeout_s=ADDRESS_CHECK_TIMEOUT_S
        )
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise ConfigFieldError(
            "cluster.ray_address", f"no Ray head answers at {shown} ({reason})"
        ) from e
    if answer.status == GRPC_UNAUTHENTICATED:
        raise ConfigFieldError(
            "cluster.ray_address",
            f"the Ray head at {shown}{',' * (shown != address)} refuses this process's token "
            f"({answer.message}): set "
            "RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token",
        )
    if answer.status == GRPC_UNIMPLEMENTED:
        raise ConfigFieldError(
            "cluster.ray_address",
            f"no Ray head answers at {shown} (a gRPC server without Ray's GCS answers there: "
            "Ray Client's port? give the head's GCS port, 6379 by default)",
        )


def _ray_uses_tls() -> bool:
    """Whether this process's Ray speaks TLS to the cluster (``RAY_USE_TLS``, read as Ray reads
    it)."""
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def _address_of_auto() -> str | None:
    """HOST:PORT of the cluster ``ray.init(address="auto")`` joins (RAY_ADDRESS, or the one
    this machine runs); None where this Ray's version cannot say.

    Raises:
        ConfigFieldError: there is none.
    """
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return None
    try:
        return canonicalize_bootstrap_address("auto")
    except ConnectionError as e:
        raise ConfigFieldError(
            "cluster.ray_address",
            "auto finds no Ray running on this machine, nor RAY_ADDRESS: start one (ray start "
            "--head) or give its head's HOST:PORT",
        ) from e


def _auth_headers() -> dict[str, str]:
    """The header Ray's client sends with each call (its token, where RAY_AUTH_MODE=token);
    none where this Ray's version has no token authentication.

    Raises:
        ValueError: RAY_AUTH_MODE=token, but Ray finds no token.
    """
    try:
        from ray._raylet import AuthenticationTokenLoader
        from ray.exceptions import AuthenticationError
    except ImportError:
        return {}
    try:
        return dict(AuthenticationTokenLoader.instance().get_token_for_http_header())
    except AuthenticationError as e:
        said = str(e).split(". ", 1)[0]  # Ray's first sentence; the rest is a how-to
        raise ValueError(
            f"RAY_AUTH_MODE=token: {said}: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or write "
            "the cluster's token to ~/.ray/auth_token"
        ) from None


def _embedded_environment() -> dict[str, str]:
    """Variables the embedded instance needs set before Ray is imported and started; variables
    the user set already are kept, but for the token's."""
    wanted = {
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray starts its workers at niceness 15, below everything else on the machine; the
        # embedded instance's actors run as the local launcher's processes do (at 0).
        "RAY_worker_niceness": "0",
    }
    if "ray" not in sys.modules:
        # Ray turns 127.0.0.1 into the machine's network address unless it runs as a
        # single-machine instance (its mode on macOS and Windows, read when Ray is imported);
        # the embedded instance is one, so nothing of the job listens beyond loopback.
        wanted["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    kept = {name: value for name, value in wanted.items() if name not in os.environ}
    # A fresh token per job, whatever the user set to join their clusters: another user of
    # this machine cannot join the instance, and Ray reads no token file in the home folder,
    # nor writes one there (with RAY_AUTH_MODE=token and no token given, it did).
    return {**kept, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


_variables_set: dict[str, str | None] = {}
"""The variables ``prepare_embedded`` (and ``plain_lines_off_a_terminal``) set in this
process's environment, each with its value before (None: unset), which ``restore_environment``
puts back: a ``ray start`` run later from this process must not inherit the single-machine
mode, nor a script the embedded instance's token."""


def _set_variable(name: str, value: str) -> None:
    _variables_set.setdefault(name, os.environ.get(name))
    os.environ[name] = value


def prepare_embedded() -> ModuleType:
    """Sets what the embedded instance needs in the environment, then imports Ray.

    Raises:
        ConfigFieldError: Ray is not installed.
    """
    for name, value in _embedded_environment().items():
        _set_variable(name, value)
    try:
        return import_ray()
    except ConfigFieldError:
        restore_environment()
        raise


def plain_lines_off_a_terminal() -> None:
    """Off a terminal (a log file, CI), the actors' lines Ray prints here come as the local
    launcher's processes print theirs: each line whole (Ray's deduplication prints one of a
    kind with "[repeated 29x across cluster]", the workers' lines merged, and a colour code
    around it) and no colour codes in their ``(NodeHost pid=...)`` prefixes. Set before Ray is
    imported (it reads ``RAY_DEDUP_LOGS`` then: the address check imports it); a value of the
    user's is kept."""
    if is_terminal(sys.stderr):
        return
    for name in ("RAY_COLOR_PREFIX", "RAY_DEDUP_LOGS"):
        if name not in os.environ:
            _set_variable(name, "0")


def restore_environment() -> None:
    """Puts back what ``prepare_embedded`` set as it was."""
    for name, before in _variables_set.items():
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
    _variables_set.clear()


_INIT_OPTIONS: dict[str, Any] = {"logging_level": logging.ERROR, "configure_logging": False}


@contextlib.contextmanager
def _launchers_sigterm_handler_kept(ray: ModuleType) -> Iterator[None]:
    """``ray.init`` with the SIGTERM handler in place before it in force throughout, and after:
    Ray's own exits the process where it stands (``sys.exit``), half-way through starting the
    embedded instance, say, whose processes then run on with no one to stop them."""
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    setter = getattr(utils, "set_sigterm_handler", None)
    handler = signal.getsignal(signal.SIGTERM)
    if setter is not None:
        utils.set_sigterm_handler = lambda _handler: None
    try:
        yield
    finally:
        if setter is not None:
            utils.set_sigterm_handler = setter
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


class RaySession:
    """Ray, joined or started for one job; ``close`` leaves it as found.

    Args:
        config: the job (``cluster.ray_address``: join it; empty: start the embedded instance).
            A process connected to Ray already (a script that called ``ray.init``) keeps its
            connection: the job runs there.
        num_cpus: logical CPUs the job's processes ask for (the embedded instance has at least
            these, so it runs every process on this machine, as the local launcher does).

    Joining waits as long as Ray's client retries the head (20 tries, from a second each to
    about 40 s for a head that stops answering): ``check_address`` found it answering just
    before. Ctrl-C or SIGTERM while the embedded instance starts is acted on once it has
    started: then it is shut down and its folder removed (as after any failure to start).

    Raises:
        ClusterError: the cluster at the address cannot be joined (``field``:
            ``cluster.ray_address``), or Ray cannot start.
    """

    def __init__(self, config: JobConfig, num_cpus: int) -> None:
        self.temp_dir: str | None = None
        address = config.cluster.ray_address
        plain_lines_off_a_terminal()
        ray = import_ray() if address else prepare_embedded()
        self.connected_here = not ray.is_initialized()
        if not self.connected_here:
            self.address: str = ray.get_runtime_context().gcs_address
            return
        try:
            context = self._join(ray, address) if address else self._start(ray, num_cpus)
        except BaseException as e:
            self.close(keep_logs=False)
            if not isinstance(e, (ConnectionError, RuntimeError, ValueError, TimeoutError)):
                raise  # Ctrl-C, SIGTERM
            if address:
                raise ClusterError(
                    f"cannot join Ray at {address}: {e}", field="cluster.ray_address"
                ) from e
            raise ClusterError(f"cannot start Ray on this machine: {e}") from e
        self.address = context.address_info["gcs_address"]

    def _join(self, ray: ModuleType, address: str) -> Any:
        with _launchers_sigterm_handler_kept(ray):
            return ray.init(address=address, **_INIT_OPTIONS)

    def _start(self, ray: ModuleType, num_cpus: int) -> Any:
        self.temp_dir = tempfile.mkdtemp(prefix="distbelief-ray-")
        options = _INIT_OPTIONS | {
            "num_cpus": max(os.cpu_count() or 1, num_cpus),
            "object_store_memory": OBJECT_STORE_BYTES,
            "include_dashboard": False,
            "_temp_dir": self.temp_dir,
        }
        # The instance's processes (GCS, raylet, ...) outside the launcher's group: a SIGTERM
        # to that group reaches the launcher, which stops the job and then Ray.
        with (
            signals_deferred(),
            _launchers_sigterm_handler_kept(ray),
            in_a_process_group_of_their_own(),
        ):
            # "local": a new instance, whatever RAY_ADDRESS says.
            return ray.init(address="local", **options)

    def close(self, *, keep_logs: bool) -> None:
        """Leaves Ray (what it still prints of the actors' output ends here): the embedded
        instance shuts down, and its folder is removed (kept, and named in the log, when
        ``keep_logs``: the job failed)."""
        if self.connected_here:
            import ray

            with contextlib.suppress(Exception):  # already half gone after Ctrl-C, say
                ray.shutdown()
            self.connected_here = False
        restore_environment()
        if self.temp_dir is not None:
            if keep_logs:
                logger.warning("Ray's logs of this job: %s", self.temp_dir)
            else:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
