"""Stages of one replica linked over the wire (127.0.0.1, with a job key): activations forward
and gradients back through a chain, reused receive buffers, exact byte counters (each step's
in that step, the same on both sides of a cut), neighbours given another plan refused on both
sides, and a typed error within its timeout for every way a neighbour can fail."""

from __future__ import annotations

import multiprocessing
import re
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from distbelief.errors import (
    AuthenticationError,
    ConfigFieldError,
    LayoutMismatchError,
    NotAStageError,
    PipelineError,
    StageTimeoutError,
    StageUnavailableError,
)
from distbelief.models import build_model
from distbelief.pipeline import wire_links as wire_links_module
from distbelief.pipeline.engine import PipelineStage, StageStepFigures
from distbelief.pipeline.layers import build_stage
from distbelief.pipeline.split import split_model
from distbelief.pipeline.wire_links import WireLinks, wire_links
from distbelief.wire import OpRegistry, serve
from distbelief.wire.security import WireSecurity
from tests.conftest import free_port

KEY = b"p" * 32
SECURITY = WireSecurity(auth_key=KEY)
LOCAL = "tcp://127.0.0.1:0"
TIMEOUT_S = 30.0
"""Generous: success paths never depend on a short wait."""
SHORT_S = 0.3
"""For waits that are meant to fail."""
NUM_STEPS = 3
NUM_MICRO = 4
BATCH_SIZE = 16


@pytest.fixture
def make_links() -> Iterator[Callable[..., WireLinks]]:
    """A factory of stages' links; every one made is closed after the test."""
    made: list[WireLinks] = []

    def make(
        stage: int,
        num_stages: int,
        next_address: str | None = None,
        security: WireSecurity | None = SECURITY,
        plan: dict[str, object] | None = None,
        first_step: int | None = None,
    ) -> WireLinks:
        links = wire_links(
            stage,
            num_stages,
            bind=LOCAL if stage > 0 else None,
            next_address=next_address,
            security=security,
            timeout_s=TIMEOUT_S,
            plan=plan,
            first_step=first_step,
        )
        made.append(links)
        return links

    yield make
    for links in made:
        links.close()


def _chain(make: Callable[..., WireLinks], num_stages: int) -> list[WireLinks]:
    """The links of ``num_stages`` stages, started last to first as a launcher would."""
    chain: list[WireLinks] = []
    next_address = None
    for stage in reversed(range(num_stages)):
        links = make(stage, num_stages, next_address)
        chain.insert(0, links)
        next_address = links.address
    for links in chain:
        links.wait_for_peer(TIMEOUT_S)
    return chain


def _run_together(*targets: Callable[[], None]) -> None:
    """Run each target in its own thread; re-raise the first failure."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a stage thread hung"
    if errors:
        raise errors[0]


def _input(step: int, micro: int) -> torch.Tensor:
    return torch.arange(32, dtype=torch.float32).reshape(4, 8) + 100 * step + micro


def _stage1_output(activation: torch.Tensor) -> torch.Tensor:
    return activation[:, :6].double() * 2  # a slice: not contiguous before the cast


def _stage1_input_grad(grad: torch.Tensor) -> torch.Tensor:
    result = torch.zeros(4, 8)
    result[:, :6] = grad.float() * 3
    return result


def test_a_chain_of_three_stages_moves_activations_forward_and_gradients_back(make_links):
    first, middle, last = _chain(make_links, 3)
    buffers: dict[str, dict[int, torch.Tensor]] = {"0<": {}, "1>": {}, "1<": {}, "2>": {}}

    def same_buffer(kind: str, micro: int, tensor: torch.Tensor) -> None:
        seen = buffers[kind].setdefault(micro, tensor)
        assert tensor is seen and tensor.data_ptr() == seen.data_ptr(), (kind, micro)

    def stage0() -> None:
        for step in range(NUM_STEPS):
            for micro in range(NUM_MICRO):
                first.send_forward(step, micro, _input(step, micro))
            for micro in reversed(range(NUM_MICRO)):
                grad = first.recv_backward(step, micro, TIMEOUT_S)
                expected = _stage1_input_grad(_stage1_output(_input(step, micro)) + 1)
                torch.testing.assert_close(grad, expected, rtol=0, atol=0)
                same_buffer("0<", micro, grad)

    def stage1() -> None:
        for step in range(NUM_STEPS):
            for micro in range(NUM_MICRO):
                activation = middle.recv_forward(step, micro, TIMEOUT_S)
                torch.testing.assert_close(activation, _input(step, micro), rtol=0, atol=0)
                same_buffer("1>", micro, activation)
                middle.send_forward(step, micro, _stage1_output(activation))
            for micro in reversed(range(NUM_MICRO)):
                grad = middle.recv_backward(step, micro, TIMEOUT_S)
                same_buffer("1<", micro, grad)
                middle.send_backward(step, micro, _stage1_input_grad(grad))

    def stage2() -> None:
        for step in range(NUM_STEPS):
            outputs = []
            for micro in range(NUM_MICRO):
                activation = last.recv_forward(step, micro, TIMEOUT_S)
                expected = _stage1_output(_input(step, micro))
                torch.testing.assert_close(activation, expected, rtol=0, atol=0)
                same_buffer("2>", micro, activation)
                outputs.append(activation + 1)
            for micro in reversed(range(NUM_MICRO)):
                last.send_backward(step, micro, outputs[micro])

    _run_together(stage0, stage1, stage2)

    assert first.address is None and middle.address and last.address
    assert all(len(seen) == NUM_MICRO for seen in buffers.values())
    num_transfers = NUM_STEPS * NUM_MICRO
    first_boundary = num_transfers * 4 * 8 * 4  # float32 4x8
    second_boundary = num_transfers * 4 * 6 * 8  # float64 4x6
    assert (first.counters.bytes_sent, first.counters.bytes_received) == (
        first_boundary,
        first_boundary,
    )
    total = first_boundary + second_boundary
    assert (middle.counters.bytes_sent, middle.counters.bytes_received) == (total, total)
    assert (last.counters.bytes_sent, last.counters.bytes_received) == (
        second_boundary,
        second_boundary,
    )


def test_a_new_shape_gets_a_new_buffer_and_the_old_shape_keeps_its_own(make_links):
    first, last = _chain(make_links, 2)
    first.send_forward(0, 0, torch.ones(2, 3))
    small = last.recv_forward(0, 0, TIMEOUT_S)
    last.send_backward(0, 0, torch.full((2, 3), 5.0))
    assert first.recv_backward(0, 0, TIMEOUT_S).tolist() == [[5.0] * 3] * 2
    first.send_forward(1, 0, torch.arange(5, dtype=torch.int64))
    wide = last.recv_forward(1, 0, TIMEOUT_S)
    assert wide.tolist() == [0, 1, 2, 3, 4] and wide.dtype == torch.int64
    assert tuple(small.shape) == (2, 3)  # a new buffer, the old one untouched in shape


def test_a_gradient_fetch_is_asked_again_until_the_gradient_arrives(make_links, monkeypatch):
    monkeypatch.setattr(wire_links_module, "_LONG_POLL_S", 0.05)
    first, last = _chain(make_links, 2)
    first.send_forward(0, 1, torch.ones(3))
    last.recv_forward(0, 1, TIMEOUT_S)
    timer = threading.Timer(0.5, last.send_backward, args=(0, 1, torch.full((3,), 7.0)))
    timer.start()
    try:
        # Each fetch is held 0.05s: the gradient, deposited later, comes from a re-request.
        assert first.recv_backward(0, 1, TIMEOUT_S).tolist() == [7.0, 7.0, 7.0]
    finally:
        timer.join(10)


def test_the_stage_before_may_start_later_than_a_wait_lasts(make_links):
    # Stages started by hand, last first: the first stage comes up after the last one's wait
    # of 2 s would have ended; the wait lasts until the stage before has had its time to
    # connect, then 2 s from its connection.
    last = WireLinks(
        1,
        2,
        bind=LOCAL,
        next_address=None,
        security=SECURITY,
        timeout_s=TIMEOUT_S,
        first_contact_timeout_s=TIMEOUT_S,
    )
    made: list[WireLinks] = []

    def start_first_stage_later() -> None:
        time.sleep(3.0)
        made.append(make_links(0, 2, last.address))
        made[0].send_forward(0, 0, torch.ones(2, 3))

    starter = threading.Thread(target=start_first_stage_later)
    starter.start()
    try:
        assert last.recv_forward(0, 0, 2.0).tolist() == [[1.0] * 3] * 2
    finally:
        starter.join(TIMEOUT_S)
        last.close()
    never = WireLinks(
        1,
        2,
        bind=LOCAL,
        next_address=None,
        security=SECURITY,
        timeout_s=TIMEOUT_S,
        first_contact_timeout_s=1.0,
    )
    try:
        with pytest.raises(
            StageTimeoutError,
            match=r"within 0.3s \(stage 0 never connected within 1s of this stage's start\)$",
        ):
            never.recv_forward(0, 0, SHORT_S)
    finally:
        never.close()


def test_a_peer_that_never_sends_is_a_timeout_naming_both_stages(make_links):
    first, last = _chain(make_links, 2)
    started = time.monotonic()
    with pytest.raises(
        StageTimeoutError,
        match=r"^stage 1: stage 0 did not send the activation of step 2, micro-batch 1 "
        r"within 0.3s$",
    ):
        last.recv_forward(2, 1, SHORT_S)
    with pytest.raises(StageTimeoutError, match=r"within 0.3s \(stage 0 never connected\)$"):
        make_links(1, 2).recv_forward(0, 0, SHORT_S)
    with pytest.raises(
        StageTimeoutError,
        match=r"^stage 0: stage 1 \(tcp://127\.0\.0\.1:\d+\) did not return the gradient of "
        r"step 3, micro-batch 2 within 0.3s$",
    ):
        first.recv_backward(3, 2, SHORT_S)
    assert time.monotonic() - started < 10


def test_a_next_stage_that_is_not_listening_is_unavailable(make_links):
    nobody = f"tcp://127.0.0.1:{free_port()}"
    first = make_links(0, 2, nobody)
    with pytest.raises(StageUnavailableError, match=r"^stage 0: cannot reach stage 1 \(tcp://"):
        first.send_forward(0, 0, torch.ones(2))
    with pytest.raises(StageUnavailableError, match="the gradient of step 0, micro-batch 0"):
        first.recv_backward(0, 0, TIMEOUT_S)
    with pytest.raises(StageUnavailableError, match=r"could not be reached within 0.3s"):
        first.wait_for_peer(SHORT_S)


def test_a_stage_with_another_job_key_is_refused_clearly(make_links):
    """An AuthenticationError, as a shard's refusal is (the command line names the key file,
    exit 2), that names the stage: it said 'the shard refused this job key', in a
    PipelineError (exit 1)."""
    last = make_links(1, 2)
    stranger = make_links(0, 2, last.address, WireSecurity(auth_key=b"x" * 32))
    refusal = (
        r"^stage 0: stage 1 \(tcp://[^)]*\): stage_hello: the next stage refused this job key$"
    )
    with pytest.raises(AuthenticationError, match=refusal):
        stranger.wait_for_peer(TIMEOUT_S)
    anonymous = make_links(0, 2, last.address, None)
    with pytest.raises(AuthenticationError, match="the next stage requires authentication"):
        anonymous.send_forward(0, 0, torch.ones(2))


def test_a_stage_that_is_not_the_next_one_is_refused(make_links):
    *_, last = _chain(make_links, 3)
    skipping = make_links(0, 3, last.address)
    with pytest.raises(PipelineError, match=r"is stage 2 of 3, not stage 1 of 3"):
        skipping.wait_for_peer(TIMEOUT_S)
    with pytest.raises(PipelineError, match=r"stage 2 of 3 answers stage 1 only, not stage 0$"):
        skipping.send_forward(0, 0, torch.ones(2))
    elsewhere = make_links(0, 4, last.address)
    with pytest.raises(PipelineError, match=r"is stage 2 of 3, not stage 1 of 4"):
        elsewhere.wait_for_peer(TIMEOUT_S)


def _refused_on_both_sides(first: WireLinks, last: WireLinks, field: str) -> None:
    """``first`` (told 3) and ``last`` (told 2) refuse each other's ``field`` at once, each
    naming both values and where the other stage is."""
    with pytest.raises(ConfigFieldError) as refused:
        first.wait_for_peer(TIMEOUT_S)
    assert refused.value.field == field
    assert re.fullmatch(
        r"is 3 for stage 0 but 2 for stage 1 \(tcp://127\.0\.0\.1:\d+\): give every stage "
        "of the replica the same",
        refused.value.problem,
    ), refused.value.problem
    # The stage after refuses as well, at once, rather than waiting out its timeout.
    with pytest.raises(ConfigFieldError) as refused_there:
        last.recv_forward(0, 0, TIMEOUT_S)
    assert refused_there.value.field == field
    assert refused_there.value.problem == (
        "is 2 for stage 1 but 3 for stage 0 (connecting from 127.0.0.1): give every stage of "
        "the replica the same"
    )


def test_a_neighbour_cut_into_another_number_of_partitions_is_refused_on_both_sides(
    make_links,
):
    last = make_links(1, 2, plan=_PLAN)
    first = make_links(0, 3, last.address, plan=_PLAN)
    _refused_on_both_sides(first, last, "pipeline.num_partitions")


class _NoOpsService:
    """A server of another kind than a stage: it answers no stage op."""

    def __init__(self) -> None:
        self.handlers = OpRegistry()

    def open_connection(self, peer: str) -> _NoOpsService:
        return self  # no state per connection

    def close(self) -> None:
        pass


def test_a_next_address_that_is_not_a_stage_is_refused_as_not_a_stage(make_links):
    server = serve(LOCAL, _NoOpsService(), security=SECURITY)
    try:
        first = make_links(0, 2, server.address)
        with pytest.raises(NotAStageError) as refused:
            first.wait_for_peer(TIMEOUT_S)
    finally:
        server.stop()
    assert str(refused.value) == (
        f"stage 0: {server.address} is not a pipeline stage (it answers no stage hello; a "
        "shard, say): give the next stage's --bind address"
    )


def test_a_next_address_of_another_program_is_refused_as_not_a_stage(make_links, foreign_program):
    first = make_links(0, 2, f"tcp://{foreign_program}")
    with pytest.raises(NotAStageError, match=r"^stage 0: tcp://.* is not a pipeline stage"):
        first.wait_for_peer(TIMEOUT_S)


def test_a_stage_counts_an_activation_when_it_takes_it_and_a_gradient_when_it_leaves_it(
    make_links,
):
    first, last = _chain(make_links, 2)
    size = 4 * 8 * 4  # float32 4x8
    for step in range(NUM_STEPS):
        first.send_forward(step, 0, _input(step, 0))
        # Held by the next stage, but not yet taken by its step.
        assert (first.counters.bytes_sent, last.counters.bytes_received) == (
            size * (step + 1),
            size * step,
        )
        activation = last.recv_forward(step, 0, TIMEOUT_S)
        last.recv_forward(step, 0, TIMEOUT_S)  # taken again: the same bytes
        last.send_backward(step, 0, activation * 2)
        # Counted by the step that leaves it, not when the stage before comes to fetch it.
        assert (last.counters.bytes_sent, last.counters.bytes_received) == (size * (step + 1),) * 2
        first.recv_backward(step, 0, TIMEOUT_S)
        assert (first.counters.bytes_sent, first.counters.bytes_received) == (
            size * (step + 1),
        ) * 2


def _mlp_engines(links: list[WireLinks], num_micro: int) -> tuple[list[PipelineStage], int]:
    """Two stages of a small mlp over ``links``, and the bytes of one batch's activation at
    the cut."""

    def build():
        return build_model("mlp", (1, 8, 8), 10)

    bounds = split_model(build, 2, seed=3).bounds
    engines, modules = [], []
    for stage, stage_links in enumerate(links):
        _, module = build_stage(build, bounds, stage, seed=3)
        modules.append(module)
        engines.append(
            PipelineStage(
                module,
                stage,
                2,
                stage_links,
                num_micro_batches=num_micro,
                timeout_s=TIMEOUT_S,
            )
        )
    with torch.no_grad():
        cut = modules[0](torch.zeros(BATCH_SIZE, 1, 8, 8))
    return engines, cut.numel() * cut.element_size()


def test_both_sides_of_a_cut_count_the_same_bytes_for_every_step_of_a_short_run(make_links):
    links = _chain(make_links, 2)
    engines, cut_bytes = _mlp_engines(links, num_micro=4)
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(BATCH_SIZE, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (BATCH_SIZE,), generator=generator)
    figures: list[list[StageStepFigures]] = [[], []]

    def run(stage: int) -> None:
        for step in range(1, 6):
            figures[stage].append(
                engines[stage].run_batch(
                    step, images if stage == 0 else None, labels if stage == 1 else None, BATCH_SIZE
                )
            )

    _run_together(lambda: run(0), lambda: run(1))
    # Each step's figures as its run_batch returned them: its activation one way, its
    # gradient the other, on both sides (what metrics.csv adds up per stage).
    for stage_figures in figures:
        assert [(f.bytes_sent, f.bytes_received) for f in stage_figures] == [
            (cut_bytes, cut_bytes)
        ] * 5
    assert links[0].counters == links[1].counters


_PLAN = {"model.name": "mlp", "pipeline.split_points": (3,), "rank": 0}


def test_a_neighbour_given_another_plan_is_refused_on_both_sides(make_links):
    last = make_links(1, 2, plan={**_PLAN, "pipeline.split_points": (2,)})
    first = make_links(0, 2, last.address, plan=_PLAN)
    _refused_on_both_sides(first, last, "pipeline.split_points")
    with pytest.raises(PipelineError, match="refused its plan"):
        first.send_forward(0, 0, torch.ones(2))


def test_a_setting_only_one_side_has_is_a_difference_and_equal_plans_link(make_links):
    last = make_links(1, 2, plan=_PLAN)
    other = make_links(0, 2, last.address, plan={**_PLAN, "pipeline.schedule": "gpipe"})
    with pytest.raises(
        ConfigFieldError, match=r"^pipeline\.schedule is gpipe for stage 0 but none"
    ):
        other.wait_for_peer(TIMEOUT_S)
    agreeing = make_links(1, 2, plan=_PLAN)
    make_links(0, 2, agreeing.address, plan=dict(_PLAN)).wait_for_peer(TIMEOUT_S)


def test_a_stage_before_that_joins_a_replica_under_way_is_refused_at_its_hello(make_links):
    # A stage 0 started again by hand (or a second one of the same --rank) while stage 1 is
    # mid-run: refused in one line that says what to do, not at its first activation about
    # steps that must increase; the replica under way is not disturbed, whatever the
    # newcomer's plan.
    last = make_links(1, 2, plan=_PLAN)
    first = make_links(0, 2, last.address, plan=_PLAN)
    first.wait_for_peer(TIMEOUT_S)
    first.send_forward(0, 0, torch.ones(2))
    assert torch.equal(last.recv_forward(0, 0, TIMEOUT_S), torch.ones(2))
    under_way = (
        r"^stage 0: stage 1 \(tcp://[^)]*\) refused the stage check: stage 1 is already "
        r"training with another stage 0 \(it received the activations of step 0\): a stage 0 "
        r"started again, or a second one of the same --rank and --stage 0, cannot join"
    )
    for plan in (_PLAN, {**_PLAN, "pipeline.split_points": (2,)}):
        again = make_links(0, 2, last.address, plan=plan)
        with pytest.raises(PipelineError, match=under_way) as refused:
            again.wait_for_peer(TIMEOUT_S)
        assert "\n" not in str(refused.value)
    last.send_backward(0, 0, torch.full((2,), 3.0))
    assert torch.equal(first.recv_backward(0, 0, TIMEOUT_S), torch.full((2,), 3.0))
    first.send_forward(1, 0, torch.ones(2))
    assert torch.equal(last.recv_forward(1, 0, TIMEOUT_S), torch.ones(2))


def test_a_micro_batch_past_the_plans_last_is_refused_and_keeps_no_slot(make_links):
    plan = {**_PLAN, "pipeline.num_micro_batches": 2}
    last = make_links(1, 2, plan=plan)
    first = make_links(0, 2, last.address, plan=plan)
    first.wait_for_peer(TIMEOUT_S)
    past = r"micro-batch 2 is past the plan's last \(1\): a batch is 2 micro-batches"
    with pytest.raises(PipelineError, match=past):
        first.send_forward(0, 2, torch.ones(2))
    with pytest.raises(PipelineError, match=past):
        first.recv_backward(0, 2, TIMEOUT_S)
    assert last._endpoint is not None and 2 not in last._endpoint._inbox
    first.send_forward(0, 1, torch.ones(2))
    assert torch.equal(last.recv_forward(0, 1, TIMEOUT_S), torch.ones(2))


def test_an_activation_past_the_next_step_is_refused_and_the_real_one_goes_through(make_links):
    # Taken, a step far ahead would hold the slot: the real activation would be refused and
    # the stage would wait for it until its timeout.
    last = make_links(1, 2, first_step=101)
    first = make_links(0, 2, last.address)
    first.wait_for_peer(TIMEOUT_S)
    ahead = r"step 9223372036854775807, micro-batch 0 is ahead of stage 1, which is at step 100"
    with pytest.raises(PipelineError, match=ahead):
        first.send_forward(2**63 - 1, 0, torch.ones(2))
    with pytest.raises(PipelineError, match="may send step 101 at most"):
        first.send_forward(102, 0, torch.ones(2))
    first.send_forward(101, 0, torch.ones(2))
    assert torch.equal(last.recv_forward(101, 0, TIMEOUT_S), torch.ones(2))
    last.send_backward(101, 0, torch.full((2,), 3.0))
    assert torch.equal(first.recv_backward(101, 0, TIMEOUT_S), torch.full((2,), 3.0))
    first.send_forward(102, 0, torch.ones(2))


def test_out_of_order_traffic_is_refused(make_links):
    first, last = _chain(make_links, 2)
    x = torch.ones(4)
    first.send_forward(0, 0, x)
    with pytest.raises(PipelineError, match="has not taken the activation of step 0, micro"):
        first.send_forward(1, 0, x)
    last.recv_forward(0, 0, TIMEOUT_S)
    with pytest.raises(PipelineError, match=r"step 0, micro-batch 0 comes after step 0"):
        first.send_forward(0, 0, x)
    ahead = "step 2, micro-batch 0 is ahead of stage 1, which is at step 0: the stage before may"
    with pytest.raises(PipelineError, match=ahead):
        first.send_forward(2, 0, x)
    first.send_forward(1, 1, x)
    with pytest.raises(PipelineError, match=r"asked for the activation of step 0.*already sent"):
        last.recv_forward(0, 1, TIMEOUT_S)

    last.send_backward(2, 0, x)
    with pytest.raises(PipelineError, match="has not fetched the gradient of step 2"):
        last.send_backward(3, 0, x)
    first.recv_backward(2, 0, TIMEOUT_S)
    with pytest.raises(PipelineError, match=r"refused the gradient of step 1.*is gone"):
        first.recv_backward(1, 0, TIMEOUT_S)
    # The sender counts what the next stage acknowledged (step 1's activation too), the
    # receiver what its steps took (step 1's never was); what was refused counts nowhere.
    assert first.counters.bytes_sent == 2 * 16
    assert last.counters.bytes_received == 16
    assert first.counters.bytes_received == last.counters.bytes_sent == 16


def test_bad_calls_and_settings_are_one_line_errors(make_links):
    first, last = _chain(make_links, 2)
    with pytest.raises(ValueError, match="step must be an integer >= 0, got -1"):
        first.send_forward(-1, 0, torch.ones(1))
    with pytest.raises(ValueError, match=r"dtype torch\.complex64 is not supported"):
        first.send_forward(0, 0, torch.ones(1, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match="stage 0 is the first stage"):
        first.recv_forward(0, 0, TIMEOUT_S)
    with pytest.raises(RuntimeError, match="stage 1 is the last stage"):
        last.send_forward(0, 0, torch.ones(1))
    with pytest.raises(ValueError, match="stage 1 needs a bind address"):
        wire_links(1, 2, bind=None, next_address=None, security=SECURITY, timeout_s=1)
    with pytest.raises(ValueError, match="stage 0 needs the address of stage 1"):
        wire_links(0, 2, bind=None, next_address=None, security=SECURITY, timeout_s=1)
    with pytest.raises(ValueError, match=r"stage must be in 0\.\.1, got 2"):
        wire_links(2, 2, bind=LOCAL, next_address=None, security=SECURITY, timeout_s=1)
    last.close()
    last.close()  # idempotent
    with pytest.raises(RuntimeError, match="after the links were closed"):
        last.recv_forward(0, 0, TIMEOUT_S)


def test_a_next_stage_that_dies_mid_run_fails_the_waiting_fetch_promptly(make_links):
    first, last = _chain(make_links, 2)
    first.send_forward(0, 0, torch.ones(3))
    last.recv_forward(0, 0, TIMEOUT_S)
    failures: list[BaseException] = []

    def fetch() -> None:
        try:
            first.recv_backward(0, 0, TIMEOUT_S)
        except BaseException as e:
            failures.append(e)

    waiter = threading.Thread(target=fetch, daemon=True)
    started = time.monotonic()
    waiter.start()
    time.sleep(0.2)  # usually inside the held fetch by now; either way it must fail promptly
    last.close()
    waiter.join(TIMEOUT_S)
    assert not waiter.is_alive()
    assert time.monotonic() - started < 10
    assert len(failures) == 1 and isinstance(failures[0], StageUnavailableError), failures
    assert "stage 0: " in str(failures[0]) and "the gradient of step 0, micro-batch 0" in str(
        failures[0]
    )


def test_a_previous_stage_that_dies_leaves_a_timeout_that_says_so(make_links):
    first, last = _chain(make_links, 2)
    first.send_forward(0, 0, torch.ones(3))
    last.recv_forward(0, 0, TIMEOUT_S)
    first.close()
    # The server notices the closed connections at once; the loop only rides out a busy machine.
    deadline, message = time.monotonic() + TIMEOUT_S, ""
    while "closed its connections" not in message and time.monotonic() < deadline:
        with pytest.raises(StageTimeoutError) as timed_out:
            last.recv_forward(1, 0, SHORT_S)
        message = str(timed_out.value)
    assert message.endswith("within 0.3s (stage 0 closed its connections)"), message


def _last_stage_process(addresses, done, num_steps: int) -> None:
    """Stage 1 of 2 in its own process: doubles each activation into a gradient."""
    with wire_links(
        1, 2, bind=LOCAL, next_address=None, security=SECURITY, timeout_s=TIMEOUT_S
    ) as links:
        addresses.put(links.address)
        for step in range(num_steps):
            activation = links.recv_forward(step, 0, TIMEOUT_S)
            links.send_backward(step, 0, activation * 2)
        done.wait(TIMEOUT_S)  # the last gradient is fetched before the links close


def test_two_stage_processes_exchange_tensors():
    context = multiprocessing.get_context("spawn")
    addresses, done = context.Queue(), context.Event()
    child = context.Process(target=_last_stage_process, args=(addresses, done, 3), daemon=True)
    child.start()
    try:
        address = addresses.get(timeout=60)
        with wire_links(
            0, 2, bind=None, next_address=address, security=SECURITY, timeout_s=TIMEOUT_S
        ) as links:
            links.wait_for_peer(TIMEOUT_S)
            for step in range(3):
                links.send_forward(step, 0, torch.full((16,), float(step)))
                assert links.recv_backward(step, 0, TIMEOUT_S).tolist() == [2.0 * step] * 16
            done.set()
        child.join(30)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join(10)
        addresses.close()


def test_a_finished_stage_serves_its_last_gradients_until_they_are_fetched(make_links):
    first, middle, last = _chain(make_links, 3)
    activation = torch.ones(2, 3)

    def run_first() -> None:
        first.send_forward(1, 0, activation)
        time.sleep(1.0)  # slow to come for the gradient: the middle stage has finished by then
        assert torch.equal(first.recv_backward(1, 0, TIMEOUT_S), torch.full((2, 3), 2.0))
        assert first.drain(TIMEOUT_S)
        first.close()

    def run_middle() -> None:
        middle.send_forward(1, 0, middle.recv_forward(1, 0, TIMEOUT_S) * 2)
        middle.send_backward(1, 0, middle.recv_backward(1, 0, TIMEOUT_S) * 2)
        assert middle.drain(TIMEOUT_S)  # returns once the first stage took it and left
        middle.close()

    def run_last() -> None:
        last.recv_forward(1, 0, TIMEOUT_S)
        last.send_backward(1, 0, torch.ones(2, 3))
        assert last.drain(TIMEOUT_S)
        last.close()

    _run_together(run_first, run_middle, run_last)


def test_stages_on_other_addresses_link_from_the_workers_host():
    later = WireLinks(
        1, 2, bind="tcp://127.0.0.5:0", next_address=None, security=SECURITY, timeout_s=TIMEOUT_S
    )
    first = WireLinks(
        0,
        2,
        bind=None,
        next_address=later.address,
        security=SECURITY,
        timeout_s=TIMEOUT_S,
        source_host="127.0.0.4",
    )
    try:
        first.wait_for_peer(TIMEOUT_S)
        assert later.address.startswith("tcp://127.0.0.5:")
        assert later.peer_hosts == {"127.0.0.4"}
        assert first.peer_hosts == set()
    finally:
        first.close()
        later.close()


CAUSE = "shard 0 at tcp://127.0.0.1:1 divides the model otherwise (flat, not row-aligned)"


def _fail_in_background(links: WireLinks, error: BaseException) -> list[bool]:
    told: list[bool] = []
    threading.Thread(target=lambda: told.append(links.fail(error, TIMEOUT_S)), daemon=True).start()
    return told


def test_a_next_stage_that_cannot_train_refuses_the_hello_with_its_cause(make_links):
    # Stage 1 listened, then its shards refused it: stage 0 is told why at once, instead of
    # retrying its connection until its first-contact bound and reporting that.
    last = make_links(1, 2)
    told = _fail_in_background(last, LayoutMismatchError(CAUSE))
    first = make_links(0, 2, last.address)
    started = time.monotonic()
    with pytest.raises(PipelineError) as refused:
        first.wait_for_peer(TIMEOUT_S)
    assert time.monotonic() - started < 10
    assert not isinstance(refused.value, StageUnavailableError | StageTimeoutError)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("stage 0: stage 1 (tcp://")
    assert message.endswith(
        f"refused the stage check: stage 1 cannot train: LayoutMismatchError: {CAUSE}"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not told and time.monotonic() < deadline:
        time.sleep(0.01)
    assert told == [True]


def test_a_next_stage_that_fails_after_the_hello_refuses_activations_and_fetches(make_links):
    first, last = _chain(make_links, 2)
    first.wait_for_peer(TIMEOUT_S)
    told = _fail_in_background(last, LayoutMismatchError(CAUSE))
    with pytest.raises(
        PipelineError, match=re.escape(f"stage 1 cannot train: LayoutMismatchError: {CAUSE}")
    ):
        first.recv_backward(1, 0, TIMEOUT_S)
    with pytest.raises(
        PipelineError, match=re.escape(f"stage 1 cannot train: LayoutMismatchError: {CAUSE}")
    ):
        first.send_forward(1, 0, torch.ones(2))
    deadline = time.monotonic() + TIMEOUT_S
    while not told and time.monotonic() < deadline:
        time.sleep(0.01)
    assert told == [True]


def test_a_stage_that_nobody_asks_stops_waiting_to_tell_its_cause(make_links):
    last = make_links(1, 2)
    started = time.monotonic()
    assert last._endpoint is not None
    assert last._endpoint.fail("no shard", SHORT_S) is False
    assert time.monotonic() - started < 5
    assert make_links(0, 1).fail(ValueError("x"), TIMEOUT_S) is True  # no stage before


def test_a_stage_process_whose_shards_refuse_it_tells_the_stage_before(monkeypatch, caplog):
    """And says so at once: its wait for the stage before (up to --timeout + --retry-timeout)
    was silent."""
    from distbelief.config import JobConfig
    from distbelief.data import load_job_dataset
    from distbelief.pipeline.job import job_split, stage_plan
    from distbelief.worker import stage as stage_module

    def refused(*args, **kwargs):
        raise LayoutMismatchError(CAUSE)

    monkeypatch.setattr(stage_module, "job_optimizer", refused)
    config = JobConfig.from_fields(
        {
            "model.name": "mlp",
            "data.name": "digits",
            "pipeline.num_partitions": 2,
            "pipeline.split_points": [2],
            "cluster.num_workers": 1,
            "optimizer.steps": 2,
            "faults.timeout_s": 20.0,
        }
    )
    addresses: list[str] = []
    failures: list[BaseException] = []

    def emit(kind: str, payload: dict) -> None:
        if kind == "ready":
            addresses.append(payload["address"])

    def run() -> None:
        try:
            stage_module.run_stage_worker(
                config, 0, 1, ["tcp://127.0.0.1:1"], emit=emit, bind=LOCAL, security=SECURITY
            )
        except BaseException as e:
            failures.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 120
    while not addresses and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert addresses, failures
    train_set = load_job_dataset(config.data, "train")
    split = job_split(config, train_set.input_shape, train_set.num_classes)
    with (
        WireLinks(
            0,
            2,
            bind=None,
            next_address=addresses[0],
            security=SECURITY,
            timeout_s=TIMEOUT_S,
            plan=stage_plan(config, 0, split),
        ) as first,
        pytest.raises(
            PipelineError, match=re.escape(f"cannot train: LayoutMismatchError: {CAUSE}")
        ),
    ):
        first.wait_for_peer(TIMEOUT_S)
    worker.join(TIMEOUT_S)
    assert not worker.is_alive()
    assert len(failures) == 1 and isinstance(failures[0], LayoutMismatchError), failures
    said = [r.getMessage() for r in caplog.records if r.name == "distbelief.worker.stage"]
    assert said == [
        f"stage 1 cannot train (LayoutMismatchError: {CAUSE}); it exits once stage 0 has been "
        "told why (waiting up to 80s for it to connect)"
    ]
