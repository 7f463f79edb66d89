"""`moeserve chaos`: every scenario is listed, and bad arguments are refused before anything starts."""

from __future__ import annotations

import pytest

from moeserve.chaos.scenarios import SCENARIOS
from moeserve.cluster.cli import main


def test_help_lists_every_scenario(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chaos", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SCENARIOS)


@pytest.mark.parametrize("argv,message", [
    (["chaos", "no-such-scenario"], "no-such-scenario"),
    (["chaos", "kill-controller", "--requests", "0"], "requests"),
    (["chaos", "kill-controller", "--faults", "-1"], "--faults"),
    (["chaos", "kill-controller", "--every", "-2"], "--every"),
])
def test_bad_arguments_exit_2(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
