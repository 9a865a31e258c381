"""``coding-gym doctor``: the report of this machine, and the checks behind it."""

from __future__ import annotations

import json

import pytest

from coding_gym import doctor
from coding_gym.cli import main
from coding_gym.models import Isolation


@pytest.fixture(scope="module")
def diagnosis() -> doctor.Diagnosis:
    return doctor.diagnose(timing_rounds=0)


def test_every_layer_is_reported_and_every_active_one_holds(diagnosis):
    assert diagnosis.error is None
    assert [layer.name for layer in diagnosis.layers] == list(doctor.LAYERS)
    for layer in diagnosis.layers:
        assert layer.detail
        assert layer.holds is (True if layer.active else None), layer
    assert diagnosis.status in (0, 1)


def test_unavailable_layers_come_with_advice(diagnosis):
    unavailable = [layer for layer in diagnosis.layers if not layer.active]
    assert bool(diagnosis.advice) == bool(unavailable)
    assert diagnosis.status == (1 if unavailable else 0)


def test_text_report_lists_each_layer_and_a_result(diagnosis):
    text = doctor.format_text(diagnosis)
    for name in doctor.LAYERS:
        assert f"  {name}" in text
    assert "Result: " in text


def test_layers_turned_off_are_not_called_unavailable():
    diagnosis = doctor.diagnose(Isolation.none(), timing_rounds=0)
    assert all(not layer.active and layer.detail == "turned off" for layer in diagnosis.layers)
    assert diagnosis.status == 0 and diagnosis.advice == []


def test_cli_prints_json_and_returns_the_status(capsys):
    status = main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == report["status"] in (0, 1)
    assert {layer["name"] for layer in report["layers"]} == set(doctor.LAYERS)
    assert set(report["reset_ms"]) == {"with isolation", "without"}


@pytest.mark.parametrize(("check", "facts", "holds"), [
    (doctor._check_network, {"interfaces": ["lo", "eth0"], "inet_socket": "allowed"}, False),
    (doctor._check_network, {"interfaces": ["lo"], "inet_socket": "allowed"}, True),
    (doctor._check_filesystem, {"write_etc": "allowed", "write_workdir": "allowed",
                                "processes_visible": 3}, False),
    (doctor._check_user, {"uid": 0, "parent_environ": "allowed"}, False),
    (doctor._check_seccomp, {"ptrace": "No such process"}, False),
    (doctor._check_cgroup, {"in_cgroup": False}, False),
])
def test_a_layer_that_does_not_hold_is_caught(check, facts, holds):
    assert check(facts, doctor.Limits())[0] is holds


def test_a_broken_layer_makes_the_status_2():
    broken = doctor.Diagnosis(
        layers=[doctor.Layer("seccomp", True, True, "denied: ...", holds=False, check="x")],
        machine={"kernel": "k", "uid": 0, "python": "p", "container": False})
    assert broken.status == 2
    assert "DOES NOT HOLD" in doctor.format_text(broken)
