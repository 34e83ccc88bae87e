"""Export: throughput of the exported pt2 and ONNX models against the eager stitched model.

    .venv/bin/python bench/export.py [--configs 64x32,224x8] [--repeats 5] [--threads 1]

Per config SIZExBATCH: 16 JPEGs extracted at SIZE px (random-init VGG16, fc7), a linear head
trained on them for one epoch, then `export()` to .pt2 and to .onnx (parity check on). Timed on
the same random batch of BATCH images in [0, 1], alternating, after one warm-up call each:

  eager  build_backbone + load_head, head(backbone(x)) under torch.no_grad (what export stitches)
  pt2    pipeline.models.load_model(MODEL.pt2).run: torch.export.load(...).module(), no_grad
  onnx   onnxruntime InferenceSession, CPUExecutionProvider, as pipeline.models.load_model
         opens it but with intra_op_num_threads = torch's threads (a fair core count)

Also the largest logit difference of each against eager on that batch, and export seconds.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])   # the repo, not bench/, on the path
import torch  # noqa: E402

from bench._common import (alternate, bench_parser, apply_threads, machine,  # noqa: E402
                           median, paired, quiet, scratch, spread, table)
from bench.extract import make_images  # noqa: E402
from pipeline import ExtractConfig, extract  # noqa: E402
from pipeline.backbone import build_backbone  # noqa: E402
from pipeline.config import ExportConfig, TrainConfig  # noqa: E402
from pipeline.export import export  # noqa: E402
from pipeline.head_file import load_head  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.train_head import train_head  # noqa: E402


def bench_config(tmp: Path, src: Path, size: int, batch: int, repeats: int) -> list[list]:
    """Rows of the table for one input size and batch."""
    cache = tmp / f"cache{size}.h5"
    extract(src, cache, ExtractConfig(weights="none", image_size=size, batch_size=16,
                                      overwrite=True, progress=False))
    run = Path(train_head(cache, tmp / f"runs{size}", TrainConfig(epochs=1, val_fraction=0.0)
                          ).best_path)
    models, export_s = {}, {}
    for fmt, suffix in (("pt2", ".pt2"), ("onnx", ".onnx")):
        t0 = time.perf_counter()
        export(run, tmp / f"model{size}{suffix}", ExportConfig(format=fmt))
        export_s[fmt] = time.perf_counter() - t0
        models[fmt] = load_model(tmp / f"model{size}{suffix}").run
    models["onnx"] = _onnx_session(tmp / f"model{size}.onnx")
    backbone, _ = build_backbone("vgg16", "none", "fc7", size)
    head, _ = load_head(run)

    def eager(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return head(backbone(x))

    models = {"eager": eager, **models}
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    logits = {name: fn(x) for name, fn in models.items()}             # warm-up, and outputs
    times = alternate({name: _call(fn, x) for name, fn in models.items()}, repeats)
    rows = []
    for name, ts in times.items():
        diff = float((logits[name] - logits["eager"]).abs().max())
        rows.append([f"{size}px, batch {batch}", name, median(ts), batch / median(ts),
                     paired(times, "eager", name), spread(ts), f"{diff:.1e}",
                     f"{export_s[name]:.1f}" if name in export_s else "-"])
    return rows


def _onnx_session(path: Path):
    """What load_model's ONNX runner does, with onnxruntime's intra-op threads set to torch's
    (load_model keeps onnxruntime's default, one per physical core), so both use as many cores."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy().astype(np.float32)})[0])
    return run


def _call(fn, x):
    def case() -> None:
        fn(x)
    return case


def main() -> None:
    ap = bench_parser(__doc__, repeats=5)
    ap.add_argument("--configs", default="64x32,224x8", help="SIZExBATCH, comma-separated")
    args = ap.parse_args()
    apply_threads(args)
    quiet()
    torch.manual_seed(0)
    tmp = scratch("bench-export-")
    make_images(tmp / "images", 16)
    rows = []
    for spec in args.configs.split(","):
        size, batch = (int(v) for v in spec.lower().split("x"))
        rows += bench_config(tmp, tmp / "images", size, batch, args.repeats)
    import onnxruntime as ort

    print(f"machine: {machine()}; onnxruntime {ort.__version__} (CPUExecutionProvider, "
          f"{torch.get_num_threads()} intra-op threads)")
    print(f"random-init VGG16 fc7 + linear head (4 classes); the same batch for every model; "
          f"{args.repeats} alternated calls after one warm-up: medians, 'vs eager' the median of "
          "per-round ratios\n")
    print(table(["input", "model", "s / batch", "images/s", "vs eager", "spread s",
                 "max |logit - eager|", "export s"], rows))


if __name__ == "__main__":
    main()
