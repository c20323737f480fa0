"""The launch's SIGINT/SIGTERM handlers without Ray: stop gently while serving, at once otherwise."""

from __future__ import annotations

import os
import signal

import pytest

from cluster.launch import Interrupted, StopSignals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_first_signal_while_serving_asks_to_stop_and_a_second_one_stops_at_once(signum: int):
    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    with StopSignals() as signals:
        signals.serving = True
        os.kill(os.getpid(), signum)
        assert signals.requested.wait(5) and signals.signum == signum
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGINT)
            signals.requested.wait(5)  # the handler raises in this thread before the wait returns
        assert e.value.signum == signal.SIGINT and isinstance(e.value, KeyboardInterrupt)
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before


def test_a_signal_during_startup_interrupts_at_once():
    with StopSignals() as signals, pytest.raises(Interrupted) as e:
        os.kill(os.getpid(), signal.SIGTERM)
        signals.requested.wait(5)
    assert e.value.signum == signal.SIGTERM and not signals.requested.is_set()
