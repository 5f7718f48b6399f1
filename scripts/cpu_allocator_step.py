"""CPU time of a 256x256 DEQ-INR training step with glibc's default allocator (plain) or keep_cpu_heap (keep).

Usage: PYTHONPATH=. python scripts/cpu_allocator_step.py plain|keep   (BENCHMARKS.md, "CPU allocator")
"""
import sys, time, statistics, torch
from suite.config import load_config
from suite.models import build_model
from suite.data import load_data
from suite.training.common import keep_cpu_heap
from suite.training.warm_start import Recipe
from suite.training.inr import _deq_epoch
if sys.argv[1] == "keep":
    keep_cpu_heap(True)
torch.set_num_threads(1); torch.manual_seed(0)
cfg = load_config("configs/experiments/deq_inr.yaml", {"data.size": 256, "model.input_scale": 128.0})
m, d = build_model(cfg), load_data(cfg)
r, opt, cpu = Recipe(cfg.deq, d.coords.shape[0], m.hidden, torch.device("cpu")), torch.optim.Adam(m.parameters(), 1e-3), []
for e in range(6):
    c0 = time.process_time(); _deq_epoch(m, opt, d, [None], 1, e, r); cpu.append(time.process_time() - c0)
print(sys.argv[1], f"{statistics.median(cpu[1:]):.2f} s CPU per step")
