"""Section 1 of `dli bench`, the data path: images/s of the loaders alone, no training.

The DALI loader (decode, resize, flips; on the training device) without and with Dynamic Label
Injection, and the practitioner's alternative (`dli.bench.baseline`: a PyTorch DataLoader with
worker processes, OpenCV decoding and augmentation, `cv2.seamlessClone` per image) executing the
very same plans, its batches copied to the device; and the ratios between them. For the DALI
loaders also where the iterating thread spends a batch (`host_ms_per_batch`: planning, reading
and feeding the files, waiting for DALI, assembling and issuing the injection; see
`dli.pipeline.loader.HOST_STAGES`), the host time a GPU training step has to hide.
"""

from __future__ import annotations

from typing import Any

from dli.bench.state import Bench, endless, progress
from dli.bench.timing import ratio, summary


def measure_data_path(bench: Bench) -> dict[str, Any]:
    """Images/s of the DALI loader without and with injection, and of the baseline, same plans."""
    out: dict[str, Any] = {}
    workers = bench.settings.workers
    for injecting, name, baseline in ((False, "dali", "baseline"), (True, "dali_dli", "baseline_dli")):
        progress(f"data path: {name}")
        loader = bench.loader(inject=injecting)
        stream = endless(loader)
        try:
            out[name] = {"images_per_s": summary(bench.rates(stream, lambda batch: None))}
        finally:
            stream.close()
            loader.close()
        out[name]["host_ms_per_batch"] = loader.host_ms_per_batch()  # warm-up included
        # The baseline runs the same plans; every worker finishes a batch before timing starts.
        progress(f"data path: {baseline} ({workers} workers)")
        plans = bench.plans(bench.loader(inject=injecting), bench.batches_needed(workers))
        batches = iter(bench.baseline(plans, inject=injecting))
        rates = bench.rates(batches, bench.to_device, extra_warmup=workers)
        del batches  # shuts the worker processes down
        out[baseline] = {"images_per_s": summary(rates)}
    out["dli_over_baseline"] = ratio(out["dali_dli"], out["baseline_dli"])
    out["plain_over_baseline"] = ratio(out["dali"], out["baseline"])
    out["dli_over_plain"] = ratio(out["dali_dli"], out["dali"])
    return out
