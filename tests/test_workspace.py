import json
import os

import pytest
import torch

from hant.errors import HantError
from hant.workspace import (load_safetensors, read_json, run_lock, save_safetensors, sha256_file,
                            write_json)


def test_write_json_atomic_and_versioned(tmp_path):
    p = write_json(tmp_path / "a" / "x.json", {"k": 1})
    assert json.loads(p.read_text()) == {"version": 1, "k": 1}
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]  # no temporary left behind


def test_read_json_corrupt(tmp_path):
    (tmp_path / "x.json").write_text('{"k": ')
    with pytest.raises(HantError, match="corrupt"):
        read_json(tmp_path / "x.json")


def test_safetensors_checksum_detects_alteration(tmp_path):
    f = tmp_path / "w.safetensors"
    digest = save_safetensors(f, {"w": torch.arange(10.0)})
    assert digest == sha256_file(f)
    assert torch.equal(load_safetensors(f, digest)["w"], torch.arange(10.0))
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(HantError, match="checksum"):
        load_safetensors(f, digest)


def test_lock_refuses_live_holder_and_takes_over_stale(tmp_path):
    with run_lock(tmp_path):
        assert (tmp_path / ".lock").exists()
    assert not (tmp_path / ".lock").exists()
    # A live process (our parent) holding the lock blocks us.
    import socket
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(HantError, match="in use"):
        with run_lock(tmp_path):
            pass
    # A dead pid is stale and is taken over.
    (tmp_path / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    msgs = []
    with run_lock(tmp_path, log=msgs.append):
        pass
    assert msgs and "stale" in msgs[0]
