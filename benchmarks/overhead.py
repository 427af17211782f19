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
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import machine
from distbelief.config import CLICK_MODELS, MODEL_NAMES
from distbelief.files import write_text_atomic
from distbelief.models import build_model
from distbelief.optim import DownpourSGD
from server_host import ServerHost, start_sgd_shard

INPUT_SHAPE = (1, 32, 32)
NUM_CLASSES = 10
BATCH_SIZE = 32
NUM_BATCHES = 16
LR = 0.01
SEED = 0
TARGET_RATIO_N1 = 0.85
REQUEST_TIMEOUT_S = 30.0
RESULTS_DIR = Path(__file__).resolve().parent / "results"

NO_RETRY_S = 0.0
"""A benchmark fails fast: retrying a dead shard would hang Ctrl-C and distort timings."""


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
            blocking=config.wait_in_step,
            retry_timeout_s=NO_RETRY_S,
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
    with (
        ServerHost(start_sgd_shard, LR, name="shard-host") as host,
        contextlib.ExitStack() as trainers_open,
    ):
        address = host.start_server()
        trainers = {}
        for config in CONFIGS:
            trainers[config.name] = Trainer(model_name, config, address)
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
        **machine.environment(),
        "torch_threads_per_process": 1,
        "batch_size": BATCH_SIZE,
        "input_shape": list(INPUT_SHAPE),
        "steps_per_repeat": args.steps,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    print(f"wrote {path} (load average {record['load_average_1_5_15_min']})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per config")
    parser.add_argument("--models", default=None, help="comma-separated: lenet,mlp")
    parser.add_argument("--quick", action="store_true", help="a few seconds (smoke test)")
    parser.add_argument(
        "--out", type=machine.out_path, default=None, help="JSON path ('-': do not write)"
    )
    args = parser.parse_args(argv)
    defaults = {"steps": 10, "repeats": 2, "models": "lenet"} if args.quick else {}
    defaults = {"steps": 20, "repeats": 31, "models": "lenet,mlp", **defaults}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 5 or args.steps % 5:
        parser.error(f"--steps must be a positive multiple of 5 (the n=5 period), got {args.steps}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    typed = args.models
    args.models = [name.strip() for name in typed.split(",") if name.strip()]
    image_models = [name for name in MODEL_NAMES if name not in CLICK_MODELS]
    unknown = [name for name in args.models if name not in image_models]
    if unknown or not args.models:
        named = unknown[0] if unknown else typed  # a list that names no model
        parser.error(f"--models: {named!r}: choose from {', '.join(image_models)}")
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
    sys.exit(machine.run_main(main))
