"""Local table state: which partitions the changelog no longer backs, and whose it is."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from rocksdict import Options, Rdict

from finflow.app import create_app, settings
from finflow.errors import ConfigError
from finflow.local_state import ensure_data_dir, persisted_offsets, unbacked


def test_a_store_is_unbacked_when_its_offset_is_not_below_the_changelog_end() -> None:
    # Faust keeps the offset of the last changelog record a store holds; the end is the next.
    persisted = {0: 41, 1: 42, 2: 0, 3: 7}
    ends = {0: 42, 1: 42, 2: 0}  # partition 3: the changelog (or partition) does not exist
    assert unbacked(persisted, ends) == {1: (42, 42), 2: (0, 0), 3: (7, 0)}
    assert unbacked({0: 41}, {0: 100}) == {}


def test_persisted_offsets_are_read_from_each_partition_store(tmp_path: Path) -> None:
    for partition, offset in ((0, b"17"), (3, None)):
        db = Rdict(str(tmp_path / f"accounts-{partition}.db"), Options(raw_mode=True))
        db[b"acct-1"] = b"{}"
        if offset is not None:
            db[b"__faust\x00offset__"] = offset
        db.close()
    (tmp_path / "accounts-x.db").mkdir()  # not a partition store
    assert persisted_offsets(tmp_path, "accounts") == {0: 17}
    assert persisted_offsets(tmp_path, "other") == {}


def test_each_app_id_has_its_own_table_directory() -> None:
    one = create_app(replace(settings, app_id="one", data_dir="/srv/finflow"))
    two = create_app(replace(settings, app_id="two", data_dir="/srv/finflow"))
    assert str(one.conf.tabledir).startswith("/srv/finflow/one/")
    assert str(two.conf.tabledir).startswith("/srv/finflow/two/")


def test_the_data_directory_is_created_and_a_file_is_refused(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b"
    assert ensure_data_dir(str(nested)) == nested
    assert nested.is_dir()
    assert list(nested.iterdir()) == []  # the write probe leaves nothing behind
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for bad, reason in ((blocker, "File exists"), (blocker / "sub", "Not a directory")):
        with pytest.raises(ConfigError) as raised:
            ensure_data_dir(str(bad))
        assert str(raised.value) == f"FINFLOW_DATA_DIR={str(bad)!r} is invalid: {reason}"
    with pytest.raises(ConfigError, match=r"^FINFLOW_DATA_DIR='' is invalid: it is empty$"):
        ensure_data_dir("")
