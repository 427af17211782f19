"""The stage engine: stages running as threads over local links leave in every partition the
gradients of the unpartitioned model, report its loss, and move exactly the boundary bytes."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from distbelief.errors import StageTimeoutError
from distbelief.models import build_model
from distbelief.pipeline.engine import PipelineStage, StageStepFigures
from distbelief.pipeline.layers import build_stage, pipeline_layers
from distbelief.pipeline.local_links import local_links
from distbelief.pipeline.split import split_model

INPUT_SHAPES = {"mlp": (1, 8, 8), "lenet": (1, 16, 16)}
BATCH_SIZE = 16
SEED = 3
JOIN_TIMEOUT_S = 60.0


def _builder(name: str):
    return lambda: build_model(name, INPUT_SHAPES[name], 10)


def _batch(name: str, batch_size: int = BATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    images = torch.randn(batch_size, *INPUT_SHAPES[name], generator=generator)
    labels = torch.randint(0, 10, (batch_size,), generator=generator)
    return images, labels


def _reference(name: str, images, labels):
    """The unpartitioned model's parameter gradients, mean loss and correct count."""
    torch.manual_seed(SEED)
    model = _builder(name)()
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    num_correct = int((logits.argmax(dim=1) == labels).sum())
    return grads, loss.item(), num_correct


def _build_stages(name: str, num_stages: int, **stage_args):
    build = _builder(name)
    bounds = split_model(build, num_stages, seed=SEED).bounds
    links = local_links(num_stages)
    stages, names = [], []
    for s in range(num_stages):
        model, stage_module = build_stage(build, bounds, s, seed=SEED)
        by_id = {id(p): n for n, p in model.named_parameters()}
        names.append({by_id[id(p)]: p for p in stage_module.parameters()})
        stages.append(PipelineStage(stage_module, s, num_stages, links[s], **stage_args))
    return stages, names, bounds


def _run_all(stages: list[PipelineStage], step, images, labels, batch_size):
    """Runs every stage's run_batch in its own thread; returns their figures in stage order."""
    results: list[StageStepFigures | BaseException | None] = [None] * len(stages)

    def run(index: int) -> None:
        stage = stages[index]
        try:
            results[index] = stage.run_batch(
                step,
                images if stage.is_first else None,
                labels if stage.is_last else None,
                batch_size,
            )
        except BaseException as error:  # handed to the test's thread
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(stages))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
        assert not thread.is_alive(), "a stage did not finish"
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _boundary_bytes(name: str, bounds, batch_size: int) -> list[int]:
    """Bytes of the activation crossing each boundary for a whole batch (float32)."""
    torch.manual_seed(SEED)
    x = torch.zeros(1, *INPUT_SHAPES[name])
    sizes = []
    with torch.no_grad():
        for index, (_, layer) in enumerate(pipeline_layers(_builder(name)())):
            x = layer(x)
            if index + 1 in bounds[1:-1]:
                sizes.append(batch_size * x.numel() * x.element_size())
    return sizes


CASES = [
    (name, num_stages, num_micro, schedule)
    for name in INPUT_SHAPES
    for num_stages in (2, 3)
    for num_micro in (1, 4)
    for schedule in ("gpipe", "1f1b")
]


@pytest.mark.parametrize(("name", "num_stages", "num_micro", "schedule"), CASES)
def test_partitions_get_the_unpartitioned_models_gradients(name, num_stages, num_micro, schedule):
    images, labels = _batch(name)
    grads, mean_loss, num_correct = _reference(name, images, labels)
    stages, names, bounds = _build_stages(
        name, num_stages, num_micro_batches=num_micro, schedule=schedule
    )
    figures = _run_all(stages, 0, images, labels, BATCH_SIZE)

    for params in names:
        for param_name, param in params.items():
            torch.testing.assert_close(param.grad, grads[param_name], rtol=0, atol=1e-6)
    last = figures[-1]
    assert last.loss_sum / BATCH_SIZE == pytest.approx(mean_loss, rel=1e-5)
    assert last.num_correct == num_correct
    assert all(f.loss_sum is None and f.num_correct is None for f in figures[:-1])
    assert all(f.num_samples == BATCH_SIZE for f in figures)
    assert all(f.compute_s > 0 and f.wait_s >= 0 for f in figures)

    # Forward: each boundary's activation once; backward: its gradient, the same size.
    crossing = _boundary_bytes(name, bounds, BATCH_SIZE)
    for s, f in enumerate(figures):
        before = crossing[s - 1] if s > 0 else 0
        after = crossing[s] if s < num_stages - 1 else 0
        assert f.bytes_sent == after + before
        assert f.bytes_received == before + after


def test_one_stage_runs_its_micro_batches_locally():
    images, labels = _batch("mlp")
    grads, mean_loss, _ = _reference("mlp", images, labels)
    (stage,), (params,), _ = _build_stages("mlp", 1, num_micro_batches=4)
    figures = stage.run_batch(0, images, labels, BATCH_SIZE)
    for param_name, param in params.items():
        torch.testing.assert_close(param.grad, grads[param_name], rtol=0, atol=1e-6)
    assert figures.loss_sum / BATCH_SIZE == pytest.approx(mean_loss, rel=1e-5)
    assert (figures.bytes_sent, figures.bytes_received) == (0, 0)


def test_batches_accumulate_gradients_and_fewer_samples_mean_fewer_micro_batches():
    images, labels = _batch("mlp", batch_size=3)
    grads, _, _ = _reference("mlp", images, labels)
    stages, names, _ = _build_stages("mlp", 2, num_micro_batches=4)
    for step in (0, 1):  # no zero_grad between: the second batch adds the same again
        _run_all(stages, step, images, labels, 3)
    for params in names:
        for param_name, param in params.items():
            torch.testing.assert_close(param.grad, 2 * grads[param_name], rtol=0, atol=1e-6)


def test_a_stage_whose_neighbour_never_sends_times_out():
    images, labels = _batch("mlp")
    stages, _, _ = _build_stages("mlp", 2, num_micro_batches=2, timeout_s=0.1)
    with pytest.raises(StageTimeoutError, match="stage 1 received no activation of step 4"):
        stages[1].run_batch(4, None, labels, BATCH_SIZE)
    with pytest.raises(StageTimeoutError, match="stage 0 received no gradient of step 4"):
        stages[0].run_batch(4, images, None, BATCH_SIZE)


def test_missing_or_mismatched_inputs_are_named():
    images, _ = _batch("mlp")
    stages, _, _ = _build_stages("mlp", 2, num_micro_batches=2)
    with pytest.raises(ValueError, match="stage 0 needs the batch's images, got None"):
        stages[0].run_batch(0, None, None, BATCH_SIZE)
    with pytest.raises(ValueError, match="stage 1 needs the batch's labels, got None"):
        stages[1].run_batch(0, None, None, BATCH_SIZE)
    with pytest.raises(ValueError, match="images hold 16 samples, but batch_size is 8"):
        stages[0].run_batch(0, images, None, 8)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        stages[0].run_batch(0, images, None, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "zigzag"}, "unknown schedule 'zigzag'"),
        ({"num_micro_batches": 0}, "num_micro_batches must be an integer >= 1, got 0"),
        ({"num_micro_batches": 2.5}, "num_micro_batches must be an integer >= 1, got 2.5"),
        ({"num_micro_batches": True}, "num_micro_batches must be an integer >= 1, got True"),
        ({"timeout_s": 0.0}, "timeout_s must be a finite number > 0"),
        ({"timeout_s": math.inf}, "timeout_s must be a finite number > 0"),
        ({"timeout_s": "5"}, "timeout_s must be a finite number > 0"),
    ],
)
def test_bad_stage_settings_are_named(kwargs, message):
    stage_module = torch.nn.Linear(2, 2)
    (links,) = local_links(1)
    settings = {"num_micro_batches": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        PipelineStage(stage_module, 0, 1, links, **settings)


@pytest.mark.parametrize("links", [None, object()])
def test_links_that_are_no_stage_links_are_refused(links):
    with pytest.raises(ValueError, match=r"links must be a StageLinks .*without send_forward"):
        PipelineStage(torch.nn.Linear(2, 2), 0, 2, links, num_micro_batches=1)
