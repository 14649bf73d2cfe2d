"""The scheduler alone, with fake model outputs (no model): what schedule() lays out is exactly
what the block manager placed, update_from_output applies sampled tokens and stop rules, n > 1
forks off one root, and a StepInput survives pickling (a worker process can replay it)."""

import dataclasses
import pickle

import numpy as np
from engine._core import BlockManager

from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.selfeval import SelfEvalSpec
from engine.sequence import Request, Sequence
from engine.step_input import StepInput, prepare_decode, prepare_step

SPEC = SelfEvalSpec(suffix_ids=(90, 91, 92), yes_id=93, no_id=94)
EOS = 2


def _scheduler(num_blocks=32, block_size=4, budget=64):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, SPEC, budget, 16, 128, {EOS}), bm


def _request(sched, rid, prompt, **params):
    request = Request(rid, prompt, SamplingParams(**params), seed=rid)
    if request.params.n == 1:
        seq = Sequence(sched.new_seq_id(), request, prompt, 0, rid)
        request.seqs.append(seq)
    else:
        seq = Sequence(sched.new_seq_id(), request, prompt, -1, rid)
        seq.is_root, seq.finish_reason, request.root = True, "root", seq
        request.seqs.append(seq)
        request.pending_forks = [1.0] * request.params.n
    sched.add(seq)
    return request


def test_step_layout_matches_the_block_manager_and_pickles():
    sched, bm = _scheduler()
    a = _request(sched, 0, list(range(10, 19)), max_tokens=5, ignore_eos=True)
    b = _request(sched, 1, [20, 21, 22], max_tokens=5, ignore_eos=True)
    out = sched.schedule()
    step = out.step
    assert step.token_ids.tolist() == list(range(10, 19)) + [20, 21, 22]
    assert step.positions.tolist() == list(range(9)) + [0, 1, 2]
    assert step.context_lens.tolist() == [9, 3] and step.query_start_loc.tolist() == [0, 9, 12]
    for i, seq in enumerate(out.seqs):
        blocks = bm.block_ids(seq.seq_id)
        assert (step.block_tables[i, :len(blocks)] == blocks).all()
        lo, hi = step.query_start_loc[i], step.query_start_loc[i + 1]
        expected = [blocks[p // 4] * 4 + p % 4 for p in range(hi - lo)]
        assert step.slot_mapping[lo:hi].tolist() == expected
    assert step.logit_rows.tolist() == [8, 11] and out.sample_seqs == [a.seqs[0], b.seqs[0]]
    replay = pickle.loads(pickle.dumps(step))
    for name in ("token_ids", "positions", "slot_mapping", "block_tables", "logit_rows"):
        assert np.array_equal(getattr(replay, name), getattr(step, name))
    sched.update_from_output(out, [7, EOS], [-0.1, -0.2], [])
    assert a.seqs[0].token_ids[-1] == 7 and b.seqs[0].token_ids[-1] == EOS
    assert a.seqs[0].generating and b.seqs[0].generating  # ignore_eos
    out = sched.schedule()  # two decodes
    assert np.diff(out.step.query_start_loc).tolist() == [1, 1] and out.step.is_pure_decode


def test_a_decode_step_lays_out_as_prepare_step_would():
    """prepare_decode (the layout of a step where every sequence samples off its last token) gives
    prepare_step's StepInput, copy-on-write of a shared partial block included."""
    bm = BlockManager(32, 4)
    bm.allocate(0, 6)
    bm.fork(0, 1)
    bm.allocate(2, 8)
    ids, tokens = [2, 0, 1], [7, 8, 9]
    bm.begin()
    want = prepare_step(bm, ids, [[t] for t in tokens])
    bm.rollback()
    got = prepare_decode(bm, ids, tokens)
    assert len(got.cow) == 1
    for f in dataclasses.fields(StepInput):
        a, b = getattr(got, f.name), getattr(want, f.name)
        assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b)), f.name


def test_stop_rules_release_and_a_suffix_is_scored_then_rolled_back():
    sched, bm = _scheduler()
    r = _request(sched, 0, [5, 6, 7], max_tokens=3, score=True)
    seq = r.seqs[0]
    sched.update_from_output(sched.schedule(), [EOS], [-0.5], [])
    assert seq.finish_reason == "stop" and seq.pending_score
    out = sched.schedule()
    assert out.suffixes == [SPEC.suffix_ids] and out.score_seqs == [seq] and not out.sample_seqs
    assert out.step.adapter_mask.tolist() == [False, True, True, True]
    sched.update_from_output(out, [], [], [(0.75, 0.2, 0.6)])
    assert seq.score == (0.75, 0.2, 0.6) and bm.num_free_blocks == 32 and not sched.has_work()


def test_n_samples_fork_off_one_root_and_take_its_last_row():
    sched, bm = _scheduler()
    r = _request(sched, 0, list(range(30, 36)), n=3, max_tokens=4, ignore_eos=True)
    out = sched.schedule()
    assert len(out.seqs) == 1 and out.seqs[0] is r.root  # the prompt is computed once
    assert out.step.logit_rows.tolist() == [5, 5, 5] and len(out.sample_seqs) == 3
    assert r.root.status.value == "finished"  # released: every sample is drawn
    assert bm.num_free_blocks == 32 - 2  # the samples share the prompt's two blocks
    sched.update_from_output(out, [1, 2, 3], [0.0] * 3, [])
    assert [s.token_ids[-1] for s in r.samples] == [1, 2, 3]
    out = sched.schedule()
    assert out.step.cow.shape == (2, 2)  # two copy the shared partial block, the last writes in place
