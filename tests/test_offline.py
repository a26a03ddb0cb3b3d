"""No Hub: every command that loads a model by hub id fails fast with one message that names the model and how to
pass a local folder (exit 2, no traceback, no token table), and no tokenizer without a vocabulary is used."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from attncontrol.errors import ModelLoadError
from attncontrol.hub import check_tokenizer

from .conftest import SUBPROCESS_TIMEOUT

MODEL = "some-org/any-id"


# A socket guard for the child: every connection attempt it makes is written to a file, so "fails fast" is shown
# by what did not happen (no retries, no second connection), not by a time a busy machine can exceed.
_GUARD = """
import os, socket
_log = os.environ["ATTNCONTROL_TEST_SOCKET_LOG"]
_connect = socket.socket.connect
def connect(self, address):
    with open(_log, "a") as fh:
        fh.write(repr(address) + "\\n")
    return _connect(self, address)
socket.socket.connect = connect
"""


def _cli(*args, env_extra=None, timeout=SUBPROCESS_TIMEOUT, guard_dir=None):
    """Run the CLI in a child; with ``guard_dir``, also return the connection attempts it made."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update({"PYTHONWARNINGS": "ignore", **(env_extra or {})})
    log = None
    if guard_dir is not None:
        guard_dir.mkdir(exist_ok=True)
        (guard_dir / "sitecustomize.py").write_text(_GUARD)
        log = guard_dir / "connections.log"
        log.write_text("")
        env["ATTNCONTROL_TEST_SOCKET_LOG"] = str(log)
        env["PYTHONPATH"] = os.pathsep.join([str(guard_dir), *filter(None, [env.get("PYTHONPATH")])])
    res = subprocess.run(
        [sys.executable, "-m", "attncontrol", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    return res, (log.read_text().splitlines() if log is not None else None)


def _batch_folder(tmp_path):
    """A minimal finished batch folder: one manifest record and its PNG."""
    out = tmp_path / "batch"
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / "a.png")
    record = {"key": "k1", "file": "a.png", "prompt": "a cat and a dog", "method": "none", "seed": 0}
    (out / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    return out


COMMANDS = {
    "tokens": lambda tmp: ["tokens", "a cat and a dog", "--model", MODEL],
    "generate": lambda tmp: [
        "generate",
        "a cat and a dog",
        "--subjects",
        "cat",
        "--model",
        MODEL,
        "--out",
        str(tmp / "x.png"),
    ],
    "eval": lambda tmp: ["eval", str(_batch_folder(tmp)), "--clip", MODEL],
    "ui": lambda tmp: ["ui", "--model", MODEL],
}


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable endpoint"])
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.slow
def test_each_command_fails_fast_with_the_offline_message(tmp_path, command, how):
    if command == "ui":
        pytest.importorskip("gradio")
    env = {"HF_HUB_OFFLINE": "1"} if how == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": "http://127.0.0.1:9"}
    res, connections = _cli(*COMMANDS[command](tmp_path), env_extra=env, guard_dir=tmp_path / "guard")
    assert res.returncode == 2, res.stderr
    assert MODEL in res.stderr
    assert ("--clip ./my-model" if command == "eval" else "--model ./my-model") in res.stderr
    assert "not reachable" in res.stderr and "Traceback" not in res.stderr
    assert "<|endoftext|>" not in res.stdout and "index" not in res.stdout  # no token table
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "batch" / "eval").exists()
    # offline: no connection at all; an unreachable Hub: the one probe of the README, no retries
    assert len(connections) == (0 if how == "HF_HUB_OFFLINE" else 1), connections


def test_an_empty_vocabulary_is_rejected_and_a_real_one_kept(tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    (tmp_path / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    empty = CLIPTokenizer(
        str(tmp_path / "vocab.json"),
        str(tmp_path / "merges.txt"),
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    assert set(empty("a cat", add_special_tokens=False).input_ids) == {empty.unk_token_id}  # the garbage
    with pytest.raises(ModelLoadError, match=r"some-org/any-id.*not reachable|some-org/any-id.*could not be fetched"):
        check_tokenizer(empty, MODEL)
    with pytest.raises(ModelLoadError, match="no real vocabulary.*vocabulary files"):
        check_tokenizer(empty, str(tmp_path))
    assert check_tokenizer(tokenizer, MODEL) is tokenizer


def test_what_transformers_returns_offline_is_rejected(monkeypatch):
    """The exact case of the report: transformers 5 hands back an empty CLIP tokenizer for a hub id offline."""
    from transformers import CLIPTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        returned = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    except OSError:
        pytest.skip("this transformers raises instead of returning an empty tokenizer")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        check_tokenizer(returned, MODEL)
