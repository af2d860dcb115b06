"""GPU benchmark of capyft's user path against TRL; see ``scripts/bench_gpu.py``."""
