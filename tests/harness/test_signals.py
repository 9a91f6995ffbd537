"""`StopSignals`: while armed a signal only asks for a stop; a second one, or one before training, stops at once."""

import os
import signal

import pytest

from harness.signals import RunInterrupted, StopSignals


HANGUP = [signal.SIGHUP] if hasattr(signal, "SIGHUP") else []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, *HANGUP])
def test_armed_signal_asks_a_second_one_stops_at_once(signum, capfd):
    before = signal.getsignal(signum)
    with StopSignals() as stop:
        stop.armed = True
        os.kill(os.getpid(), signum)
        assert stop.requested() and stop.received == signum
        assert "stopping after this step" in capfd.readouterr().err
        with pytest.raises(RunInterrupted) as again:
            os.kill(os.getpid(), signum)
        assert again.value.exit_code == 128 + signum
    assert signal.getsignal(signum) == before, "the previous handler is back"


def test_a_signal_before_training_stops_at_once():
    with StopSignals() as stop:
        with pytest.raises(RunInterrupted, match="before training began"):
            os.kill(os.getpid(), signal.SIGTERM)
        assert not stop.requested()


def test_a_signal_after_training_says_so():
    """While the answers after training are generated: the run has finished, it did not fail to start."""
    with StopSignals() as stop:
        stop.armed = True
        stop.armed = False  # the loop returned
        with pytest.raises(RunInterrupted, match="^SIGINT after training: stopped at once"):
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.skipif(not HANGUP, reason="no SIGHUP on this platform")
def test_a_signal_the_process_ignores_stays_ignored():
    """`nohup` starts a run with SIGHUP ignored: closing the terminal must not stop it then."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopSignals() as stop:
            stop.armed = True
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            assert not stop.requested()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
