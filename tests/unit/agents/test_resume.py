"""The order of the steps that end a recovery, and the active-partition view aiokafka reads."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from agents.resume import _Active, _on_recovery_completed, seek_before_resume
from finflow.app import app


class Steps:
    """Records which step of ending a recovery ran, in order."""

    def __init__(self) -> None:
        self.done: list[str] = []

    def step(self, name: str, result: Any = None) -> Any:
        def run(*_: Any, **__: Any) -> Any:
            self.done.append(name)
            return result

        return run

    def async_step(self, name: str) -> Any:
        async def run(*_: Any, **__: Any) -> None:
            self.done.append(name)
            await asyncio.sleep(0)  # a real await: other tasks may run here

        return run


def _recovery(steps: Steps) -> Any:
    stream, changelog = ("transactions", 0), ("app-accounts-changelog", 0)
    consumer = SimpleNamespace(
        assignment=steps.step("assignment", {stream, changelog}),
        perform_seek=steps.async_step("seek"),
        resume_partitions=lambda tps: steps.done.append(f"resume {sorted(tps)}"),
        resume_flow=steps.step("resume flow"),
    )
    the_app = SimpleNamespace(
        consumer=consumer,
        consumer_generation_id=3,
        conf=SimpleNamespace(broker_request_timeout=30.0),
        on_rebalance_complete=SimpleNamespace(send=steps.async_step("rebalance complete")),
        flow_control=SimpleNamespace(resume=steps.step("clear buffers")),
        _fetcher=SimpleNamespace(maybe_start=steps.async_step("fetcher")),
        assignor=SimpleNamespace(assigned_standbys=steps.step("standbys", set())),
        on_rebalance_end=steps.step("rebalance end"),
    )

    async def wait(coro: Any, timeout: float | None = None) -> None:
        await coro

    return SimpleNamespace(
        app=the_app,
        log=SimpleNamespace(info=steps.step("log"), warning=steps.step("warn")),
        tables=SimpleNamespace(
            values=list,  # no tables: their own recovery callbacks are Faust's
            on_actives_ready=steps.step("actives ready"),
            on_standbys_ready=steps.step("standbys ready"),
        ),
        _set_recovery_ended=steps.step("ended"),
        _is_changelog_tp=lambda tp: tp == changelog,
        _wait=wait,
        completed=SimpleNamespace(set=steps.step("completed")),
    )


def test_streams_resume_after_the_seek_and_right_after_the_clear() -> None:
    steps = Steps()
    asyncio.run(_on_recovery_completed(_recovery(steps), generation_id=3))
    done = [s for s in steps.done if s not in ("log", "assignment")]
    resume = done.index("resume [('transactions', 0)]")
    assert done.index("seek") < resume
    assert done[resume - 1] == "clear buffers"  # nothing can arrive between clear and resume
    assert done[-1] == "rebalance end"


def test_a_stale_generation_resumes_nothing() -> None:
    steps = Steps()
    asyncio.run(_on_recovery_completed(_recovery(steps), generation_id=2))
    assert "seek" not in steps.done
    assert not [s for s in steps.done if s.startswith("resume")]


def test_the_active_view_is_never_every_partition() -> None:
    live: set[str] = set()
    view = _Active(live)
    assert view  # aiokafka's ``if partitions and tp not in partitions`` filters by it
    assert "t-0" not in view
    live.add("t-0")  # Faust resumes a partition while a fetch waits
    assert "t-0" in view


def test_the_worker_app_gets_both_fixes_once() -> None:
    import agents.ingest  # noqa: F401 - applies them at import

    recovery: Any = app.tables.recovery  # type: ignore[attr-defined]
    wrapped = app.consumer._thread._fetch_records  # type: ignore[attr-defined]
    assert recovery.on_recovery_completed.seeks_first
    seek_before_resume(app)
    assert app.consumer._thread._fetch_records is wrapped  # type: ignore[attr-defined]
