"""``finflow loadgen`` refuses flags that cannot make the stream asked for, with one line
naming the flag and exit code 2 (before: a traceback for ``--accounts 0``, an empty run with
exit 0 for ``--rate 0``, and ratios beyond 0..1 taken as 0 or 1)."""

from __future__ import annotations

import pytest

from finflow import cli


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--accounts", "0"], "--accounts"),
        (["--rate", "0"], "--rate"),
        (["--rate", "-5"], "--rate"),
        (["--rate", "nan"], "--rate"),
        (["--duration", "0"], "--duration"),
        (["--bad-ratio", "1.5"], "--bad-ratio"),
        (["--dup-ratio", "-0.1"], "--dup-ratio"),
        (["--keyless-ratio", "2"], "--keyless-ratio"),
        (["--disorder", "-1"], "--disorder"),
    ],
)
def test_a_bad_flag_fails_with_one_line_naming_it(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["loadgen", *flags])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"finflow loadgen: error: argument {named}:")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rate", "0.5", "--duration", "1"], "at least one record"),
        (["--bad-ratio", "0.6", "--dup-ratio", "0.6"], "add up to at most 1"),
    ],
)
def test_flags_that_together_make_no_stream_fail(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["loadgen", *flags]) == 2
    assert message in capsys.readouterr().err


def test_good_flags_parse() -> None:
    args = cli._parser().parse_args(
        ["loadgen", "--rate", "250", "--duration", "2", "--accounts", "1", "--bad-ratio", "1"]
    )
    assert (args.rate, args.duration, args.accounts, args.bad_ratio) == (250.0, 2.0, 1, 1.0)
