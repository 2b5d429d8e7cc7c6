"""The wait policy chosen before torch loads: passive when other processes keep the cores busy."""

import subprocess
import sys

import mtbert.threads as threads


def test_busy_cores_sees_a_competing_process():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        threads.busy_cores(0.2)  # let it start
        assert threads.busy_cores(0.3) >= threads.BUSY_CORES
    finally:
        busy.kill()
        busy.wait()


def test_policy_is_passive_only_on_a_busy_machine_and_never_overrides_the_user(monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.7)
    env = {}
    assert threads.choose_wait_policy(env) == "PASSIVE" and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for own in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}):
        env = dict(own)
        assert threads.choose_wait_policy(env) is None and env == own
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.1)
    env = {}
    assert threads.choose_wait_policy(env) is None and env == {}
    monkeypatch.setattr(threads, "busy_cores", lambda: None)  # no /proc/stat
    assert threads.choose_wait_policy(env) is None and env == {}
