"""Peak resident memory and time of scoring's exactness self-check on one torchvision model
(issue 12, item 4): RSS sampled every 10 ms around ``graph.check_exact``, and again when pass 1
starts.

    python benchmarks/selfcheck_memory.py vit_l_16      # 224x224, 4 images, 10 classes
"""
import sys
import threading
import time
import warnings

import torch
import torchvision

import fair_pruner as fp
from fair_pruner import calibrate, graph


def rss_mib() -> int:
    return graph._rss_bytes() >> 20


def main(name: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    peak = [0]

    def sample():
        while True:
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.01)
    threading.Thread(target=sample, daemon=True).start()
    res = {}
    real_check, real_pass = graph.check_exact, calibrate._pass_one

    def check(*a, **k):
        res["before_mib"] = peak[0] = rss_mib()
        t = time.perf_counter()
        try:
            return real_check(*a, **k)
        finally:
            res.update(peak_mib=peak[0], seconds=round(time.perf_counter() - t, 1))

    def pass_one(*a, **k):
        res["at_pass_1_mib"] = rss_mib()
        return real_pass(*a, **k)
    calibrate.check_exact, calibrate._pass_one = check, pass_one
    x, y = torch.randn(4, 3, 224, 224), torch.arange(4) % 2
    fp.score(model, [(x, y)], samples_per_class=2, projections=4, progress=False)
    res["params_mib"] = sum(p.numel() for p in model.parameters()) * 4 >> 20
    print(name, res)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "vit_l_16")
