"""The command line: answers --help and usage errors without importing torch, prints user
mistakes as one line, and keeps the traceback of anything else (a bug)."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cache.errors import UserError
from cli.main import COMMANDS, main

from .conftest import one_line

# Runs the CLI in a fresh interpreter and prints which heavy modules it imported.
_PROBE = """
import json, sys
from cli.main import main
try:
    main(sys.argv[1:], prog_name="pipeline")
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "torchvision", "sklearn",
                                                            "matplotlib") if m in sys.modules)}))
"""


def _probe(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["--version"]]
                         + [[c.name, "--help"] for c in COMMANDS]
                         + [["extract"], ["train-head", "x.h5", "-o", "r", "--max-memory", "1.2.3G"],
                            ["no-such-command"]])
def test_help_and_usage_errors_do_not_import_torch(args):
    result = _probe(*args)
    assert result["heavy"] == [], f"{args} imported {result['heavy']}"
    assert result["code"] in (0, 2, None)


@pytest.mark.parametrize("value", ["1.2.3G", ".", "-5", "0", "12Q"])
def test_bad_max_memory_is_a_usage_error(tmp_path, value):
    cache = tmp_path / "c.h5"
    cache.write_bytes(b"")
    result = CliRunner().invoke(main, ["train-head", str(cache), "-o", str(tmp_path / "r"),
                                       "--max-memory", value])
    assert result.exit_code == 2, result.output
    assert "--max-memory" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("value, size", [("4G", 4 * 2**30), ("512M", 512 * 2**20),
                                         ("1.5GiB", int(1.5 * 2**30)), (".5k", 512),
                                         ("1000000", 1000000)])
def test_max_memory_sizes(monkeypatch, tmp_path, value, size):
    seen = {}

    def fake_train_head(train, runs_dir, config, **kwargs):
        seen["max_memory"] = config.max_memory
        raise UserError("stop here")

    monkeypatch.setattr(importlib.import_module("pipeline.train_head"), "train_head", fake_train_head)
    cache = tmp_path / "c.h5"
    cache.write_bytes(b"")
    result = CliRunner().invoke(main, ["train-head", str(cache), "-o", str(tmp_path / "r"),
                                       "--max-memory", value])
    assert result.exit_code == 1 and "Error: stop here" in result.output
    assert seen["max_memory"] == size


def _fail_extract(exc: Exception):
    def fake(source, output, config):
        raise exc
    return fake


def test_user_error_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.import_module("pipeline.extract"), "extract",
                        _fail_extract(UserError("the problem: the fix")))
    result = CliRunner().invoke(main, ["extract", str(tmp_path), "-o", str(tmp_path / "c.h5")])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: the problem: the fix"


@pytest.mark.parametrize("exc", [ValueError("internal"), KeyError("k"), RuntimeError("bug")])
def test_other_exceptions_keep_their_traceback(monkeypatch, tmp_path, exc):
    monkeypatch.setattr(importlib.import_module("pipeline.extract"), "extract", _fail_extract(exc))
    with pytest.raises(type(exc)):
        CliRunner().invoke(main, ["extract", str(tmp_path), "-o", str(tmp_path / "c.h5")],
                           catch_exceptions=False)


@pytest.mark.parametrize("command", ["export", "predict"])
@pytest.mark.parametrize("output, words", [
    ("", "is empty: give a file name"),
    ("newdir/", "newdir/ is a folder: give a file name in it, such as newdir/"),
    ("existing", "existing is a folder: give a file name in it, such as existing/"),
])
def test_an_output_file_that_is_empty_or_a_folder_is_a_usage_error(tmp_path, monkeypatch,
                                                                  command, output, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    (tmp_path / "model.pt2").write_bytes(b"")
    args = (["export", "runs/x", "-o", output] if command == "export"
            else ["predict", "model.pt2", "image.png", "-o", output])
    one_line(CliRunner().invoke(main, args), words, exit_code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "model.pt2"]


@pytest.mark.parametrize("command", ["train-head", "report"])
def test_an_empty_output_folder_is_a_usage_error(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.h5").write_bytes(b"")
    result = CliRunner().invoke(main, [command, "c.h5" if command == "train-head" else ".",
                                       "-o", ""])
    assert result.exit_code == 2, result.output
    assert "'-o' / '--output': is empty: give a folder" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]


def test_the_library_refuses_a_folder_as_the_model_file(tmp_path):
    from pipeline.config import ExportConfig
    from pipeline.export import export

    for output in (f"{tmp_path}/newdir/", str(tmp_path), ""):
        with pytest.raises(UserError, match="is a folder|is empty"):
            export(tmp_path / "no-head", output, ExportConfig())
    assert list(tmp_path.iterdir()) == []
