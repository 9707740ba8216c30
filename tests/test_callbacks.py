"""Ctrl-C during training is deferred to the next batch end (a safe point)."""

import os
import signal

import pytest

from mbvi.training.callbacks import DeferredInterrupt


def test_first_ctrl_c_waits_for_the_batch_end_and_restores_the_handler():
    before = signal.getsignal(signal.SIGINT)
    cb = DeferredInterrupt()
    cb.on_train_start(None, None)
    os.kill(os.getpid(), signal.SIGINT)  # delivered now; must not raise here
    with pytest.raises(KeyboardInterrupt):
        cb.on_train_batch_end(None, None, None, None, 0)
    assert signal.getsignal(signal.SIGINT) is before


def test_second_ctrl_c_interrupts_at_once():
    before = signal.getsignal(signal.SIGINT)
    cb = DeferredInterrupt()
    cb.on_train_start(None, None)
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_no_interrupt_no_exception_and_handler_restored_at_the_end():
    before = signal.getsignal(signal.SIGINT)
    cb = DeferredInterrupt()
    cb.on_train_start(None, None)
    cb.on_train_batch_end(None, None, None, None, 0)  # nothing requested: no raise
    cb.on_train_end(None, None)
    assert signal.getsignal(signal.SIGINT) is before
