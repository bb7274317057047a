"""`hardware.fast.freeze_heap` (lbt.heap): training's long-lived objects skip full garbage collections,
the heap is unfrozen when training ends or fails, and no number changes."""

import gc
import types

import pytest

from lbt import train as train_mod
from lbt.heap import SETTLE_AFTER_STEPS, FrozenHeap
from tests.conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def plain_heap():
    gc.unfreeze()
    yield
    gc.unfreeze()


def at_step(step: int):
    return types.SimpleNamespace(global_step=step)


def is_frozen(obj) -> bool:
    """In the collector's permanent generation: tracked, yet in none of the generations a collection walks.
    (Counting frozen objects instead is flaky: a frozen object freed meanwhile lowers the count.)"""
    return gc.is_tracked(obj) and all(o is not obj for o in gc.get_objects())


def test_freezes_at_start_after_settling_steps_and_phases_then_unfreezes(plain_heap):
    heap = FrozenHeap(phase_steps=[5])
    heap.on_train_start(at_step(0), None)
    assert gc.get_freeze_count() > 1000  # everything alive: modules, torch, this test
    assert is_frozen(heap)
    kept = [[i] for i in range(3000)]  # long-lived objects made while training (lists: always tracked)
    heap.on_train_batch_end(at_step(4), None, None, None, 0)  # not a settling step: nothing moves
    assert not is_frozen(kept) and not is_frozen(kept[-1])
    heap.on_train_batch_end(at_step(5), None, None, None, 0)  # after a checkpoint phase
    assert is_frozen(kept) and is_frozen(kept[-1])
    more = [[i] for i in range(2000)]
    heap.on_train_batch_end(at_step(SETTLE_AFTER_STEPS[0]), None, None, None, 0)  # after compilation
    assert is_frozen(more) and is_frozen(more[0])
    heap.on_train_end(at_step(6), None)
    assert gc.get_freeze_count() == 0 and not is_frozen(kept)
    heap.teardown(at_step(6), None, "fit")  # a second release changes nothing
    assert gc.get_freeze_count() == 0


def test_a_failed_training_unfreezes_too(plain_heap):
    heap = FrozenHeap()
    heap.on_train_start(at_step(0), None)
    assert gc.get_freeze_count() > 0
    heap.on_exception(at_step(0), None, RuntimeError("boom"))
    assert gc.get_freeze_count() == 0


def test_a_callers_own_freeze_is_left_alone(plain_heap):
    gc.freeze()
    before = gc.get_freeze_count()
    heap = FrozenHeap()
    heap.on_train_start(at_step(0), None)
    heap.on_train_end(at_step(1), None)
    assert gc.get_freeze_count() >= before  # still frozen: the caller's to undo


def test_a_job_with_the_frozen_heap_trains_the_same_numbers(tiny_cfg, tmp_path, plain_heap):
    common = ["train.epochs=2", "train.max_steps=4"]
    plain = train_mod.train(tiny_cfg(f"++job_dir={tmp_path / 'plain'}", *common))
    frozen = train_mod.train(tiny_cfg(f"++job_dir={tmp_path / 'frozen'}", *common, "hardware.fast.freeze_heap=true"))
    assert frozen["status"] == "done"
    assert frozen["loss_history"] == plain["loss_history"]
    assert gc.get_freeze_count() == 0  # unfrozen once training ended


def test_gpu_hardware_freezes_and_cpu_does_not():
    assert compose_train(["hardware=gpu"]).hardware.fast.freeze_heap is True
    assert compose_train(["hardware=multi_gpu"]).hardware.fast.freeze_heap is True
    assert compose_train([]).hardware.fast.freeze_heap is False
