"""Pipeline benchmark: a 2-stage model-parallel replica's throughput with M micro-batches
against M = 1, each stage's memory against the whole model's, and its wire bytes per sample.

Both stages run in their own spawned process (one torch thread each), linked by ``wire_links``
on 127.0.0.1 with an auth key, on the same pre-generated batches. A step is zero_grad,
``PipelineStage.run_batch`` and a local ``torch.optim.SGD`` step on the stage's parameters (no
parameter server: only the pipeline is measured). The same two processes run every
configuration, switched by a control pipe, in interleaved repeats (the order reverses every
other repeat), so the printed ratios (median of per-repeat ratios) are robust to a noisy
machine where absolute numbers are not. Two baselines are timed in the same repeats: the whole
model trained in this process (one thread, with 1 and with M micro-batches), which separates
what the overlap of the stages gains from what cutting a batch into micro-batches costs on a
CPU; and both stage processes computing their partitions side by side with no links at all
("unlinked"), which shows how much of two cores the machine gives two processes at the time.

Targets: samples/s with M = 8 over M = 1 >= 1.4 (two equal stages with fill-drain ideally
reach 2M/(M+1) = 1.78); the larger stage's parameter and optimizer-state bytes <= 0.6 of the
whole model's; stage 0's activation bytes per sample exactly 2x the boundary activation
(forward and backward).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import itertools
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import machine
from distbelief.files import write_text_atomic
from distbelief.models import build_model
from distbelief.pipeline.engine import PipelineStage
from distbelief.pipeline.layers import build_on_meta, build_stage, pipeline_layers
from distbelief.pipeline.memory import model_state_bytes, stage_state_bytes
from distbelief.pipeline.schedule import SCHEDULES
from distbelief.pipeline.split import StageSplit, measure_layer_costs, split_model
from distbelief.pipeline.wire_links import wire_links
from distbelief.wire.security import WireSecurity, generate_key

MODELS = ("wide-mlp", "wide-cnn")
"""wide-mlp: memory-bound at small micro-batches on a CPU (its big matrix products shrink to 16
rows); wide-cnn: compute-bound, its convolutions as fast per sample at any batch size."""
INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
NUM_STAGES = 2
NUM_BATCHES = 4
"""Pre-generated batches, cycled through by every configuration."""
LR = 0.01
SEED = 0
TARGET_THROUGHPUT = 1.4
TARGET_MEMORY = 0.6
TARGET_BYTES = 2.0
STAGE_TIMEOUT_S = 60.0
"""Longest a stage waits for its neighbour's activation or gradient."""
START_TIMEOUT_S = 120.0
"""Longest a stage process may take to import torch, build its partition and connect."""
STEP_TIMEOUT_S = 30.0
"""Allowance per step for a run command's answer (on top of STAGE_TIMEOUT_S)."""
STOP_TIMEOUT_S = 10.0
IDLE_POLL_S = 0.2
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def whole_builder(model_name: str):
    """Builds the whole model (unseeded: callers seed); a partial, so spawn can pickle it."""
    return functools.partial(build_model, model_name, INPUT_SHAPE, NUM_CLASSES)


def make_batches(batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same synthetic batches in every process (generated before any timing)."""
    generator = torch.Generator().manual_seed(SEED)
    return [
        (
            torch.randn(batch_size, *INPUT_SHAPE, generator=generator),
            torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator),
        )
        for _ in range(NUM_BATCHES)
    ]


UNLINKED = "unlinked"
"""Not a schedule: both stage processes compute their partitions side by side, each on its own
inputs, with no links; what two processes get out of the machine at that moment."""


@dataclass(frozen=True, slots=True)
class Config:
    """One timed configuration: the stage processes (a schedule, or unlinked) or the whole
    model in this process."""

    name: str
    micro_batches: int
    schedule: str | None = None
    """None: the whole model in this process (the one-process baseline)."""

    @property
    def in_stages(self) -> bool:
        return self.schedule is not None

    @property
    def is_pipeline(self) -> bool:
        return self.schedule not in (None, UNLINKED)


def make_configs(micro_batches: int, schedules: list[str]) -> list[Config]:
    configs = [Config("pipeline M=1", 1, "1f1b")]  # with one micro-batch both schedules agree
    configs += [Config(f"pipeline {s} M={micro_batches}", micro_batches, s) for s in schedules]
    configs += [
        Config("stages unlinked M=1", 1, UNLINKED),
        Config("one process M=1", 1),
        Config(f"one process M={micro_batches}", micro_batches),
    ]
    return configs


# ---------------------------------------------------------------- the stage processes


def _next_command(control):
    parent = mp.parent_process()
    while not control.poll(IDLE_POLL_S):
        if parent is not None and not parent.is_alive():
            return ("stop",)
    return control.recv()


def _connect_links(control, stage: int, auth_key: bytes):
    security = WireSecurity(auth_key=auth_key)
    if stage == NUM_STAGES - 1:
        links = wire_links(
            stage,
            NUM_STAGES,
            bind="tcp://127.0.0.1:0",
            next_address=None,
            security=security,
            timeout_s=STAGE_TIMEOUT_S,
        )
        control.send(("ready", links.address))
        return links
    command = _next_command(control)
    if command[0] != "connect":
        raise RuntimeError(f"stage {stage} expected the next stage's address, got {command!r}")
    links = wire_links(
        stage,
        NUM_STAGES,
        bind=None,
        next_address=command[1],
        security=security,
        timeout_s=STAGE_TIMEOUT_S,
    )
    try:
        links.wait_for_peer(STAGE_TIMEOUT_S)
    except BaseException:
        links.close()
        raise
    control.send(("ready", None))
    return links


def _run_steps(engine, optimizer, batches, stage: int, first_step: int, num_steps: int) -> dict:
    totals = {"compute_s": 0.0, "wait_s": 0.0, "bytes_sent": 0, "bytes_received": 0}
    loss_sum = 0.0
    cpu_start_s = time.process_time()  # every thread of the process, the wire's included
    start_s = time.perf_counter()
    for index in range(num_steps):
        step = first_step + index
        images, labels = batches[step % len(batches)]
        optimizer.zero_grad()
        figures = engine.run_batch(
            step,
            images if stage == 0 else None,
            labels if stage == NUM_STAGES - 1 else None,
            len(labels),
        )
        optimizer.step()
        for key in totals:
            totals[key] += getattr(figures, key)
        loss_sum += figures.loss_sum or 0.0
    wall_s = time.perf_counter() - start_s
    return {
        **totals,
        "wall_s": wall_s,
        "cpu_s": time.process_time() - cpu_start_s,
        "loss_sum": loss_sum,
    }


def _run_unlinked(module, optimizer, batches, stage: int, x, first_step: int, num_steps: int):
    """The partition's forward and backward passes on a fixed input, with no links."""
    cpu_start_s = time.process_time()
    start_s = time.perf_counter()
    for index in range(num_steps):
        images, labels = batches[(first_step + index) % len(batches)]
        optimizer.zero_grad()
        out = module(images if stage == 0 else x.detach().requires_grad_())
        if stage == NUM_STAGES - 1:
            F.cross_entropy(out, labels).backward()
        else:
            out.backward(torch.ones_like(out))
        optimizer.step()
    wall_s = time.perf_counter() - start_s
    return {
        "compute_s": wall_s,
        "wait_s": 0.0,
        "bytes_sent": 0,
        "bytes_received": 0,
        "wall_s": wall_s,
        "cpu_s": time.process_time() - cpu_start_s,
        "loss_sum": 0.0,
    }


def _stage_main(
    control, model_name: str, stage: int, bounds: tuple[int, ...], batch_size: int, input_shape, key
) -> None:
    torch.set_num_threads(1)
    links = None
    try:
        _, module = build_stage(whole_builder(model_name), bounds, stage, seed=SEED)
        optimizer = torch.optim.SGD(module.parameters(), lr=LR)
        batches = make_batches(batch_size)
        generator = torch.Generator().manual_seed(SEED + 2 + stage)
        unlinked_input = torch.randn(batch_size, *input_shape, generator=generator)
        links = _connect_links(control, stage, key)
        engines: dict[tuple[str, int], PipelineStage] = {}
        while (command := _next_command(control))[0] == "run":
            _, schedule, micro_batches, first_step, num_steps = command
            if schedule == UNLINKED:
                figures = _run_unlinked(
                    module, optimizer, batches, stage, unlinked_input, first_step, num_steps
                )
                control.send(("done", figures))
                continue
            if (schedule, micro_batches) not in engines:
                engines[schedule, micro_batches] = PipelineStage(
                    module,
                    stage,
                    NUM_STAGES,
                    links,
                    num_micro_batches=micro_batches,
                    schedule=schedule,
                    timeout_s=STAGE_TIMEOUT_S,
                )
            engine = engines[schedule, micro_batches]
            figures = _run_steps(engine, optimizer, batches, stage, first_step, num_steps)
            control.send(("done", figures))
    except KeyboardInterrupt:
        pass
    except BaseException:
        with contextlib.suppress(OSError, ValueError):
            control.send(("error", traceback.format_exc()))
    finally:
        if links is not None:
            links.close()


class StagePool:
    """The two stage processes, connected and ready; a context manager that stops them."""

    def __init__(
        self, model_name: str, bounds: tuple[int, ...], batch_size: int, boundary_shape
    ) -> None:
        context = mp.get_context("spawn")
        key = generate_key()
        input_shapes = [INPUT_SHAPE] + [tuple(boundary_shape)] * (NUM_STAGES - 1)
        self._controls = []
        self._processes = []
        for stage in range(NUM_STAGES):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_stage_main,
                args=(child_end, model_name, stage, bounds, batch_size, input_shapes[stage], key),
                name=f"stage{stage}",
                daemon=True,
            )
            self._controls.append(parent_end)
            self._processes.append(process)
        try:
            for process in self._processes:
                process.start()
            # The last stage serves first; each stage before it connects to the next one.
            address = self._answer(NUM_STAGES - 1, START_TIMEOUT_S)
            for stage in range(NUM_STAGES - 2, -1, -1):
                self._controls[stage].send(("connect", address))
                address = self._answer(stage, START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def _answer(self, stage: int, timeout_s: float):
        control, process = self._controls[stage], self._processes[stage]
        deadline = time.monotonic() + timeout_s
        while not control.poll(IDLE_POLL_S):
            if not process.is_alive():
                raise RuntimeError(f"stage {stage} exited (code {process.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"stage {stage} did not answer within {timeout_s:g}s")
        kind, payload = control.recv()
        if kind == "error":
            raise RuntimeError(f"stage {stage} failed:\n{payload}")
        return payload

    def run(self, config: Config, first_step: int, num_steps: int) -> list[dict]:
        """Each stage's figures for ``num_steps`` steps of ``config`` from ``first_step``."""
        command = ("run", config.schedule, config.micro_batches, first_step, num_steps)
        for control in self._controls:
            control.send(command)
        timeout_s = STAGE_TIMEOUT_S + STEP_TIMEOUT_S * num_steps
        return [self._answer(stage, timeout_s) for stage in range(NUM_STAGES)]

    def close(self) -> None:
        for control, process in zip(self._controls, self._processes, strict=True):
            if process.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    control.send(("stop",))
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self._processes:
            if process.pid is None:
                continue  # never started
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join(STOP_TIMEOUT_S)
        for control in self._controls:
            control.close()

    def __enter__(self) -> StagePool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------- the one-process baseline


class WholeModel:
    """The unsplit model and its SGD in this process, run with M micro-batches per batch."""

    def __init__(self, model_name: str, batches) -> None:
        torch.manual_seed(SEED)
        self.model = whole_builder(model_name)()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.batches = batches

    def run(self, micro_batches: int, first_step: int, num_steps: int) -> dict:
        """Wall and CPU seconds of ``num_steps`` steps."""
        cpu_start_s = time.process_time()
        start_s = time.perf_counter()
        for index in range(num_steps):
            images, labels = self.batches[(first_step + index) % len(self.batches)]
            self.optimizer.zero_grad()
            pieces = zip(
                torch.tensor_split(images, micro_batches),
                torch.tensor_split(labels, micro_batches),
                strict=True,
            )
            for x, y in pieces:
                loss = F.cross_entropy(self.model(x), y, reduction="sum") / len(labels)
                loss.backward()
            self.optimizer.step()
        wall_s = time.perf_counter() - start_s
        return {"wall_s": wall_s, "cpu_s": time.process_time() - cpu_start_s}


# ---------------------------------------------------------------- static figures


def choose_split(model_name: str, batch_size: int) -> StageSplit:
    """The 2-stage split: wide-mlp's balances parameter bytes, the same in every run (for this
    MLP that also balances compute: the first layer computes no input gradient, so it costs 2/3
    of a layer of its size; ``time_shares`` checks it by measurement); wide-cnn's balances
    measured time, as ``train`` splits (a convolution's cost is not in its bytes)."""
    build = whole_builder(model_name)
    if model_name == "wide-mlp":
        return split_model(build, NUM_STAGES, seed=SEED)
    generator = torch.Generator().manual_seed(SEED + 1)
    sample = torch.randn(batch_size, *INPUT_SHAPE, generator=generator)
    return split_model(build, NUM_STAGES, seed=SEED, sample_input=sample)


def time_shares(
    model_name: str, split: StageSplit, micro_batches: int, batch_size: int
) -> list[float]:
    """Each partition's share of the measured forward+backward time of one micro-batch."""
    generator = torch.Generator().manual_seed(SEED + 1)
    sample = torch.randn(max(1, batch_size // micro_batches), *INPUT_SHAPE, generator=generator)
    costs = measure_layer_costs(whole_builder(model_name), sample, seed=SEED, repeats=5)
    stage_costs = [sum(costs[start:stop]) for start, stop in itertools.pairwise(split.bounds)]
    return [cost / sum(stage_costs) for cost in stage_costs]


def static_figures(model_name: str, split: StageSplit) -> dict:
    """Names, memory and boundary size, all from a meta-device build (no storage)."""
    model = build_on_meta(whole_builder(model_name), seed=SEED)
    layers = pipeline_layers(model)
    stage_bytes = [
        stage_state_bytes(p for _, layer in layers[start:stop] for p in layer.parameters())
        for start, stop in itertools.pairwise(split.bounds)
    ]
    whole_bytes = model_state_bytes(model.parameters())
    x = torch.empty(1, *INPUT_SHAPE, device="meta")
    for _, layer in layers[: split.bounds[1]]:
        x = layer(x)
    return {
        "layer_names": [name for name, _ in layers],
        "stage_state_bytes": stage_bytes,
        "model_state_bytes": whole_bytes,
        "memory_ratio": max(stage_bytes) / whole_bytes,
        "boundary_shape": list(x.shape[1:]),
        "boundary_bytes_per_sample": x.numel() * x.element_size(),
    }


# ---------------------------------------------------------------- measurement


def measure(configs: list[Config], args: argparse.Namespace, bounds, static: dict) -> list[dict]:
    """One row per configuration with every repeat's figures."""
    whole = WholeModel(args.model, make_batches(args.batch_size))
    repeats: dict[str, list[dict]] = {c.name: [] for c in configs}
    step = 1
    with StagePool(args.model, bounds, args.batch_size, static["boundary_shape"]) as pool:

        def run(config: Config, num_steps: int) -> dict:
            nonlocal step
            first_step, step = step, step + num_steps
            if not config.in_stages:
                return whole.run(config.micro_batches, first_step, num_steps)
            stages = pool.run(config, first_step, num_steps)
            return {"wall_s": max(s["wall_s"] for s in stages), "stages": stages}

        for config in configs:
            run(config, args.warmup_steps)
        for repeat in range(args.repeats):
            order = configs if repeat % 2 == 0 else list(reversed(configs))
            for config in order:
                figures = run(config, args.steps)
                figures["samples_per_s"] = args.steps * args.batch_size / figures["wall_s"]
                repeats[config.name].append(figures)
            print(
                f"repeat {repeat + 1}/{args.repeats}: "
                + ", ".join(f"{c.name} {repeats[c.name][-1]['samples_per_s']:.0f}" for c in configs)
                + f" samples/s (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    return [{"config": c, "repeats": repeats[c.name]} for c in configs]


def _ratio(rows: dict, numerator: str, denominator: str) -> float:
    """Median over repeats of each repeat's samples/s ratio."""
    pairs = zip(rows[numerator]["repeats"], rows[denominator]["repeats"], strict=True)
    return statistics.median(a["samples_per_s"] / b["samples_per_s"] for a, b in pairs)


def verdict(value: float, target: float, *, at_most: bool = False) -> str:
    """PASS, or the side of the target the value missed on: a missed floor (>=) reads BELOW,
    a missed ceiling (<=) ABOVE, as compression.py words it (a memory share over its
    ceiling printed BELOW, the opposite of what happened)."""
    if at_most:
        return "PASS" if value <= target else "ABOVE"
    return "PASS" if value >= target else "BELOW"


def summarize(measured: list[dict], args: argparse.Namespace, static: dict) -> dict:
    rows = {}
    for item in measured:
        config, repeats = item["config"], item["repeats"]
        row = {
            "config": config.name,
            "schedule": config.schedule,
            "micro_batches": config.micro_batches,
            "samples_per_s": statistics.median(r["samples_per_s"] for r in repeats),
            "samples_per_s_all": [r["samples_per_s"] for r in repeats],
        }
        if not config.in_stages:
            row["cpu_share"] = statistics.median(r["cpu_s"] / r["wall_s"] for r in repeats)
        else:
            per_stage = []
            for stage in range(NUM_STAGES):
                mine = [r["stages"][stage] for r in repeats]
                per_stage.append(
                    {
                        "stage": stage,
                        "idle_fraction": statistics.median(s["wait_s"] / s["wall_s"] for s in mine),
                        "compute_fraction": statistics.median(
                            s["compute_s"] / s["wall_s"] for s in mine
                        ),
                        "compute_s_per_step": statistics.median(s["compute_s"] for s in mine)
                        / args.steps,
                        "cpu_share": statistics.median(s["cpu_s"] / s["wall_s"] for s in mine),
                        "activation_bytes_per_step": statistics.median(
                            (s["bytes_sent"] + s["bytes_received"]) / args.steps for s in mine
                        ),
                    }
                )
            row["stages"] = per_stage
            if config.is_pipeline:
                row["bytes_ratio"] = (
                    per_stage[0]["activation_bytes_per_step"]
                    / args.batch_size
                    / static["boundary_bytes_per_sample"]
                )
        row["repeats"] = repeats
        rows[config.name] = row

    m = args.micro_batches
    target_name = f"pipeline 1f1b M={m}"
    throughput = _ratio(rows, target_name, "pipeline M=1")
    compute = [s["compute_s_per_step"] for s in rows[target_name]["stages"]]
    largest_share = max(compute) / sum(compute)
    micro_cost = _ratio(rows, f"one process M={m}", "one process M=1")
    bytes_ratios = [r["bytes_ratio"] for r in rows.values() if "bytes_ratio" in r]
    return {
        "rows": list(rows.values()),
        "throughput_ratio": throughput,
        "throughput_verdict": verdict(throughput, TARGET_THROUGHPUT),
        "gpipe_ratio": (
            _ratio(rows, f"pipeline gpipe M={m}", "pipeline M=1")
            if f"pipeline gpipe M={m}" in rows
            else None
        ),
        "ideal_equal_stages": 2 * m / (m + 1),
        "parallel_capacity": _ratio(rows, "stages unlinked M=1", "one process M=1"),
        "parallel_capacity_ideal": 1 / largest_share,
        "pipeline_vs_one_process_m1": _ratio(rows, "pipeline M=1", "one process M=1"),
        "pipeline_vs_one_process_m": _ratio(rows, target_name, f"one process M={m}"),
        "one_process_m_vs_m1": micro_cost,
        "largest_stage_compute_share": largest_share,
        "overlap_bound": m / ((m + 1) * largest_share),
        "memory_ratio": static["memory_ratio"],
        "memory_verdict": verdict(static["memory_ratio"], TARGET_MEMORY, at_most=True),
        "bytes_ratio": bytes_ratios[0],
        "bytes_ratios_all_configs": bytes_ratios,
        "bytes_verdict": (
            # An exact target: a miss on either side is off it.
            "PASS" if all(abs(r - TARGET_BYTES) < 1e-9 for r in bytes_ratios) else "OFF"
        ),
    }


# ---------------------------------------------------------------- reporting


def print_report(summary: dict, static: dict, args: argparse.Namespace) -> None:
    m = args.micro_batches
    print(
        f"\n{'config':>22} {'samples/s':>10} {'idle s0':>8} {'idle s1':>8} "
        f"{'cpu s0':>7} {'cpu s1':>7}"
    )
    for row in summary["rows"]:
        stages = row.get("stages")
        cells = ["", "", f"{row['cpu_share']:.2f}" if "cpu_share" in row else "", ""]
        if stages:
            cells = [f"{s['idle_fraction']:.2f}" for s in stages] + [
                f"{s['cpu_share']:.2f}" for s in stages
            ]
        print(
            f"{row['config']:>22} {row['samples_per_s']:>10.1f} {cells[0]:>8} {cells[1]:>8} "
            f"{cells[2]:>7} {cells[3]:>7}"
        )
    print("(idle: wait_s / wall; cpu: CPU s per wall s of the stage's process, or of this one)")
    print(
        f"\nthroughput 1f1b M={m} / M=1: {summary['throughput_ratio']:.2f} "
        f"(target >= {TARGET_THROUGHPUT}; ideal for equal stages "
        f"{summary['ideal_equal_stages']:.2f}) {summary['throughput_verdict']}"
    )
    if summary["gpipe_ratio"] is not None:
        print(f"throughput gpipe M={m} / M=1: {summary['gpipe_ratio']:.2f}")
    print(
        f"  one process M={m} / M=1: {summary['one_process_m_vs_m1']:.2f} (micro-batching cost); "
        f"pipeline / one process: M=1 {summary['pipeline_vs_one_process_m1']:.2f}, "
        f"M={m} {summary['pipeline_vs_one_process_m']:.2f} (overlap bound "
        f"{summary['overlap_bound']:.2f}: largest stage "
        f"{summary['largest_stage_compute_share']:.2f} of the compute)"
    )
    print(
        f"  stages unlinked / one process (M=1): {summary['parallel_capacity']:.2f} (ideal "
        f"{summary['parallel_capacity_ideal']:.2f}): what two processes got out of the machine"
    )
    whole = static["model_state_bytes"]
    shares = ", ".join(f"{b / whole:.3f}" for b in static["stage_state_bytes"])
    print(
        f"memory: larger stage / whole model {summary['memory_ratio']:.3f} (stages {shares}; "
        f"whole {whole / 2**20:.1f} MiB; target <= {TARGET_MEMORY}) {summary['memory_verdict']}"
    )
    print(
        f"bytes: stage 0 activation bytes per sample / boundary "
        f"({static['boundary_bytes_per_sample']} B, shape {static['boundary_shape']}) "
        f"{summary['bytes_ratio']:.2f} (target exactly {TARGET_BYTES:.2f}) "
        f"{summary['bytes_verdict']}"
    )


def save_results(path: Path, args, split: StageSplit, static: dict, summary: dict) -> None:
    record = {
        "benchmark": "pipeline",
        **machine.environment(),
        "model": args.model,
        "input_shape": list(INPUT_SHAPE),
        "num_stages": NUM_STAGES,
        "torch_threads_per_process": 1,
        "batch_size": args.batch_size,
        "micro_batches": args.micro_batches,
        "schedules": args.schedules,
        "steps_per_repeat": args.steps,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "split": {
            "bounds": list(split.bounds),
            "basis": split.basis,
            "layer_costs": list(split.layer_costs),
            "imbalance": split.imbalance,
            "description": split.describe(static["layer_names"]),
        },
        **{k: v for k, v in static.items() if k != "layer_names"},
        **summary,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    print(f"wrote {path} (load average {record['load_average_1_5_15_min']})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per config")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per config")
    parser.add_argument("--model", choices=MODELS, default=MODELS[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--micro-batches", type=int, default=8, help="M compared with M = 1")
    parser.add_argument("--schedules", default="1f1b,gpipe", help="comma-separated, 1f1b first")
    parser.add_argument(
        "--out", type=machine.out_path, default=None, help="JSON path ('-': do not write)"
    )
    args = parser.parse_args(argv)
    args.schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    if not args.schedules or args.schedules[0] != "1f1b":
        parser.error(f"--schedules must start with 1f1b, got {args.schedules}")
    unknown = [s for s in args.schedules if s not in SCHEDULES]
    if unknown:
        parser.error(f"unknown schedules {unknown}; choose from {list(SCHEDULES)}")
    for name in ("steps", "repeats", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be >= 0")
    if not 2 <= args.micro_batches <= args.batch_size:
        parser.error(f"--micro-batches must be in 2..batch size, got {args.micro_batches}")
    return args


def _default_out(model_name: str) -> Path:
    day = datetime.date.today().strftime("%Y%m%d")
    return RESULTS_DIR / f"pipeline_{model_name}_cpu{os.cpu_count()}_{day}.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    split = choose_split(args.model, args.batch_size)
    static = static_figures(args.model, split)
    static["measured_time_shares"] = time_shares(
        args.model, split, args.micro_batches, args.batch_size
    )
    described = split.describe(static["layer_names"])
    shares = " | ".join(f"{share:.0%}" for share in static["measured_time_shares"])
    print(
        f"{args.model} on {INPUT_SHAPE}, batch {args.batch_size}: {described}; measured time of "
        f"one micro-batch of {args.batch_size // args.micro_batches}: {shares}"
    )
    configs = make_configs(args.micro_batches, args.schedules)
    measured = measure(configs, args, split.bounds, static)
    summary = summarize(measured, args, static)
    print_report(summary, static, args)
    out = args.out if args.out is not None else _default_out(args.model)
    if str(out) != "-":
        save_results(out, args, split, static, summary)
    return 0


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
