"""The README's walk-through commands and Python examples, run as written on tiny data.

Each test reads README.md itself, so an example that stops working, or a README edit that
breaks one, fails here. The only changes made to what the README says: extraction uses
random-init weights at 32 px without decoding processes (no network, a CPU), and
`<best-run-id>` is the sweep's best run.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import main

from .conftest import make_folder

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
OFFLINE = ["--weights", "none", "--image-size", "32", "--workers", "0"]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def _walk_through() -> list[list[str]]:
    """The commands of the walk-through's block, as argument lists without `pipeline`."""
    section = README[README.index("## Walk-through"):]
    block = re.search(r"^```bash\n(.*?)^```", section, flags=re.S | re.M).group(1)
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert commands and all(c[0] == "pipeline" for c in commands), block
    return [c[1:] for c in commands]


def _python_spans() -> list[str]:
    """The inline `pipeline.X.Y(...)` calls that follow a "From Python:"."""
    spans = []
    for part in README.split("From Python:")[1:]:
        spans += re.findall(r"`(pipeline\.\w+\.\w+\([^`]*\)[^`]*)`", part[:400].replace("\n", " "))
    return spans


def _invoke(args: list[str]):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, (args, result.output)
    return result


@pytest.fixture
def photos(tmp_path, monkeypatch):
    """The walk-through's folders, in the working directory the commands run in."""
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "photos", classes=("cat", "dog"), per_class=6, size=(40, 48))
    make_folder(tmp_path / "new-photos", classes=("unsorted",), per_class=3, size=(50, 40), seed=1)
    return tmp_path


def test_the_readme_has_what_these_tests_run():
    assert [c[0] for c in _walk_through()] == ["extract", "inspect", "train-head", "report",
                                               "export", "predict"]
    assert len(_blocks("python")) == 1
    assert len(_python_spans()) == 4, _python_spans()


def test_the_walk_through_then_the_python_api(photos):
    best = None
    for args in _walk_through():
        if args[0] == "extract":
            args = [*args, *OFFLINE]
        if args[0] == "train-head":
            args = [*args, "--json"]
        args = [a.replace("<best-run-id>", best or "<no sweep yet>") for a in args]
        result = _invoke(args)
        if args[0] == "train-head":
            best = Path(json.loads(result.output)["best_path"]).name
    assert (photos / "runs" / best / "head.pt").is_file()
    assert (photos / "runs" / "report" / "report.md").is_file()
    printed = result.output                          # predict's table, top 3 of 2 classes
    assert sum(f"unsorted/{i:03d}.png" in printed for i in range(3)) == 3, printed

    # The Python API forms the README gives, after nothing more than importing the stages.
    import pipeline.export
    import pipeline.predict
    import pipeline.report
    from pipeline import ExportConfig, PredictConfig, ReportConfig
    x = torch.rand(2, 3, 32, 32)
    names = {"pipeline": pipeline, "ExportConfig": ExportConfig, "PredictConfig": PredictConfig,
             "ReportConfig": ReportConfig, "run_dir": f"runs/{best}", "path": "model.pt2",
             "x": x, "folder": "new-photos", "runs_dir": "runs", "out_dir": "report-py"}
    spans = _python_spans()
    export_call = spans[0].replace('"model.pt2"', '"model-py.pt2"')
    summary = eval(export_call, names)
    assert Path(summary.path).name == "model-py.pt2" and Path("model-py.pt2").is_file()
    logits = eval(spans[1], names)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    # The exported file the walk-through wrote and the one written from Python agree.
    assert torch.equal(logits, pipeline.export.load_model("model-py.pt2").run(x))
    result = eval(spans[2], names)
    assert len(result.predictions) == 3 and all(len(p["top"]) == 2 for p in result.predictions)
    eval(spans[3], names)
    assert Path("report-py/report.md").is_file()
    # The package's own verbs are the same calls.
    assert pipeline.export.export is pipeline.export.__dict__["export"]
    assert callable(pipeline.export) and callable(pipeline.predict)


def test_the_python_block(photos):
    (code,) = _blocks("python")
    assert "ExtractConfig(" in code
    code = code.replace("ExtractConfig(", 'ExtractConfig(weights="none", workers=0, '
                        "progress=False, ").replace("image_size=128", "image_size=32")
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)
    assert names["X"].shape == (12, 4096) and names["X"].dtype == "float32"
    assert sorted(names["y"].tolist()) == [0] * 6 + [1] * 6
    assert names["summary"].rows == 12
