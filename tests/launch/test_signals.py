"""Stop signals set a flag (and nothing else) that the training loop polls."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from xpert_dist.launch import signals


@pytest.fixture(autouse=True)
def clean_state():
    signals.reset()
    yield
    signals.uninstall_handlers()
    signals.reset()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM])
def test_signal_sets_flag(sig):
    assert signals.install_handlers()
    assert not signals.stop_requested()
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs in the main thread at the next bytecode boundary
    assert signals.stop_requested()
    assert signals.stop_requested(sync=False)  # stays set
    assert signals.received_signal() == sig
    err = signals.Preempted(step=7)
    assert err.step == 7 and err.signum == sig and "requeued" in str(err)
    assert signals.exit_code(err) == signals.EXIT_PREEMPTED == 75
    assert signals.exit_code(RuntimeError()) == 1 and signals.exit_code(None) == 0


def test_install_is_idempotent_and_restores_previous():
    seen = []
    signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        signals.install_handlers()
        signals.install_handlers()
        assert callable(signals.previous_handler(signal.SIGUSR1))
        signals.uninstall_handlers()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert seen == [signal.SIGUSR1] and not signals.stop_requested(sync=False)
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_marker_file_written_on_signal(tmp_path, monkeypatch):
    marker = tmp_path / "preempted"
    monkeypatch.setenv("XPERT_PREEMPT_MARKER", str(marker))
    signals.install_handlers()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert marker.exists()


def test_fault_injection_pauses_until_signal(tmp_path, monkeypatch):
    monkeypatch.setenv("XPERT_FAULT_PAUSE_AT_POLL", "2")
    monkeypatch.setenv("XPERT_FAULT_DIR", str(tmp_path))
    signals.install_handlers()
    assert not signals.stop_requested()  # poll 1: no pause
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    t0 = time.monotonic()
    assert signals.stop_requested()      # poll 2: pauses until the signal
    assert time.monotonic() - t0 >= 0.25
    assert (tmp_path / "paused.rank0").exists()
    signals.reset()
    assert not signals.stop_requested() and not signals.stop_requested()  # marker exists: no second pause


def test_sigusr1_does_not_kill_a_process_with_handlers():
    """Default SIGUSR1 action is to terminate; with the handlers the process checkpoints instead."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        from xpert_dist.launch import signals
        signals.install_handlers()
        os.kill(os.getpid(), signal.SIGUSR1)
        for step in range(100):
            time.sleep(0.01)
            if signals.stop_requested():
                try:
                    raise signals.Preempted(step=step)
                except signals.Preempted as e:
                    print("preempted at", e.step, "signal", e.signum)
                    sys.exit(signals.exit_code(e))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75, proc.stderr
    assert "preempted at 0 signal 10" in proc.stdout
    assert "received SIGUSR1" in proc.stderr
