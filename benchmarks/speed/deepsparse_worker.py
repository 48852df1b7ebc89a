"""DeepSparse side of the speed benchmark: run with benchmarks/.venv-deepsparse/bin/python, driven by bench_speed.py.

DeepSparse 1.8.0 needs numpy<2 and onnx 1.14, so it lives in its own venv and process. Protocol: one JSON object
per line on stdin, one JSON reply per line on the original stdout (fd 1 is pointed at stderr first, so banners and
prints from the engine never corrupt the channel). Only the main process's request makes this process compute,
so the two never run at the same time. Standard library + numpy + deepsparse only.

Requests ({"op": ...}):
  hello                                   -> versions and the ISA DeepSparse detected
  load {key, path, batch, inputs, cores}  -> compile `path` for `batch` with `cores` cores, keep the npz `inputs`
  run {key}                               -> {"outputs": [[...]]}: the first output (logits) for the kept inputs
  time {key, iters}                       -> {"times": [seconds per call, ...]} measured here with perf_counter
  analyze {key, iters}                    -> per-layer timing from DeepSparse's debug-analysis engine
  unload {key} / quit
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _open_channel():
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


class Worker:
    def __init__(self):
        self.engines = {}  # key -> (engine, input list, path, batch, cores)

    def hello(self, req):
        import deepsparse
        import numpy
        import onnx
        from deepsparse.cpu import cpu_architecture

        arch = cpu_architecture()
        return {
            "deepsparse": deepsparse.__version__,
            "numpy": numpy.__version__,
            "onnx": onnx.__version__,
            "isa": str(getattr(arch, "isa", "?")),
            "vnni": bool(getattr(arch, "vnni", False)),
        }

    def load(self, req):
        import numpy as np
        from deepsparse import compile_model

        start = time.perf_counter()
        engine = compile_model(req["path"], batch_size=int(req["batch"]), num_cores=int(req["cores"]))
        compile_s = time.perf_counter() - start
        with np.load(req["inputs"], allow_pickle=False) as data:
            inputs = [data[name] for name in engine.input_names]
        self.engines[req["key"]] = (engine, inputs)
        return {
            "compile_s": compile_s,
            "fraction_of_supported_ops": float(getattr(engine, "fraction_of_supported_ops", float("nan"))),
            "num_cores": int(engine.num_cores),
            "input_names": list(engine.input_names),
        }

    def _get(self, req):
        try:
            return self.engines[req["key"]]
        except KeyError:
            raise KeyError(f"no engine loaded under key {req['key']!r}; send 'load' first") from None

    def run(self, req):
        engine, inputs = self._get(req)
        return {"outputs": engine.run(inputs)[0].tolist()}

    def time(self, req):
        engine, inputs = self._get(req)
        times = []
        for _ in range(int(req["iters"])):
            start = time.perf_counter()
            engine.run(inputs, val_inp=False)  # checked once by `run`
            times.append(time.perf_counter() - start)
        return {"times": times}

    def analyze(self, req):
        """Per-layer times from DeepSparse's debug-analysis engine (a second compile of the same file).

        The layer list is flattened; its times add up to `average_total_ms`. `canonical_name` lists the ONNX
        outputs a fused layer computes, which is how the main process tells Linear layers from attention.
        """
        from deepsparse import model_debug_analysis

        _, inputs = self._get(req)
        result = model_debug_analysis(
            req["path"],
            inputs,
            batch_size=int(req["batch"]),
            num_cores=int(req["cores"]),
            num_iterations=int(req["iters"]),
            num_warmup_iterations=2,
        )

        def flat(layers):
            for layer in layers:
                yield layer
                yield from flat(layer.get("sub_layer_info") or [])

        layers = [
            {
                "name": layer.get("name", ""),
                "canonical_name": layer.get("canonical_name", ""),
                "ms": float(layer.get("average_run_time_in_ms", 0.0)),
                "kernel_sparsity": float(layer.get("kernel_sparsity", 0.0)),
            }
            for layer in flat(result.get("layer_info") or [])
        ]
        return {"average_total_ms": float(result.get("average_total_time", 0.0)), "layers": layers}

    def unload(self, req):
        self.engines.pop(req["key"], None)
        return {}


def main():
    channel = _open_channel()
    worker = Worker()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "quit":
                channel.write(json.dumps({"ok": True}) + "\n")
                break
            handler = (
                getattr(worker, op, None) if op in ("hello", "load", "run", "time", "analyze", "unload") else None
            )
            if handler is None:
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, **handler(req)}
        except Exception as e:  # reported to the main process, which raises with this text
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        channel.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
