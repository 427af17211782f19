"""Overhead benchmark: training steps/s of DownpourSGD (1 worker, 1 shard) against local SGD.

The shard runs in a spawned process on 127.0.0.1; the worker trains in this process. Every
configuration uses the same model, the same pre-generated batches and one torch thread per
process, and the configurations are timed in interleaved repeats, so the printed ratio
(Downpour steps/s / local steps/s) is robust to a noisy machine where absolute numbers are not.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distbelief.models import build_model
from distbelief.optim import DownpourSGD
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.wire import serve

INPUT_SHAPE = (1, 32, 32)
NUM_CLASSES = 10
BATCH_SIZE = 32
NUM_BATCHES = 16
LR = 0.01
SEED = 0
TARGET_RATIO_N1 = 0.85
REQUEST_TIMEOUT_S = 30.0
HOST_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
IDLE_POLL_S = 0.2
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The keyword for "wait for every push and pull inside step()" was renamed from
# ``synchronous`` to ``blocking``; use whichever this checkout has. A benchmark fails fast:
# retrying a dead shard (``retry_timeout_s``, where it exists) would hang Ctrl-C.
_DOWNPOUR_KEYWORDS = inspect.signature(DownpourSGD.__init__).parameters
WAIT_KEYWORD = "blocking" if "blocking" in _DOWNPOUR_KEYWORDS else "synchronous"
NO_RETRY = {"retry_timeout_s": 0.0} if "retry_timeout_s" in _DOWNPOUR_KEYWORDS else {}


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """One timed configuration: local SGD, or DownpourSGD with a push/pull period."""

    name: str
    every_steps: int = 0
    """n_push = n_pull (0: local torch.optim.SGD, no parameter server)."""
    wait_in_step: bool = False
    """Downpour waits for each push and pull inside step() (``synchronous=True``)."""


CONFIGS = (
    RunConfig(name="local"),
    RunConfig(name="downpour n=1", every_steps=1),
    RunConfig(name="downpour n=5", every_steps=5),
    RunConfig(name="downpour n=1 sync", every_steps=1, wait_in_step=True),
    RunConfig(name="downpour n=5 sync", every_steps=5, wait_in_step=True),
)


# ---------------------------------------------------------------- the shard process


def _wait_for_stop(control) -> None:
    parent = mp.parent_process()
    while not control.poll(IDLE_POLL_S):
        if parent is not None and not parent.is_alive():
            return
    control.recv()


def _shard_main(control, lr: float) -> None:
    """Entry point of the shard process: serve one SGD shard until told to stop."""
    torch.set_num_threads(1)
    shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=lr))
    server = serve("tcp://127.0.0.1:0", ShardService(shard))
    try:
        control.send(server.address)
        _wait_for_stop(control)
    except (KeyboardInterrupt, EOFError, OSError):
        pass
    finally:
        server.stop()


class ShardProcess:
    """One shard in a spawned process; a context manager that always ends the process."""

    def __init__(self, lr: float) -> None:
        context = mp.get_context("spawn")
        self._control, child_end = context.Pipe()
        self._process = context.Process(target=_shard_main, args=(child_end, lr), daemon=True)
        self._process.start()
        child_end.close()
        if not self._control.poll(HOST_TIMEOUT_S):
            self.close()
            raise TimeoutError(f"the shard process did not start in {HOST_TIMEOUT_S:g}s")
        self.address: str = self._control.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._control.send("stop")
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(STOP_TIMEOUT_S)
        self._control.close()

    def __enter__(self) -> ShardProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------- training


def make_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same synthetic batches for every configuration (generated once, before timing)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(BATCH_SIZE, *INPUT_SHAPE, generator=generator),
            torch.randint(0, NUM_CLASSES, (BATCH_SIZE,), generator=generator),
        )
        for _ in range(NUM_BATCHES)
    ]


class Trainer:
    """A model and its optimizer for one configuration; ``run`` trains for some steps."""

    def __init__(self, model_name: str, config: RunConfig, address: str) -> None:
        torch.manual_seed(SEED)
        self.config = config
        self.model = build_model(model_name, INPUT_SHAPE, NUM_CLASSES)
        self._step = 0
        if config.every_steps == 0:
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(self.model.parameters(), LR)
            return
        self.optimizer = DownpourSGD(
            self.model.parameters(),
            lr=LR,
            n_push=config.every_steps,
            n_pull=config.every_steps,
            model=self.model,
            ps=[address],
            timeout_s=REQUEST_TIMEOUT_S,
            **{WAIT_KEYWORD: config.wait_in_step},
            **NO_RETRY,
        )

    def run(self, batches: list, num_steps: int) -> float:
        """Train ``num_steps`` steps; returns steps/s, counting the wait for pushes in flight."""
        start_s = time.perf_counter()
        for _ in range(num_steps):
            images, labels = batches[self._step % len(batches)]
            self._step += 1
            self.optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(images), labels).backward()
            self.optimizer.step()
        if isinstance(self.optimizer, DownpourSGD):
            self.optimizer.flush()
        return num_steps / (time.perf_counter() - start_s)

    def close(self) -> None:
        if isinstance(self.optimizer, DownpourSGD):
            self.optimizer.close()


# ---------------------------------------------------------------- measurement


def _interleaved_steps_per_s(trainers: dict[str, Trainer], batches, args) -> dict[str, list]:
    for trainer in trainers.values():
        trainer.run(batches, args.warmup_steps)
    samples: dict[str, list[float]] = {name: [] for name in trainers}
    for repeat in range(args.repeats):
        names = list(trainers) if repeat % 2 == 0 else list(reversed(trainers))
        for name in names:
            samples[name].append(trainers[name].run(batches, args.steps))
    return samples


def _make_rows(model_name: str, samples: dict[str, list[float]]) -> list[dict]:
    rows = []
    for config in CONFIGS:
        steps_per_s = statistics.median(samples[config.name])
        is_target = config.every_steps == 1 and not config.wait_in_step
        # Median of per-repeat ratios: each pair ran back to back, so load drift cancels out.
        ratio = statistics.median(
            s / local for s, local in zip(samples[config.name], samples["local"], strict=True)
        )
        rows.append(
            {
                "model": model_name,
                "config": config.name,
                "n_push": config.every_steps,
                "n_pull": config.every_steps,
                "synchronous": config.wait_in_step,
                "steps_per_s": steps_per_s,
                "ratio_vs_local": ratio,
                "target_ratio": TARGET_RATIO_N1 if is_target else None,
                "verdict": ("PASS" if ratio >= TARGET_RATIO_N1 else "BELOW") if is_target else None,
                "samples_steps_per_s": samples[config.name],
            }
        )
    return rows


def measure_model(model_name: str, batches, args: argparse.Namespace) -> list[dict]:
    """Rows for every configuration of one model, all against one fresh shard."""
    with ShardProcess(LR) as shard, contextlib.ExitStack() as trainers_open:
        trainers = {}
        for config in CONFIGS:
            trainers[config.name] = Trainer(model_name, config, shard.address)
            trainers_open.callback(trainers[config.name].close)
        samples = _interleaved_steps_per_s(trainers, batches, args)
    return _make_rows(model_name, samples)


# ---------------------------------------------------------------- reporting


def print_table(rows: list[dict]) -> None:
    print(f"{'model':>6} {'config':>18} {'steps/s':>9} {'ratio':>6} {'target':>7}")
    for row in rows:
        target = "" if row["target_ratio"] is None else f">={row['target_ratio']:.2f}"
        print(
            f"{row['model']:>6} {row['config']:>18} {row['steps_per_s']:>9.1f} "
            f"{row['ratio_vs_local']:>6.2f} {target:>7} {row['verdict'] or ''}"
        )


def save_results(path: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    record = {
        "benchmark": "overhead",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "torch_threads_per_process": 1,
        "batch_size": BATCH_SIZE,
        "input_shape": list(INPUT_SHAPE),
        "steps_per_repeat": args.steps,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path} (1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per config")
    parser.add_argument("--models", default=None, help="comma-separated: lenet,mlp")
    parser.add_argument("--quick", action="store_true", help="a few seconds (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path ('-': do not write)")
    args = parser.parse_args(argv)
    defaults = {"steps": 10, "repeats": 2, "models": "lenet"} if args.quick else {}
    defaults = {"steps": 20, "repeats": 31, "models": "lenet,mlp", **defaults}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 5 or args.steps % 5:
        parser.error(f"--steps must be a multiple of 5 (the n=5 period), got {args.steps}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    args.warmup_steps = 10 if args.quick else 30
    return args


def _default_out() -> Path:
    day = datetime.date.today().strftime("%Y%m%d")
    return RESULTS_DIR / f"overhead_cpu{os.cpu_count()}_{day}.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    batches = make_batches(SEED)
    rows = [row for name in args.models for row in measure_model(name, batches, args)]
    print_table(rows)
    out = args.out if args.out is not None else (None if args.quick else _default_out())
    if out is not None and str(out) != "-":
        save_results(out, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
