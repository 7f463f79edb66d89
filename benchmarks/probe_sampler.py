"""The sampler's own cost for one penalised row on a GPU: host time a call with and without the pending token of a
step queued ahead, the synchronising calls it makes (torch's sync debug mode), and a profile of 10 calls.

    python3 benchmarks/probe_sampler.py          # on a CUDA machine; 151,936 tokens, 100 tokens of history
"""
import time, warnings, torch
from moeserve.router.sampler import Sampler
from moeserve.router.sequence import SamplingParams
dev = "cuda"; V = 151936
logits = torch.randn(1, V, device=dev)
p = [SamplingParams(max_tokens=100, presence_penalty=0.5, repetition_penalty=1.1)]
hist = [(list(range(1000, 1100)), 64, set())]
pending = torch.tensor([5], device=dev)
s = Sampler(dev)
for label, pend in (("no pending", None), ("pending", pending)):
    for _ in range(5): s(logits, p, [None], hist, None, pend)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(100): s(logits, p, [None], hist, None, pend)
    host = (time.perf_counter() - t) * 1e4
    torch.cuda.synchronize()
    tot = (time.perf_counter() - t) * 1e4
    print(f"{label}: host {host:.0f} us/call, with GPU {tot:.0f} us/call")
torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    s(logits, p, [None], hist, None, pending)
    print("syncs:", [str(x.message)[:100] for x in w][:5])
torch.cuda.set_sync_debug_mode("default")
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(10): s(logits, p, [None], hist, None, pending)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=40))
