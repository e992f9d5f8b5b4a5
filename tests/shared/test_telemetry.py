"""No sdfleet process reports usage anywhere (shared/telemetry.py): processes that start as the worker, the
model tools' steps and the command line start, load and use the model stack (the tiny model loaded and run,
a model converted and its weights compressed) while every socket lookup, reverse lookup, connect and send is
audited (sys.addaudithook, in each Python process they start too: sitecustomize). An event aimed at anything
but loopback is recorded and refused before it happens: nothing leaves the machine, whatever the libraries try.

Each process gets a home of its own (no consent file of OpenVINO's: its default, reports) and none of the CI
variables that quiet OpenVINO's tools (CI, TF_BUILD, JENKINS_URL) or NNCF (NNCF_CI, NNCF_DEV), so the
opt-out is what is tested, not the machine. A process that opts back in (SDFLEET_LIBRARY_TELEMETRY=true)
is seen trying to report: the audit sees what it is meant to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT

AUDIT = '''
import ipaddress, json, os, sys, traceback

_OUT = os.environ["SDFLEET_TEST_NET_AUDIT"]
_LOOKUPS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"}
_SENDS = {"socket.connect", "socket.sendto", "socket.sendmsg"}


def _outside(host) -> bool:
    if host is None:
        return False
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).split("%")[0]
    if host in ("", "localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: a lookup that would leave the machine


def _audit(event, args):
    if event in _LOOKUPS:
        host = args[0]
    elif event == "socket.getnameinfo":
        host = args[0][0] if isinstance(args[0], tuple) else None
    elif event in _SENDS:
        address = args[1]
        if not isinstance(address, tuple):  # a Unix socket, or none
            return
        host = address[0]
    else:
        return
    if _outside(host):
        with open(_OUT, "a") as out:
            out.write(json.dumps({"pid": os.getpid(), "event": event, "host": str(host),
                                  "stack": "".join(traceback.format_stack(limit=25)[:-1])}) + "\\n")
        raise PermissionError(f"{event} {host!r}: nothing leaves this machine in this test")


sys.addaudithook(_audit)
'''

# Each starts with what the process it stands for imports first, then loads and uses the model stack.
WORKER = """
import worker  # `sdfleet worker`'s pool children and `python -m worker...` start here
import sys
from shared.settings import Settings
from worker.pipelines import ImageRequest, get_pipeline

pipe = get_pipeline(Settings(model=sys.argv[1], cache_dir=sys.argv[2]))  # loaded and warmed up, as at start
image = pipe.generate(ImageRequest("a lighthouse", None, 64, 64, 2, 7.5, 7))
assert image.size == (64, 64)
"""
STEPS = """
import modeltools.steps  # `sdfleet model export` runs each step as `python -m modeltools.steps`
import nncf
import openvino as ov
import torch

model = ov.convert_model(torch.nn.Linear(64, 64), example_input=torch.zeros(1, 64))  # a conversion reports
compressed = nncf.compress_weights(model)  # and so does NNCF
assert compressed.get_parameters() is not None
"""
CLI = """
import sdfleet.cli  # the `sdfleet` command
import openvino  # reports itself at import
import optimum.intel
import nncf
"""
_QUIETING = ("CI", "TF_BUILD", "JENKINS_URL", "NNCF_CI", "NNCF_DEV", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK",
             "SDFLEET_LIBRARY_TELEMETRY")


def _run_audited(tmp_path: Path, code: str, *args: str, **env) -> list[dict]:
    """Run `code` in a fresh interpreter under the audit; the outside events it (or a child) attempted."""
    (tmp_path / "audit").mkdir(exist_ok=True)
    (tmp_path / "audit" / "sitecustomize.py").write_text(AUDIT)
    (tmp_path / "home").mkdir(exist_ok=True)
    events = tmp_path / "events.jsonl"
    events.write_text("")
    base = {k: v for k, v in os.environ.items() if k not in _QUIETING}
    env = {**base, "PYTHONPATH": f"{tmp_path / 'audit'}{os.pathsep}{ROOT}", "HOME": str(tmp_path / "home"),
           "SDFLEET_TEST_NET_AUDIT": str(events), "HF_HUB_OFFLINE": "1", **env}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in events.read_text().splitlines()]


def _shown(events: list[dict]) -> str:
    return "\n".join(f"{e['event']} {e['host']} (pid {e['pid']}):\n{e['stack']}" for e in events[:3])


def test_the_worker_loads_and_runs_the_model_without_a_word_to_anyone(tmp_path, tiny_model):
    events = _run_audited(tmp_path, WORKER, str(tiny_model), str(tmp_path / "cache"))
    assert events == [], _shown(events)
    assert not (tmp_path / "home" / "intel" / "openvino_ga_cid").exists()  # no client ID made either


def test_a_model_export_step_converts_and_compresses_without_a_word_to_anyone(tmp_path):
    events = _run_audited(tmp_path, STEPS)
    assert events == [], _shown(events)


@pytest.mark.parametrize("opted_in", [False, True], ids=["default", "opted-in"])
def test_the_command_line_imports_the_model_stack_without_a_word_to_anyone(tmp_path, opted_in):
    """Opted back in, the same process tries to report to an analytics host (refused here): what the
    default prevents."""
    env = {"SDFLEET_LIBRARY_TELEMETRY": "true"} if opted_in else {}
    events = _run_audited(tmp_path, CLI, **env)
    if opted_in:
        assert events and all(e["event"] == "socket.getaddrinfo" for e in events), _shown(events)
    else:
        assert events == [], _shown(events)


def test_a_variable_the_user_set_wins_and_opting_in_changes_nothing(monkeypatch):
    from shared.telemetry import opt_out

    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "0")
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    monkeypatch.setenv("SDFLEET_LIBRARY_TELEMETRY", "true")
    assert opt_out() is False and "DO_NOT_TRACK" not in os.environ
    monkeypatch.setenv("SDFLEET_LIBRARY_TELEMETRY", "false")
    assert opt_out() is True
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "0" and os.environ["DO_NOT_TRACK"] == "1"
