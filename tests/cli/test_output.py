"""Suggested commands are printed whole: rich never wraps them mid-command, whatever their length."""

from __future__ import annotations

import io

from rich.console import Console

from hpi.cli import main
from hpi.cli.output import say_command


def test_plan_prints_its_explain_command_on_one_line(capsys):
    # 160 characters: at the console's fixed width rich used to break it before --pin-memory
    assert main(["plan", "--model", "llama-3-70b", "--hardware", "a6000-workstation", "--top", "8"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("why #1 wins")]
    assert lines == ["why #1 wins and what would change it: hpi explain --model llama-3-70b --hardware "
                     "a6000-workstation --offload none --tp 1 --pp 1 --dp 1 --quant-bits 4 --batch 1 --pin-memory"]


def test_a_long_command_is_neither_wrapped_nor_read_as_markup():
    buffer = io.StringIO()
    command = "hpi plan --model /data/[weird]/" + "m" * 300 + "/config.json --hardware profiles/x.yaml"
    say_command(Console(file=buffer, width=40), "plan on it: " + command)
    assert buffer.getvalue() == "plan on it: " + command + "\n"
