"""What the dashboard says: step states of a sign-in, times in words, VM actions (pure functions)."""

from __future__ import annotations

import datetime as dt

import pytest

from remotecli.web.views import ago, auth_steps, relative, vm_actions


def _states(status: str, **kwargs: object) -> list[str]:
    return [step.state for step in auth_steps(status, **kwargs)]  # type: ignore[arg-type]


def test_steps_follow_the_session() -> None:
    assert _states("pending", cli_ready=False) == ["active", "active", "todo", "todo", "todo"]
    assert _states("provisioning", cli_ready=True) == ["done", "active", "todo", "todo", "todo"]
    assert _states("awaiting_user", cli_ready=True) == ["done", "done", "active", "todo", "todo"]
    assert _states("exchanging", cli_ready=True) == ["done", "done", "done", "active", "todo"]
    assert _states("transferring", cli_ready=False) == ["done", "done", "done", "active", "todo"]
    assert _states("completed", cli_ready=False) == ["done"] * 5


@pytest.mark.parametrize(("ended_from", "cli_ready", "expected"), [
    ("awaiting_user", True, ["done", "done", "failed", "todo", "todo"]),
    ("exchanging", True, ["done", "done", "done", "failed", "todo"]),
    ("provisioning", True, ["done", "failed", "todo", "todo", "todo"]),
    ("provisioning", False, ["failed", "todo", "todo", "todo", "todo"]),
    (None, False, ["failed", "todo", "todo", "todo", "todo"]),
    ("bogus", False, ["failed", "todo", "todo", "todo", "todo"]),
])
def test_an_ended_session_marks_the_step_it_was_on(ended_from: str | None, cli_ready: bool,
                                                   expected: list[str]) -> None:
    for status in ("failed", "expired", "cancelled"):
        assert _states(status, cli_ready=cli_ready, ended_from=ended_from) == expected


def test_labels_are_the_pages_words() -> None:
    assert [s.label for s in auth_steps("pending", cli_ready=False)] == [
        "Preparing your CLI workspace", "Starting a secure browser", "Log in below",
        "Saving credentials to your workspace", "Done"]


def test_times_in_words() -> None:
    now = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
    assert ago(now - dt.timedelta(seconds=5), now) == "less than a minute"
    assert ago(now - dt.timedelta(minutes=7), now) == "7 min"
    assert ago(now - dt.timedelta(hours=5), now) == "5 h"
    assert ago(now - dt.timedelta(days=3), now) == "3 days"
    assert relative(now + dt.timedelta(minutes=59, seconds=30), now) == "in 59 min"
    assert relative(now - dt.timedelta(hours=2), now) == "2 h ago"
    assert ago(None) == "" and relative(None) == ""


def test_vm_actions_follow_the_transition_table() -> None:
    assert vm_actions("running") == ["stop", "destroy"]
    assert vm_actions("paused") == ["stop", "resume", "destroy"]
    assert vm_actions("stopped") == ["resume", "destroy"]
    assert vm_actions("failed") == ["destroy"]
    assert vm_actions("starting") == ["destroy"]
    assert vm_actions("destroyed") == [] and vm_actions("destroying") == []


def test_browser_step_says_ready_at_once_with_a_warm_vm() -> None:
    steps = auth_steps("provisioning", cli_ready=False, browser_ready=True)
    assert [(s.key, s.label, s.state) for s in steps][:3] == [
        ("cli", "Preparing your CLI workspace", "active"),
        ("browser", "Secure browser ready", "done"),
        ("login", "Log in below", "todo"),
    ]
    # Without a running Browser VM the step stays truthful: still starting.
    assert auth_steps("provisioning", cli_ready=False)[1].state == "active"
