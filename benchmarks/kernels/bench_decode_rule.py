"""The decode layout rule (`pack_linear(workload="decode")`) against every int8 layout, side by side.

    taskset -c 0 python benchmarks/kernels/bench_decode_rule.py

Unstructured 80-90% weights of the BERT-base shapes, M = 1 and 2, 12 weights cycled per call (as a model's forward
cycles its layers), 1 thread, us per weight (best of 20); prints the layout the rule picks next to the times.
"""

from __future__ import annotations

import torch
from bench_csr import best  # same folder: the script's own directory is on sys.path

from hf_sparse import ops


LAYOUTS = ("int8_csr", "int8_dense", "int8_block4")
SHAPES = ((768, 768), (3072, 768), (768, 3072))
COPIES = 12


def main() -> None:
    ops.set_num_threads(1)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for n, k in SHAPES:
        for sparsity in (0.8, 0.85, 0.9):
            weights = [torch.randn(n, k) * (torch.rand(n, k) >= sparsity) for _ in range(COPIES)]
            packed = {layout: [ops.pack_linear(w, layout=layout) for w in weights] for layout in LAYOUTS}
            picked = ops.pack_linear(weights[0], workload="decode").layout.value
            for m in (1, 2):
                x = torch.randn(m, k)
                us = {
                    layout: best(lambda ps=ps, x=x: [p(x) for p in ps], 20) / COPIES * 1e6
                    for layout, ps in packed.items()
                }
                cells = " ".join(f"{layout} {t:.1f}" for layout, t in us.items())
                print(f"{n}x{k} {sparsity} M={m} decode-rule={picked} {cells}", flush=True)


if __name__ == "__main__":
    main()
