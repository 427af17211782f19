"""GPU benchmark: training steps/s of DownpourSGD with its model on a CUDA device against local
torch.optim.SGD on the same device, at n_push = n_pull = 5, for LeNet and AlexNet.

The shard runs in a spawned process on 127.0.0.1 (on the CPU, as shards do); the worker trains
in this process, its gradients accrued on the device and copied to pinned memory on a side
stream. Every configuration uses the same model, the same batches (made once, on the device)
and is timed in interleaved repeats; the printed ratio is the median of the per-repeat ratios
(Downpour steps/s / local steps/s). Without a CUDA device it says so and exits 0; ``--device
cpu`` runs the same measurement on the CPU (a check of the script where there is no GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import machine
from distbelief.config import CLICK_MODELS, MODEL_NAMES
from distbelief.models import build_model
from distbelief.optim import DownpourSGD
from server_host import ServerHost, start_sgd_shard

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
LR = 0.01
SEED = 0
EVERY_STEPS = 5
TARGET_RATIO = 0.8
REQUEST_TIMEOUT_S = 60.0
NO_RETRY_S = 0.0
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """Local SGD, or DownpourSGD at n = 5 with a wire encoding."""

    name: str
    downpour: bool = True
    wire_dtype: str = "fp32"
    push_compression: str = "none"


CONFIGS = (
    RunConfig(name="local", downpour=False),
    RunConfig(name="downpour n=5"),
    RunConfig(name="downpour n=5 bf16", wire_dtype="bf16"),
    RunConfig(name="downpour n=5 topk1%+bf16", wire_dtype="bf16", push_compression="topk:0.01"),
)


class Trainer:
    """A model on the device and its optimizer for one configuration."""

    def __init__(self, model_name: str, config: RunConfig, address: str, device) -> None:
        torch.manual_seed(SEED)
        self.device = device
        self.model = build_model(model_name, INPUT_SHAPE, NUM_CLASSES).to(device)
        self._step = 0
        if not config.downpour:
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(self.model.parameters(), LR)
            return
        self.optimizer = DownpourSGD(
            self.model.parameters(),
            lr=LR,
            n_push=EVERY_STEPS,
            n_pull=EVERY_STEPS,
            model=self.model,
            ps=[address],
            timeout_s=REQUEST_TIMEOUT_S,
            retry_timeout_s=NO_RETRY_S,
            wire_dtype=config.wire_dtype,
            push_compression=config.push_compression,
        )

    def run(self, batches: list, num_steps: int) -> float:
        """Train ``num_steps`` steps; steps/s, counting the wait for the device (pushes still in
        flight at the end are counted in the next repeat: steady-state throughput, without
        flushing a compressed run's residual each time)."""
        _synchronize(self.device)
        start_s = time.perf_counter()
        for _ in range(num_steps):
            images, labels = batches[self._step % len(batches)]
            self._step += 1
            self.optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(images), labels).backward()
            self.optimizer.step()
        _synchronize(self.device)
        return num_steps / (time.perf_counter() - start_s)

    def close(self) -> None:
        if isinstance(self.optimizer, DownpourSGD):
            self.optimizer.close()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(batch_size: int, device: torch.device) -> list[tuple]:
    generator = torch.Generator().manual_seed(SEED)
    return [
        (
            torch.randn(batch_size, *INPUT_SHAPE, generator=generator).to(device),
            torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator).to(device),
        )
        for _ in range(8)
    ]


def measure_model(model_name: str, args: argparse.Namespace) -> list[dict]:
    """Rows for every configuration of one model, all against one fresh shard."""
    batches = make_batches(args.batch_size, args.device)
    with (
        ServerHost(start_sgd_shard, LR, name="shard-host") as host,
        contextlib.ExitStack() as open_trainers,
    ):
        trainers = {}
        for config in CONFIGS:
            # One shard per configuration: each trains its own copy of the model.
            address = host.start_server() if config.downpour else ""
            trainers[config.name] = Trainer(model_name, config, address, args.device)
            open_trainers.callback(trainers[config.name].close)
        # Progress on stderr: on a CPU (--device cpu) AlexNet's repeats take minutes.
        print(f"gpu.py: {model_name}: warming up", file=sys.stderr, flush=True)
        for trainer in trainers.values():
            trainer.run(batches, args.warmup_steps)
        samples: dict[str, list[float]] = {name: [] for name in trainers}
        for repeat in range(args.repeats):
            print(
                f"gpu.py: {model_name}: repeat {repeat + 1} of {args.repeats}",
                file=sys.stderr,
                flush=True,
            )
            names = list(trainers) if repeat % 2 == 0 else list(reversed(trainers))
            for name in names:
                samples[name].append(trainers[name].run(batches, args.steps))
    rows = []
    for config in CONFIGS:
        ratio = statistics.median(
            s / local for s, local in zip(samples[config.name], samples["local"], strict=True)
        )
        is_target = config.downpour and config.wire_dtype == "fp32"
        rows.append(
            {
                "model": model_name,
                "config": config.name,
                "steps_per_s": statistics.median(samples[config.name]),
                "ratio_vs_local": ratio,
                "target_ratio": TARGET_RATIO if is_target else None,
                "samples_steps_per_s": samples[config.name],
            }
        )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a smoke test)")
    parser.add_argument("--models", default="lenet,alexnet", help="comma-separated")
    parser.add_argument("--batch-size", type=machine.at_least(1), default=128)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed repeat")
    parser.add_argument(
        "--repeats", type=machine.at_least(1), default=None, help="timed repeats per config"
    )
    parser.add_argument("--quick", action="store_true", help="a short run (make gpu-check)")
    parser.add_argument(
        "--out", type=machine.out_path, default=None, help="results stem ('-': do not write)"
    )
    args = parser.parse_args(argv)
    quick = {"steps": 20, "repeats": 3} if args.quick else {"steps": 50, "repeats": 11}
    for key, value in quick.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < EVERY_STEPS or args.steps % EVERY_STEPS:
        parser.error(f"--steps must be a multiple of {EVERY_STEPS}, got {args.steps}")
    typed = args.models
    args.models = [name.strip() for name in typed.split(",") if name.strip()]
    image_models = [name for name in MODEL_NAMES if name not in CLICK_MODELS]
    unknown = [name for name in args.models if name not in image_models]
    if unknown or not args.models:
        named = unknown[0] if unknown else typed  # a list that names no model
        parser.error(f"--models: {named!r}: choose from {', '.join(image_models)}")
    args.warmup_steps = 10 if args.quick else 30
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        print(f"gpu.py: --device {args.device}: {e}", file=sys.stderr)
        return 2
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu.py: no CUDA device on this machine: nothing to measure (--device cpu runs "
            "the same measurement on the CPU)"
        )
        return 0
    torch.manual_seed(SEED)
    rows = [row for name in args.models for row in measure_model(name, args)]
    where = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    print(f"{where}, batch {args.batch_size}, n_push = n_pull = {EVERY_STEPS}")
    print(f"{'model':>8} {'config':>26} {'steps/s':>9} {'ratio':>6} {'target':>7}")
    for row in rows:
        target = "" if row["target_ratio"] is None else f">={row['target_ratio']:.2f}"
        print(
            f"{row['model']:>8} {row['config']:>26} {row['steps_per_s']:>9.1f} "
            f"{row['ratio_vs_local']:>6.2f} {target:>7}"
        )
    out = args.out if args.out is not None else (None if args.quick else _default_stem(args))
    if out is not None and str(out) != "-":
        record = {"benchmark": "gpu", **machine.environment(), "device": where, "rows": rows}
        cells = [
            [r["model"], r["config"], f"{r['steps_per_s']:.1f}", f"{r['ratio_vs_local']:.2f}"]
            for r in rows
        ]
        machine.write_report(
            Path(out),
            record,
            "DownpourSGD on a GPU against local SGD",
            f"{where}; batch {args.batch_size}; n_push = n_pull = {EVERY_STEPS}; target >= "
            f"{TARGET_RATIO} for the fp32 rows.",
            ["model", "config", "steps/s", "ratio vs local"],
            cells,
        )
    return 0


def _default_stem(args: argparse.Namespace) -> str:
    day = datetime.date.today().strftime("%Y%m%d")
    return str(RESULTS_DIR / f"gpu_{args.device.type}_{day}")


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
