"""The interpreter around a run: start-up without full collections and with a short switch
interval, the loop with what start-up built frozen, and everything as it was afterwards."""

import gc
import sys

import pytest

from shardprop.service.training.interpreter import STARTUP_SWITCH_SECONDS, RunInterpreter


def test_start_up_then_loop_then_the_interpreter_as_it_was():
    gc.unfreeze()  # in-process CLI runs of earlier tests freeze everything at their end
    switch = sys.getswitchinterval()
    assert gc.isenabled()
    with RunInterpreter() as interpreter:
        assert not gc.isenabled()
        assert sys.getswitchinterval() == pytest.approx(STARTUP_SWITCH_SECONDS)
        interpreter.started()
        assert gc.isenabled() and sys.getswitchinterval() == switch
        assert gc.get_freeze_count() > 0  # start-up's objects are out of the collector's walks
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert sys.getswitchinterval() == switch


def test_a_failed_start_up_restores_it_and_a_callers_choices_are_kept():
    gc.disable()
    gc.freeze()  # the caller froze objects of its own: they stay frozen
    try:
        with pytest.raises(RuntimeError), RunInterpreter():
            raise RuntimeError("Ray did not start")
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        with RunInterpreter() as interpreter:
            interpreter.started()
            assert not gc.isenabled()  # the caller had it off
    finally:
        gc.unfreeze()
        gc.enable()
