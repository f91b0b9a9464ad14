"""The benchmark suite: ``mlflow.chimera`` against ``mlflow.pytorch`` and ``mlflow.onnx``.

One entry point, ``python -m benchmarks.run`` (see ``benchmarks/run.py``); results go to a JSON
file and a Markdown table, from which ``BENCHMARKS.md`` and the README's performance section
are generated.
"""
