"""Vector programs on sharded vectors against plain torch on the whole vectors; the evaluation
accumulator's exactly-once sum; Sandblaster vectors through a shard checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from distbelief.errors import EvaluationNotOpenError
from distbelief.server import ParameterShard, server_optimizer_factory
from distbelief.server.checkpoint import load_checkpoint, save_checkpoint
from distbelief.server.store import ShardStore
from distbelief.server.vectors import EvaluationAccumulator, VectorExecutor
from distbelief.sharding import FlatLayout, FlatPartitioner, TensorSpec
from distbelief.wire.vector_program import Program, combine_partials

FLOAT64_SPECS = [TensorSpec("w", (7, 5), torch.float64), TensorSpec("b", (5,), torch.float64)]
MIXED_SPECS = [*FLOAT64_SPECS, TensorSpec("h", (6,), torch.float32)]
NAMES = ("a", "b", "c")


class ShardedVectors:
    """Whole vectors (one flat tensor per dtype) split over shards, each shard with a store,
    an accumulator and an executor, as ParameterShards hold them."""

    def __init__(self, specs: list[TensorSpec], num_shards: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.layout = FlatLayout(specs)
        self.whole = {
            name: {
                d: torch.randn(n, generator=generator, dtype=d)
                for d, n in self.layout.sizes.items()
            }
            for name in ("param", *NAMES)
        }
        self.slices = FlatPartitioner().partition(specs, num_shards)
        self.executors = []
        for pieces in self.slices:
            store = ShardStore(server_optimizer_factory("sgd", lr=0.1), self.cut("param", pieces))
            for name in NAMES:
                store.add(name, self.cut(name, pieces))
            self.executors.append(VectorExecutor(store, EvaluationAccumulator()))

    def cut(self, name: str, pieces: list) -> list[torch.Tensor]:
        """A shard's slices (copies) of the whole vector ``name``."""
        return [self.whole[name][p.dtype][p.start : p.stop].clone() for p in pieces]

    def run(self, program: Program) -> list:
        instructions = program.to_json()
        return combine_partials(instructions, [ex.run(instructions) for ex in self.executors])

    def gather(self, name: str) -> dict[torch.dtype, torch.Tensor]:
        flats = self.layout.allocate()
        for pieces, executor in zip(self.slices, self.executors, strict=True):
            for piece, tensor in zip(pieces, executor.store.get(name), strict=True):
                flats[piece.dtype][piece.start : piece.stop] = tensor
        return flats


def _dot(x: dict, y: dict) -> float:
    return sum(float(torch.dot(x[d], y[d])) for d in x)


@pytest.mark.parametrize(
    ("specs", "num_shards"), [(FLOAT64_SPECS, 1), (FLOAT64_SPECS, 3), (MIXED_SPECS, 3)]
)
def test_every_instruction_matches_torch_on_the_whole_vectors(specs, num_shards):
    vectors = ShardedVectors(specs, num_shards)
    a, b, c = ({d: t.clone() for d, t in vectors.whole[n].items()} for n in NAMES)
    program = Program()
    i_dot = program.dot("a", "b")
    i_max = program.max_abs("a")
    i_abs = program.abs_sum("b")
    program.axpy("a", 0.5, "b")
    program.add("t", "a", -2.0, "c")
    program.combine("c", [(0.25, "c"), (3.0, "a"), (-1.0, "b")])
    program.scale("b", -1.5)
    program.copy("d", "a")
    program.zero("e")
    i_after = program.dot("c", "t")
    program.drop("t")
    program.set_value("rho", [0.5, 1.0])
    i_value = program.get_value("rho")
    i_missing = program.get_value("missing")
    results = vectors.run(program)

    want_dot, want_abs = _dot(a, b), sum(float(b[d].abs().sum()) for d in b)
    want_max = max(float(a[d].abs().max()) for d in a)
    for d in a:
        a[d].add_(b[d], alpha=0.5)
    t = {d: torch.add(a[d], c[d], alpha=-2.0) for d in a}
    c = {d: 0.25 * c[d] + 3.0 * a[d] - b[d] for d in a}
    b = {d: b[d] * -1.5 for d in b}
    assert results[i_dot] == pytest.approx(want_dot, rel=1e-6)
    assert results[i_max] == pytest.approx(want_max, rel=1e-6)
    assert results[i_abs] == pytest.approx(want_abs, rel=1e-6)
    assert results[i_after] == pytest.approx(_dot(c, t), rel=1e-5)
    assert results[i_value] == [[0.5, 1.0]] * num_shards
    assert results[i_missing] == [None] * num_shards
    for name, want in (("a", a), ("b", b), ("c", c), ("d", a)):
        for d, tensor in vectors.gather(name).items():
            torch.testing.assert_close(tensor, want[d])
    assert all(not bool(t.any()) for t in vectors.gather("e").values())
    assert all(ex.store.find("t") is None for ex in vectors.executors)


def test_reductions_do_not_depend_on_where_a_vector_lies_in_memory():
    """A vector restored from a checkpoint lies elsewhere in memory than the one saved: its dot
    products and sums must come out the same to the last digit (float32 torch.dot's do not)."""
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(2, 300_007, generator=generator)
    for offset in range(8):  # views starting 0-7 float32s into their buffers, and copies
        x, y = flat[0, offset:], flat[1, offset:]
        store = ShardStore(server_optimizer_factory("sgd", lr=0.1), [x.clone()])
        store.add("x", [x])
        store.add("y", [y])
        store.add("y_copy", [y.clone()])
        program = Program()
        program.dot("x", "y"), program.dot("param", "y_copy")
        program.abs_sum("x"), program.abs_sum("param")
        results = VectorExecutor(store, EvaluationAccumulator()).run(program.to_json())
        assert results[0] == results[1], offset
        assert results[2] == results[3], offset
        exact = math.fsum((x.double() * y.double()).tolist())
        assert results[0] == pytest.approx(exact, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize(
    ("instructions", "match"),
    [
        ({"dot": 1}, "a program is a list"),
        ([["fly", "a"]], "unknown instruction 'fly'"),
        ([["dot", "a"]], "dot takes 2 arguments, got 1"),
        (["dot"], "an instruction is a non-empty list"),
        ([["dot", "a", "nowhere"]], "no vector 'nowhere'"),
        ([["zero", "sync.round_sum"]], "a vector name is 1-64 letters"),
        ([["zero", ""]], "a vector name"),
        ([["zero", 5]], "a vector name"),
        ([["scale", "a", "2"]], "expected a number, got '2'"),
        ([["axpy", "a", True, "b"]], "expected a number, got True"),
        ([["drop", "param"]], "parameters cannot be dropped"),
        ([["combine", "a", []]], "non-empty list"),
        ([["combine", "a", [[1.0]]]], r"a combine term is \[coef, vector\]"),
        ([["open_evaluation", -1, "g"]], "integer >= 0"),
        ([["open_evaluation", 1, "param"]], "cannot sum into the parameters"),
        ([["commit", 1, "w-1"]], "open evaluation is None"),
        ([["close_evaluation", 3]], "open evaluation is None"),
        ([["set_value", "", 1]], "a value key"),
    ],
)
def test_malformed_programs_are_refused_by_name(instructions, match):
    executor = ShardedVectors(FLOAT64_SPECS, 1).executors[0]
    with pytest.raises(ValueError, match=match):
        executor.run(instructions)


def test_the_instructions_before_a_bad_one_have_run():
    executor = ShardedVectors(FLOAT64_SPECS, 1).executors[0]
    with pytest.raises(ValueError, match=r"instruction 1 \['dot'"):
        executor.run([["zero", "a"], ["dot", "a", "nowhere"]])
    assert not executor.store.get("a")[0].any()


def test_partials_combine_whatever_the_shard_order():
    instructions = Program()
    instructions.max_abs("a")
    instructions.dot("a", "b")
    program = instructions.to_json()
    for per_shard in ([[math.nan, 1.0], [1.0, 2.0]], [[1.0, 1.0], [math.nan, 2.0]]):
        assert math.isnan(combine_partials(program, per_shard)[0])
    assert combine_partials(program, [[1.0, 1e308], [2.0, 1e308]])[1] == math.inf
    assert math.isnan(combine_partials(program, [[1.0, math.inf], [2.0, -math.inf]])[1])
    assert combine_partials(program, [[1.0, "inf"], [2.0, 1.0]]) == [2.0, math.inf]
    with pytest.raises(ValueError, match="shard 1 returned 1 results, the program leaves 2"):
        combine_partials(program, [[1.0, 2.0], [1.0]])


def test_max_abs_of_a_vector_with_a_nan_is_nan_on_the_shard():
    executor = ShardedVectors(FLOAT64_SPECS, 1).executors[0]
    executor.store.get("a")[0][3] = math.nan
    assert math.isnan(executor.run([["max_abs", "a"]])[0])


def _bundle(executor: VectorExecutor, value: float) -> list[torch.Tensor]:
    return [torch.full_like(t, value) for t in executor.store.params]


def test_a_bundle_counts_once_and_an_uncommitted_one_never():
    executor = ShardedVectors(FLOAT64_SPECS, 1).executors[0]
    accumulator = executor.accumulator
    executor.run([["open_evaluation", 4, "grad"]])
    accumulator.stage(4, "w0-s-1", _bundle(executor, 1.0))
    accumulator.stage(4, "w1-s-1", _bundle(executor, 10.0))
    accumulator.stage(4, "w2-s-1", _bundle(executor, 7.0))
    accumulator.stage(4, "w2-s-1", _bundle(executor, 100.0))  # a repeat replaces
    executor.run([["commit", 4, "w0-s-1"], ["commit", 4, "w0-s-1"]])
    executor.run([["commit", 4, "w0-s-1"], ["commit", 4, "w2-s-1"]])
    accumulator.stage(4, "w0-s-1", _bundle(executor, 1.0))  # a retried push after its commit
    executor.run([["commit", 4, "w0-s-1"]])
    assert torch.equal(executor.store.get("grad")[0], torch.full((40,), 101.0, dtype=torch.float64))
    executor.run([["close_evaluation", 4]])
    assert accumulator.staged == {}  # w1's bundle was never committed: dropped
    with pytest.raises(ValueError, match="commit of 'w1-s-1' is for evaluation 4"):
        executor.run([["commit", 4, "w1-s-1"]])
    assert torch.equal(executor.store.get("grad")[0], torch.full((40,), 101.0, dtype=torch.float64))


def test_a_push_for_an_evaluation_that_is_not_open_is_refused_as_such():
    executor = ShardedVectors(FLOAT64_SPECS, 1).executors[0]
    with pytest.raises(EvaluationNotOpenError, match="evaluation 1, which is not open"):
        executor.accumulator.stage(1, "w0-s-1", _bundle(executor, 1.0))
    executor.run([["open_evaluation", 2, "grad"]])
    with pytest.raises(EvaluationNotOpenError, match=r"not open on this shard \(open: 2\)"):
        executor.accumulator.stage(1, "w0-s-1", _bundle(executor, 1.0))
    with pytest.raises(ValueError, match="commit of 'w0-s-1' is for evaluation 1"):
        executor.run([["commit", 1, "w0-s-1"]])
    with pytest.raises(ValueError, match="'grad' sums the open evaluation 2"):
        executor.run([["drop", "grad"]])
    with pytest.raises(ValueError, match="was not pushed here"):
        executor.run([["commit", 2, "w9-s-1"]])


def test_reopening_zeroes_the_sum_and_forgets_the_previous_bundles():
    executor = ShardedVectors(FLOAT64_SPECS, 1).executors[0]
    executor.run([["open_evaluation", 1, "grad"]])
    executor.accumulator.stage(1, "b", _bundle(executor, 2.0))
    executor.run([["commit", 1, "b"], ["close_evaluation", 1], ["open_evaluation", 2, "grad"]])
    assert not executor.store.get("grad")[0].any()
    executor.accumulator.stage(2, "b", _bundle(executor, 3.0))  # same id, new evaluation
    executor.run([["commit", 2, "b"]])
    assert bool((executor.store.get("grad")[0] == 3.0).all())


def _shard(num_shards: int = 2, shard_id: int = 1) -> ParameterShard:
    vectors = ShardedVectors(FLOAT64_SPECS, num_shards)
    shard = ParameterShard(shard_id, num_shards, server_optimizer_factory("adagrad", lr=0.1))
    shard.initialize(FLOAT64_SPECS, vectors.cut("param", vectors.slices[shard_id]))
    return shard


def test_sandblaster_vectors_and_values_survive_a_checkpoint(tmp_path):
    shard = _shard()
    program = Program()
    program.copy("d", "param")
    program.scale("d", -0.5)
    program.add("s0", "param", 2.0, "d")
    program.set_value("lbfgs", {"evaluation": 7, "rho": [0.25]})
    shard.run_program(program.to_json())
    save_checkpoint(shard.snapshot(), tmp_path / "lbfgs-000007")
    restored = ParameterShard(1, 2, server_optimizer_factory("adagrad", lr=0.1))
    restored.restore(load_checkpoint(tmp_path / "lbfgs-000007", 1))
    assert restored.store.names() == ["param", "d", "s0"]
    check = Program()
    check.dot("d", "s0")
    check.get_value("lbfgs")
    assert restored.run_program(check.to_json()) == shard.run_program(check.to_json())
    for name in ("param", "d", "s0"):
        assert torch.equal(restored.store.get(name)[0], shard.store.get(name)[0])


def test_shard_runs_a_retried_program_once_and_pulls_see_its_writes():
    shard = _shard()
    outs = [torch.empty(p.numel, dtype=p.dtype) for p in shard.slices]
    first = shard.pull_into(outs)
    before = outs[0].clone()
    program = [["scale", "param", 2.0], ["dot", "param", "param"]]
    results = shard.run_program(program, seq=("coordinator", 1))
    assert shard.run_program(program, seq=("coordinator", 1)) == results  # a retry: not rerun
    shard.pull_into(outs, outs_generation=first.generation)
    assert torch.equal(outs[0], before * 2.0)
    shard.run_program(program, seq=("coordinator", 2))
    shard.read_vector_into("param", outs)
    assert torch.equal(outs[0], before * 4.0)


def test_shard_stages_checks_and_reads_bundles_and_vectors():
    shard = _shard()
    numel = shard.slices[0].numel
    shard.run_program([["open_evaluation", 1, "grad"]])
    with pytest.raises(ValueError, match="bundle slice float64"):
        shard.stage_bundle(1, "w0", [torch.ones(numel + 1, dtype=torch.float64)])
    with pytest.raises(ValueError, match="expected 1 bundle slices, got 0"):
        shard.stage_bundle(1, "w0", [])
    with pytest.raises(ValueError, match="a bundle id is a string"):
        shard.stage_bundle(1, "", [torch.ones(numel, dtype=torch.float64)])
    with pytest.raises(EvaluationNotOpenError):
        shard.stage_bundle(2, "w0", [torch.ones(numel, dtype=torch.float64)])
    shard.stage_bundle(1, "w0", [torch.ones(numel, dtype=torch.float64)])
    shard.run_program([["commit", 1, "w0"]])
    outs = [torch.empty(numel, dtype=torch.float64)]
    shard.read_vector_into("grad", outs)
    assert bool((outs[0] == 1.0).all())
    with pytest.raises(ValueError, match="shard 1 has no vector 'nothing'"):
        shard.read_vector_into("nothing", outs)
    with pytest.raises(ValueError, match="a vector name"):
        shard.read_vector_into("dc-asgd.fetched.w0", outs)
    with pytest.raises(ValueError, match="holds no parameters"):
        ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1)).run_program([])
