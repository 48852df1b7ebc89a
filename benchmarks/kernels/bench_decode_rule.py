"""The decode layout rule (`pack_linear(workload="decode")`) against every int8 layout, side by side.

    taskset -c 0 python benchmarks/kernels/bench_decode_rule.py

Unstructured 80-90% weights of the BERT-base shapes, M = 1 and 2, 12 weights cycled per call (as a model's forward
cycles its layers), 1 thread, us per weight (best of 20); prints the layout the rule picks next to the times.
"""

import torch, time
from hf_sparse import ops
ops.set_num_threads(1); torch.set_num_threads(1)
torch.manual_seed(0)
def best(fn, calls):
    for _ in range(3): fn()
    ts=[]
    for _ in range(calls):
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return min(ts)
for n,k in [(768,768),(3072,768),(768,3072)]:
    for sp in (0.8,0.85,0.9):
        ws=[torch.randn(n,k)*(torch.rand(n,k)>=sp) for _ in range(12)]
        ps={l:[ops.pack_linear(w,layout=l) for w in ws] for l in ("int8_csr","int8_dense","int8_block4")}
        dec=ops.pack_linear(ws[0],workload="decode").layout.value
        for m in (1,2):
            x=torch.randn(m,k)
            t={l:best(lambda ps=p: [q(x) for q in ps], 20)/12*1e6 for l,p in ps.items()}
            print(f"{n}x{k} {sp} M={m} decode-rule={dec} " + " ".join(f"{l} {v:.1f}" for l,v in t.items()), flush=True)
