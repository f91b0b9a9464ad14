"""pyfunc ``predict`` latency: ``mlflow.chimera`` vs ``mlflow.pytorch``, same model, same host.

What it measures
----------------
One torch model (random weights, ``torch.manual_seed(0)``, eval mode) is logged twice into a
throw-away MLflow tracking store (``sqlite:///<tmp>/mlflow.db``, artifacts in the same temp
directory), both versions registered:

* ``mlflow.chimera.log_model(model, name=..., input_example=x, registered_model_name=...)``,
  which builds ONNX Runtime and eager variants, parity-checks and times them;
* ``mlflow.pytorch.log_model(model, name=..., input_example=x, serialization_format="pt2",
  registered_model_name=...)``. ``pt2`` (``torch.export``) is the format a security-minded user
  picks: MLflow loads it without unpickling arbitrary objects (pickle deserialization stays
  disallowed, MLflow's default), whereas ``"pickle"`` can run arbitrary code on load. Where the
  installed MLflow/torch do not support ``pt2`` the flavor's default is used and the output
  says so.

Both are loaded back with ``mlflow.pyfunc.load_model("models:/<name>/<version>")`` and their
``predict`` is timed on the same numpy array, per batch size. Timing is interleaved to resist
a noisy host: ``--rounds`` rounds, each calling every contender ``--calls`` times back to back,
the contender order rotating (and reversing) every round, GC off while timing. Before each
block the process pauses ``--settle-ms`` and makes ``--block-warmup`` untimed calls, so the worker
threads that ONNX Runtime and torch leave spinning after a call do not slow down the next
contender (on a 2-core host they otherwise inflate the p90 of whichever runs next up to ~3x).
The CPU time other processes use while timing is measured and reported; above 0.25 cores the
result is flagged as taken on a contended host (torch's OpenMP threads suffer badly when a
core is taken away, so such runs overstate chimera's lead).
Every call is timed on its own; the report gives the median and p90 per contender, the
ratio ``pytorch median / chimera median`` (> 1: chimera is faster), and the spread of that
ratio over rounds. Two in-process reference rows are timed in the same rounds for context
(``--no-reference`` drops them): the chimera variant's raw runner (``runner.run``, no pyfunc
layer) and the original eager torch module under ``torch.inference_mode``.

Both pyfunc predictions are compared with the eager torch module on the timed input (max abs
error), and the chimera variant that was chosen (and its precision) is reported: an ``int8``
variant is only held to the looser int8 parity tolerance (``--chimera-precision fp32`` restricts
chimera to fp32 variants for a like-for-like comparison).

Results are printed as a table and written as JSON (``--out``) with host information.

How to run
----------
From the repository root, with the project's virtualenv::

    python benchmarks/pyfunc_vs_mlflow_pytorch.py                 # CNN, batch 1 (~30 s on 2 cores)
    python benchmarks/pyfunc_vs_mlflow_pytorch.py --quick         # CNN, batch 1 (~20 s, well under 60)
    python benchmarks/pyfunc_vs_mlflow_pytorch.py --model mlp --batch 1 8 64
    python benchmarks/pyfunc_vs_mlflow_pytorch.py --model transformer --rounds 20 --calls 5

Models (``--model``): ``cnn`` (default; 4 × [Conv3x3 → BatchNorm → ReLU → MaxPool2] with 32, 64,
128, 128 channels on 3×64×64, global average pool, Linear → 10), ``mlp`` (784-512-512-10,
ReLU) and ``transformer`` (``nn.TransformerEncoder``: 4 layers, d_model 256, 4 heads, PyTorch's
default feed-forward width 2048, batch_first, on sequences of 128 tokens).

Both models are logged with the same ``input_example``, whose batch is the largest ``--batch``.
Note that ``torch.export`` (hence ``pt2``) specialises a batch of 1 to a constant, so with
``--batch 1`` the ``pt2`` model has a static batch of 1, while chimera always exports a dynamic
batch; the JSON records ``pytorch.dynamic_batch``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "pyfunc_vs_mlflow_pytorch.json"
SEED = 0

# Measurement presets: (rounds, calls per contender per round, warm-up rounds).
FULL = (30, 20, 3)
QUICK = (12, 10, 2)
# Background CPU use (cores) above which a result is flagged as taken on a contended host.
BUSY_HOST_CORES = 0.25
# --quick: cap chimera's log-time timing of each variant at this many seconds per batch size
# (its default is 1 s); the full run leaves chimera's defaults alone.
QUICK_CHIMERA_BENCH = {"max_seconds": 0.3}


# -- models ------------------------------------------------------------------------------------


def build_model(kind: str):
    """(model in eval mode, shape of one example without the batch dimension)."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    if kind == "cnn":

        class CNN(nn.Module):
            def __init__(self, channels=(32, 64, 128, 128), classes=10):
                super().__init__()
                layers, c_in = [], 3
                for c in channels:
                    layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                               nn.MaxPool2d(2)]
                    c_in = c
                self.features = nn.Sequential(*layers)
                self.head = nn.Linear(c_in, classes)

            def forward(self, image):
                return self.head(self.features(image).mean(dim=(2, 3)))

        model = CNN()
        with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is exercised
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        shape = (3, 64, 64)
    elif kind == "mlp":

        class MLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                         nn.Linear(512, 10))

            def forward(self, x):
                return self.net(x)

        model = MLP()
        shape = (784,)
    elif kind == "transformer":

        class Encoder(nn.Module):
            def __init__(self, d_model=256, heads=4, layers=4):
                super().__init__()
                layer = nn.TransformerEncoderLayer(d_model, heads, batch_first=True)
                self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

            def forward(self, tokens):
                return self.encoder(tokens)

        model = Encoder()
        shape = (128, 256)
    else:
        raise ValueError(f"unknown model {kind!r}")
    return model.eval(), shape


# -- host --------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def host_info() -> dict:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_num_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "onnxruntime", "mlflow", "numpy", "mlflow-chimera")},
        "loadavg_start": _loadavg(),
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION"),
    }


class BackgroundLoad:
    """CPU time other processes used while timing, in cores (busy CPU time from /proc/stat
    minus this process's own CPU time, per wall second). ``None`` where /proc/stat is missing."""

    def __enter__(self):
        self._start = self._snapshot()
        self.cores = None
        return self

    def __exit__(self, *exc):
        end = self._snapshot()
        if self._start and end:
            busy = end[0] - self._start[0]
            own = end[1] - self._start[1]
            wall = end[2] - self._start[2]
            self.cores = round(max(0.0, busy - own) / wall, 3) if wall > 0 else None

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = sum(values) - values[3] - values[4]  # all but idle and iowait; steal counts as busy
        t = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system, time.monotonic()


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- logging and loading -----------------------------------------------------------------------


def pytorch_serialization_format() -> tuple[str | None, str]:
    """(value to pass as ``serialization_format``, or None for the flavor default; why)."""
    import mlflow.pytorch
    import torch
    from packaging.version import Version

    if "serialization_format" not in inspect.signature(mlflow.pytorch.log_model).parameters:
        return None, "default (this MLflow has no serialization_format; pickle)"
    if Version(torch.__version__.split("+")[0]) < Version("2.4"):
        return None, "default (pt2 needs torch >= 2.4)"
    return "pt2", "pt2 (torch.export; loads without unpickling arbitrary objects)"


def setup_tracking(tmp: Path) -> str:
    import mlflow

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    artifacts = tmp / "artifacts"
    artifacts.mkdir()
    experiment_id = mlflow.create_experiment("pyfunc-vs-mlflow-pytorch", artifact_location=artifacts.as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    return uri


def log_both(model, example: np.ndarray, tag: str, quick: bool) -> dict:
    """Log and register the model with both flavors; {flavor: facts, incl. the models: URI}."""
    import mlflow
    import mlflow.chimera  # noqa: F401  (registers the flavor alias)
    import mlflow.pytorch

    out = {}
    name = f"{tag}-chimera"
    t0 = time.perf_counter()
    with mlflow.start_run(run_name=name):
        info = mlflow.chimera.log_model(
            model, name=name, input_example=example, registered_model_name=name,
            **({"benchmark": QUICK_CHIMERA_BENCH} if quick else {}),
        )
    out["chimera"] = {"uri": f"models:/{name}/{info.registered_model_version}",
                      "log_seconds": round(time.perf_counter() - t0, 2),
                      "log_time_benchmark": QUICK_CHIMERA_BENCH if quick else "default"}

    fmt, why = pytorch_serialization_format()
    name = f"{tag}-pytorch"
    t0 = time.perf_counter()
    with mlflow.start_run(run_name=name):
        info = mlflow.pytorch.log_model(
            model, name=name, input_example=example, registered_model_name=name,
            **({"serialization_format": fmt} if fmt else {}),
        )
    out["pytorch"] = {"uri": f"models:/{name}/{info.registered_model_version}",
                      "log_seconds": round(time.perf_counter() - t0, 2),
                      "serialization_format": fmt or "default",
                      "serialization_format_note": why,
                      # torch.export specialises a batch of 1 to the constant 1
                      "dynamic_batch": fmt != "pt2" or example.shape[0] > 1}
    return out


def load(uri: str, dst: Path, model_config: dict | None = None):
    import mlflow

    dst.mkdir(parents=True)
    t0 = time.perf_counter()
    model = mlflow.pyfunc.load_model(uri, dst_path=str(dst), model_config=model_config)
    return model, round(time.perf_counter() - t0, 3)


# -- timing ------------------------------------------------------------------------------------


def interleaved(contenders: dict, rounds: int, calls: int, warmup_rounds: int, settle_s: float,
                block_warmup: int) -> dict:
    """Time every contender ``calls`` times per round, rotating the order each round.

    Before each contender's block the process sleeps ``settle_s`` and makes ``block_warmup``
    untimed calls: ONNX Runtime's and torch's (OpenMP) worker threads keep spinning for a while
    after a call, and on a small host the previous contender's spinning threads would otherwise
    steal cores from the next one; a model served on its own never sees that.

    Returns ``{name: {"samples": [s, ...], "round_medians": [s, ...]}}`` (seconds).
    """
    names = list(contenders)
    clock = time.perf_counter
    out = {n: {"samples": [], "round_medians": []} for n in names}
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(-warmup_rounds, rounds):
            k = r % len(names)
            order = names[k:] + names[:k]
            if r % 2:  # alternate direction too, so no contender always follows the same one
                order.reverse()
            gc.collect()
            gc.disable()
            for n in order:
                fn = contenders[n]
                if settle_s:
                    time.sleep(settle_s)
                for _ in range(block_warmup):
                    fn()
                times = []
                for _ in range(calls):
                    t0 = clock()
                    fn()
                    times.append(clock() - t0)
                if r >= 0:
                    out[n]["samples"].extend(times)
                    out[n]["round_medians"].append(statistics.median(times))
            gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
    return out


def summarize(samples: list) -> dict:
    ms = np.asarray(samples) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p10_ms": float(np.percentile(ms, 10)),
        "min_ms": float(ms.min()),
        "mean_ms": float(ms.mean()),
        "n": int(ms.size),
    }


# -- main --------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("cnn", "mlp", "transformer"), default="cnn")
    p.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B",
                   help="batch sizes to time (default: 1)")
    p.add_argument("--rounds", type=int, help=f"timed rounds (default {FULL[0]}, quick {QUICK[0]})")
    p.add_argument("--calls", type=int,
                   help=f"calls per contender per round (default {FULL[1]}, quick {QUICK[1]})")
    p.add_argument("--warmup-rounds", type=int,
                   help=f"untimed rounds first (default {FULL[2]}, quick {QUICK[2]})")
    p.add_argument("--chimera-precision", choices=("auto", "fp32", "int8"), default="auto",
                   help="restrict chimera's variant choice (model_config precision); 'fp32' compares "
                        "like for like with the fp32 pytorch model (default: auto, the fastest valid)")
    p.add_argument("--settle-ms", type=float, default=20.0,
                   help="pause before each contender's block, so the previous one's worker threads "
                        "stop spinning (default 20)")
    p.add_argument("--block-warmup", type=int, default=1,
                   help="untimed calls at the start of each block (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds and a shorter chimera log-time benchmark "
                        "(well under a minute for the CNN)")
    p.add_argument("--no-reference", action="store_true",
                   help="time only the two pyfunc models (no raw-runner / eager-torch rows)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result (default {DEFAULT_OUT})")
    p.add_argument("-v", "--verbose", action="store_true", help="keep MLflow's and chimera's log output")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.rounds = args.rounds or preset[0]
    args.calls = args.calls or preset[1]
    args.warmup_rounds = preset[2] if args.warmup_rounds is None else args.warmup_rounds
    if min(args.batch) < 1 or args.rounds < 1 or args.calls < 1:
        p.error("--batch, --rounds and --calls must be positive")
    if args.settle_ms < 0 or args.block_warmup < 0 or args.warmup_rounds < 0:
        p.error("--settle-ms, --block-warmup and --warmup-rounds must not be negative")
    return args


def _quiet():
    """Silence MLflow's progress bars and INFO logs, and torch's export warnings. Call after
    importing mlflow and torch (importing them configures their loggers)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


@contextlib.contextmanager
def _captured_stderr(enabled: bool):
    """Hold back what MLflow prints to stderr while logging ("Successfully registered model
    ..."); replay it if something fails."""
    if not enabled:
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()

    import mlflow  # noqa: F401  (imported before _quiet(): importing it sets up its loggers)
    import torch

    if not args.verbose:
        _quiet()

    host = host_info()
    model, shape = build_model(args.model)
    rng = np.random.default_rng(SEED)
    batches = sorted(set(args.batch))
    inputs = {b: rng.standard_normal((b, *shape), dtype=np.float32) for b in batches}
    example = inputs[batches[-1]]

    result = {
        "benchmark": "pyfunc_vs_mlflow_pytorch",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "config": {"model": args.model, "input_shape": [-1, *shape], "batches": batches,
                   "example_batch": int(example.shape[0]), "rounds": args.rounds, "calls": args.calls,
                   "warmup_rounds": args.warmup_rounds, "settle_ms": args.settle_ms,
                   "block_warmup_calls": args.block_warmup, "chimera_precision": args.chimera_precision,
                   "quick": args.quick, "seed": SEED},
        "host": host,
    }

    with tempfile.TemporaryDirectory(prefix="chimera-bench-") as tmp:
        tmp = Path(tmp)
        result["tracking_uri"] = "sqlite:///<tmp>/mlflow.db"
        with _captured_stderr(not args.verbose):
            setup_tracking(tmp)
            logged = log_both(model, example, f"bench-{args.model}", args.quick)
            chimera, chimera_load = load(logged["chimera"]["uri"], tmp / "load-chimera",
                                         {"precision": args.chimera_precision})
            pytorch, pytorch_load = load(logged["pytorch"]["uri"], tmp / "load-pytorch")
        logged["chimera"]["load_seconds"], logged["pytorch"]["load_seconds"] = chimera_load, pytorch_load

        raw = chimera.get_raw_model()
        variant = raw.variant
        input_name = raw.signature.input_names[0]
        logged["chimera"].update({
            "variant": variant.id,
            "precision": variant.precision,
            "backend": variant.backend,
            "variant_log_time_p50_ms": {c.variant.id: c.p50_ms for c in raw.decision.candidates},
            "explain": raw.explain(),
        })
        result["models"] = logged

        result["results"] = []
        for b in batches:
            x = inputs[b]
            with torch.inference_mode():
                expected = model(torch.from_numpy(x)).numpy()
            predictions = {"chimera": np.asarray(chimera.predict(x)),
                           "pytorch": np.asarray(pytorch.predict(x))}
            accuracy = {n: float(np.max(np.abs(p.astype(np.float64) - expected)))
                        for n, p in predictions.items()}
            accuracy["reference_max_abs"] = float(np.max(np.abs(expected)))

            contenders = {"chimera": lambda: chimera.predict(x), "pytorch": lambda: pytorch.predict(x)}
            if not args.no_reference:
                feed = {input_name: x}
                tx = torch.from_numpy(x)

                def eager():
                    with torch.inference_mode():
                        return model(tx)

                contenders["chimera raw runner"] = lambda: raw.runner.run(feed)
                contenders["eager torch"] = eager
            with BackgroundLoad() as background:
                timed = interleaved(contenders, args.rounds, args.calls, args.warmup_rounds,
                                    args.settle_ms / 1e3, args.block_warmup)
            stats = {n: summarize(t["samples"]) for n, t in timed.items()}
            round_ratios = (np.asarray(timed["pytorch"]["round_medians"])
                            / np.asarray(timed["chimera"]["round_medians"]))
            result["results"].append({
                "batch": b,
                "latency": stats,
                "ratio_pytorch_over_chimera": stats["pytorch"]["median_ms"] / stats["chimera"]["median_ms"],
                "round_ratio": {"median": float(np.median(round_ratios)),
                                "p10": float(np.percentile(round_ratios, 10)),
                                "p90": float(np.percentile(round_ratios, 90)),
                                "chimera_faster_rounds": int((round_ratios > 1).sum()),
                                "rounds": int(round_ratios.size)},
                "max_abs_error_vs_eager": accuracy,
                "background_cpu_cores": background.cores,
            })

    host["loadavg_end"] = _loadavg()
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


def report(result: dict) -> None:
    cfg, host, models = result["config"], result["host"], result["models"]
    ch, pt = models["chimera"], models["pytorch"]
    v = host["versions"]
    print(f"pyfunc predict latency: mlflow.chimera vs mlflow.pytorch — model {cfg['model']} "
          f"{cfg['input_shape']}, {cfg['rounds']} rounds x {cfg['calls']} calls, interleaved, "
          f"{cfg['settle_ms']:g} ms settle"
          + (" (quick)" if cfg["quick"] else ""))
    print(f"host: {host['cpu_model']}, {host['cpu_count']} cpus, torch {v['torch']} "
          f"({host['torch_num_threads']} threads), onnxruntime {v['onnxruntime']}, mlflow {v['mlflow']}, "
          f"load avg {host['loadavg_start']} -> {host['loadavg_end']}")
    print(f"mlflow.pytorch serialization_format: {pt['serialization_format_note']}"
          + ("" if pt["dynamic_batch"] else "; static batch 1 (example batch 1)"))
    print(f"chimera variant: {ch['variant']} (precision {ch['precision']}); "
          f"log {ch['log_seconds']} s, load {ch['load_seconds']} s | pytorch log {pt['log_seconds']} s, "
          f"load {pt['load_seconds']} s")
    if ch["precision"] != "fp32":
        print(f"note: chimera runs a {ch['precision']} variant (held to the {ch['precision']} parity "
              f"tolerance) against the fp32 pytorch model; --chimera-precision fp32 compares like for like")
    print()
    header = f"{'batch':>5}  {'contender':<20} {'median ms':>10} {'p90 ms':>9} {'max abs err':>12}"
    print(header)
    print("-" * len(header))
    for r in result["results"]:
        for name, s in r["latency"].items():
            err = r["max_abs_error_vs_eager"].get(name)
            err_s = f"{err:12.2e}" if err is not None else f"{'-':>12}"
            print(f"{r['batch']:>5}  {name:<20} {s['median_ms']:10.3f} {s['p90_ms']:9.3f} {err_s}")
        rr = r["round_ratio"]
        print(f"{'':>5}  ratio pytorch/chimera (medians): {r['ratio_pytorch_over_chimera']:.2f}x; "
              f"per round: median {rr['median']:.2f}x [p10 {rr['p10']:.2f}, p90 {rr['p90']:.2f}], "
              f"chimera faster in {rr['chimera_faster_rounds']}/{rr['rounds']} rounds")
        load = r["background_cpu_cores"]
        if load is not None:
            print(f"{'':>5}  other processes used {load:.2f} of {host['cpu_count']} cores while timing"
                  + (" -- WARNING: contended host, latencies inflated" if load > BUSY_HOST_CORES else ""))
    print()
    print(f"wall time {result['wall_seconds']} s")


if __name__ == "__main__":
    main()
