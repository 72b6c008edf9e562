"""What every benchmark's result file records about the command that made it (bench/__init__.py)."""

from __future__ import annotations

import shlex
import sys

from bench import command_line


def test_the_command_is_the_arguments_as_given_and_pastes_back_into_a_shell(monkeypatch):
    given = ["--trace", "/a b/trace.json", "--trace", "t2.json", "--synthetic", "19.7:32"]
    monkeypatch.setattr(sys, "argv", ["/x/bench/gpu.py", *given])
    line = command_line("bench.gpu")
    assert shlex.split(line) == ["python3", "-m", "bench.gpu", *given]  # lists stay repeated flags, spaces quoted
    assert command_line("bench.tp_passes", ["--world", "2"]) == "python3 -m bench.tp_passes --world 2"
