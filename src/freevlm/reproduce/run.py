"""The seeds of a reproduction: the pretrained backbone once, then per seed its method loop (`seed.SeedRun`) and each
table's own measurement (`tables/`), in the report's order, stored in that seed's results.

The pretrained backbone is shared by the seeds, as a released checkpoint would be; each seed draws its own 80/20
split, stage-1 fine-tune, exit initialisation and data order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from freevlm.default import describe_default, pretrained_default
from freevlm.reproduce.config import ReproduceConfig
from freevlm.reproduce.seed import SeedRun
from freevlm.reproduce.tables.base import Table


def run_seed(run: SeedRun, tables: Sequence[Table] = (), full: bool = False) -> dict:
    """The seed's method loop, then each table's measurement in order (stored at its key in the seed's results,
    where later tables' measurements can read it); returns the seed's results."""
    core = run.method_loop()
    for table in tables:
        if table.measure is not None and table.when(run.cfg, full):
            _store(run.results, table.key, table.measure(run, core))
    return run.results


def _store(results: dict, key: tuple[str, ...], value) -> None:
    """results[k1][k2]...[kn] = value, creating the inner dicts."""
    for k in key[:-1]:
        results = results.setdefault(k, {})
    results[key[-1]] = value


def run_seeds(cfg: ReproduceConfig, out: Path, full: bool, progress: bool,
              tables: Sequence[Table] = ()) -> tuple[list[dict], dict]:
    """Pretrain the embedded default once, then one `SeedRun` per seed; returns the per-seed results and the model's
    description."""
    if cfg.real is not None:  # the real VLM after its stage 1 (the projection), shared by the seeds
        from freevlm.real import real_backbone

        data_root, backbone = real_backbone(out, cfg.real, seed=0, progress=progress)
        pretrained = out / "real-stage1-s0" / "backbone"
    else:
        data_root, backbone = pretrained_default(out, cfg.default, seed=0, progress=progress)
        pretrained = out / "pretrain-s0" / "backbone"
    model_info = describe_default(backbone)
    per_seed = []
    for seed in range(cfg.seeds):
        print(f"seed {seed + 1}/{cfg.seeds}")
        run = SeedRun(cfg, seed, pretrained, data_root, out / f"seed-{seed}", progress, root=out)
        per_seed.append(run_seed(run, tables, full))
    return per_seed, model_info
