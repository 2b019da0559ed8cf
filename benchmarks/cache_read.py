"""Random-access reads: vlpipe's sharded HDF5 FeatureCache against one .npz file per item.

Measured, for two item sizes:
  regions  36x2048 float16 features + 36x4 boxes + the other per-region fields of a
           `regions` cache (what LXMERT-style Faster R-CNN features look like), ~149 KB
  patches  196x768 float16 patch tokens + 768 CLS + image size (a ViT-B/16 `patches`
           cache), ~302 KB
N items are written with `CacheWriter` (as `vlpipe extract` writes them) and, as the baseline,
with `np.savez` of the same arrays, one uncompressed file per item: the one-file-per-image layout
of the peers (MILVLG's bottom-up-attention.pytorch writes one np.savez_compressed .npz per image,
MMF one .npy plus one _info.npy). A random permutation of all keys is then read in batches:
  hdf5-main    FeatureCache.read(keys) in the main process
  hdf5-loader  a torch DataLoader with --workers workers over a Dataset reading one key per item
               (lazy per-worker HDF5 handles)
  npz-main     np.load of each file in the main process, stacked per batch
  npz-loader   the same DataLoader over the .npz files
Each variant runs in a fresh subprocess and reports items/s, MB/s (array bytes delivered), time
to first batch (constructing the reader -> first batch in hand), RSS after the imports (base),
and peak RSS (VmHWM) of the main process and of its largest worker (sampled after every batch;
"-" without workers). If /proc/sys/vm/drop_caches is writable, every variant runs once after
dropping the page cache ("cold") and once again ("warm"); otherwise warm only, as printed.
--checks runs the hdf5 variants once per reader check level (`FeatureCache(check=...)`: none,
light = size/rows/schema/identity/keys of each shard against the index when first opened,
full = light + sha256 of each shard), printed as e.g. hdf5-main:light.

    python benchmarks/cache_read.py                                  # ~4 min here, ~1.2 GB of disk
    python benchmarks/cache_read.py --items 20000 --vit-items 10000 --workers 8 --workdir /scratch
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from vlpipe.cache import CacheWriter, FeatureCache, Schema, region_shapes
from vlpipe.extract.runner import _default_shard_items

REGION_SHAPES = region_shapes(36, 2048)
PATCH_SHAPES = {"image_feats": (196, 768), "image_cls": (768,), "image_hw": (2,)}
SCHEMAS = {
    "regions": Schema.build("regions", REGION_SHAPES, "float16"),
    "patches": Schema.build("patches", PATCH_SHAPES, "float16"),
}
VARIANTS = ("hdf5-main", "hdf5-loader", "npz-main", "npz-loader")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--items", type=int, default=2000, help="region items (~149 KB each)")
    p.add_argument("--vit-items", type=int, default=1000, help="ViT items (~302 KB each)")
    p.add_argument("--kinds", default="regions,patches")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of *-loader")
    p.add_argument("--repeats", type=int, default=2, help="rounds; the fastest counts")
    p.add_argument("--no-cold", action="store_true", help="skip the dropped-page-cache runs")
    p.add_argument("--workdir", type=Path, help="where the data goes (default: a temp dir)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--checks", default="light", help="FeatureCache check levels, e.g. none,light")
    p.add_argument("--shard-items", type=int, help="items per shard (default: vlpipe's ~1 GiB)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    return p.parse_args()


# ---- writing ------------------------------------------------------------------------------------


def fake_items(schema: Schema, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n items of random data shaped and typed as the schema says."""
    out = {}
    for name, (shape, dtype) in schema.fields.items():
        if np.dtype(dtype).kind == "f":
            out[name] = rng.standard_normal((n, *shape), dtype=np.float32).astype(dtype)
        else:
            out[name] = rng.integers(0, 2 if dtype == "bool" else 1600, (n, *shape)).astype(dtype)
    return out


def write_both(kind: str, n: int, work: Path, shard_items: int | None, pool: int = 256) -> dict:
    """The same n items into an HDF5 cache and into n .npz files; seconds and bytes of each."""
    schema, rng = SCHEMAS[kind], np.random.default_rng(0)
    data = fake_items(schema, pool, rng)  # a pool reused cyclically: content does not matter
    keys = [f"{kind}/{i:07d}" for i in range(n)]
    cache, folder = work / f"{kind}.h5", work / f"{kind}_npz"
    start = time.perf_counter()
    shard_items = shard_items or _default_shard_items(schema)
    with CacheWriter(cache, schema, {"bench": kind}, shard_items=shard_items) as w:
        for lo in range(0, n, pool):
            part = keys[lo : lo + pool]
            w.add(part, {f: v[: len(part)] for f, v in data.items()})
    h5_s = time.perf_counter() - start
    folder.mkdir()
    start = time.perf_counter()
    for i, key in enumerate(keys):
        np.savez(folder / f"{key.split('/')[1]}.npz", **{f: v[i % pool] for f, v in data.items()})
    npz_s = time.perf_counter() - start
    # The HDF5 writer fsyncs (and hashes) each shard; the peers' scripts never fsync. Time
    # what durability would cost the npz side separately.
    start = time.perf_counter()
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_s = time.perf_counter() - start
    h5_bytes = sum(p.stat().st_size for p in cache.with_suffix(".shards").glob("*.h5"))
    npz_bytes = sum(p.stat().st_size for p in folder.iterdir())
    return {"cache": str(cache), "folder": str(folder), "n": n, "h5_s": h5_s, "npz_s": npz_s,
            "fsync_s": fsync_s, "h5_mb": h5_bytes / 1e6, "npz_mb": npz_bytes / 1e6}  # fmt: skip


# ---- reading (runs in a child process) ----------------------------------------------------------


def load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {f: z[f] for f in z.files}


class H5Items(Dataset):
    """One item per index, read by key through a FeatureCache (handles open lazily per worker)."""

    def __init__(self, cache: FeatureCache, keys: list[str]):
        self.cache, self.keys = cache, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.cache[self.keys[i]]


class NpzItems(Dataset):
    def __init__(self, folder: str, keys: list[str]):
        self.folder, self.keys = folder, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return load_npz(f"{self.folder}/{self.keys[i]}.npz")


def batches(variant: str, spec: dict, order: np.ndarray, worker_pids: list[int]):
    """Yield batches of the variant's reader; constructing the reader happens in here."""
    bs = spec["batch_size"]
    if variant.startswith("hdf5"):
        cache = FeatureCache(spec["cache"], check=spec["check"])
        names = cache.keys()
    else:
        names = sorted(p[: -len(".npz")] for p in os.listdir(spec["folder"]))
    keys = [names[i] for i in order]
    if variant == "hdf5-main":
        yield from (cache.read(keys[lo : lo + bs]) for lo in range(0, len(keys), bs))
    elif variant == "npz-main":
        for lo in range(0, len(keys), bs):
            items = [load_npz(f"{spec['folder']}/{k}.npz") for k in keys[lo : lo + bs]]
            yield {f: np.stack([it[f] for it in items]) for f in items[0]}
    else:
        ds = H5Items(cache, keys) if variant == "hdf5-loader" else NpzItems(spec["folder"], keys)
        loader = iter(DataLoader(ds, batch_size=bs, num_workers=spec["workers"]))
        worker_pids += [w.pid for w in getattr(loader, "_workers", [])]
        yield from loader


def peak_rss_mb(pid: int | str = "self", field: str = "VmHWM") -> float:
    """VmHWM: peak RSS of this process image (ru_maxrss would carry the parent's over exec)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith(field + ":"))


def run_child(spec: dict) -> dict:
    order = np.random.default_rng(1).permutation(spec["n"])
    base = peak_rss_mb(field="VmRSS")  # python + numpy + torch + h5py, before any reading
    items = nbytes = worker_peak = 0
    pids: list[int] = []
    start = time.perf_counter()
    first = None
    for batch in batches(spec["variant"], spec, order, pids):
        first = first or time.perf_counter() - start
        items += len(batch["image_feats"])
        nbytes += sum(v.nbytes for v in batch.values())
        worker_peak = max([worker_peak] + [peak_rss_mb(p) for p in pids])  # sampled per batch
    seconds = time.perf_counter() - start
    assert items == spec["n"], (items, spec["n"])
    return {"items": items, "mb": nbytes / 1e6, "s": seconds, "first": first,
            "base_mb": base, "rss_mb": peak_rss_mb(), "worker_rss_mb": worker_peak}  # fmt: skip


# ---- orchestration ------------------------------------------------------------------------------


def open_times(cache: str, checks: list[str], rounds: int = 15) -> str:
    """Median time to open the first shard and run its check, per check level (sha256 digests
    are not reused between rounds)."""
    from vlpipe import provenance

    parts = []
    for check in checks:
        times = []
        for _ in range(rounds):
            provenance._HASH_CACHE.clear()
            reader = FeatureCache(cache, check=check)
            start = time.perf_counter()
            reader._file(0)
            times.append(time.perf_counter() - start)
            reader.close()
        parts.append(f"{check} {sorted(times)[rounds // 2] * 1e3:.1f}")
    return "open one shard + its check, ms (median): " + ", ".join(parts)


def can_drop_caches() -> bool:
    try:
        drop_caches()
    except OSError:
        return False
    return True


def drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def measure(variant: str, written: dict, args: argparse.Namespace, cold: bool) -> dict:
    """One variant in a fresh interpreter, so its peak RSS is its own."""
    variant, _, check = variant.partition(":")
    spec = dict(written, variant=variant, batch_size=args.batch_size, workers=args.workers)
    spec["check"] = check or "none"  # npz variants ignore it
    if cold:
        drop_caches()
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def best_of(written: dict, args: argparse.Namespace, cold: bool) -> dict:
    """Fastest of --repeats rounds per (variant, cold/warm); rounds go round-robin over the
    variants, so a change in machine load hits all of them."""
    best: dict = {}
    checks = args.checks.split(",")
    variants = [
        f"{v}:{c}" if v.startswith("hdf5") else v
        for v in args.variants.split(",")
        for c in (checks if v.startswith("hdf5") else [""])
    ]
    for _ in range(args.repeats):
        for variant in variants:
            for temp in ("cold", "warm") if cold else ("warm",):
                r = measure(variant, written, args, temp == "cold")
                if (variant, temp) not in best or r["s"] < best[variant, temp]["s"]:
                    best[variant, temp] = r
    return best


def row(kind: str, variant: str, cache: str, r: dict) -> str:
    worker = f"{r['worker_rss_mb']:.0f}" if r["worker_rss_mb"] else "-"
    return (
        f"{kind:<8} {variant:<17} {cache:<5} {r['items'] / r['s']:>8.0f} {r['mb'] / r['s']:>7.0f} "
        f"{r['first']:>8.2f} {r['base_mb']:>7.0f} {r['rss_mb']:>7.0f} {worker:>9}"
    )


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    cold = not args.no_cold and can_drop_caches()
    print(f"page cache: {'dropped before each cold run' if cold else 'NOT dropped (warm only)'}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min)")
    sizes = {"regions": args.items, "patches": args.vit_items}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        header = (
            "kind     variant           cache   items/s    MB/s  first_s base_MB peak_MB worker_MB"
        )
        for kind in args.kinds.split(","):
            w = write_both(kind, sizes[kind], Path(tmp), args.shard_items)
            print(f"\n{kind}: {w['n']} items; write hdf5 {w['h5_s']:.1f}s ({w['h5_mb']:.0f} MB, "
                  f"fsync + sha256 included), npz {w['npz_s']:.1f}s + fsync {w['fsync_s']:.1f}s "
                  f"({w['npz_mb']:.0f} MB)")  # fmt: skip
            n_shards = len(list(Path(w["cache"]).with_suffix(".shards").glob("*.h5")))
            print(f"{n_shards} shards; {open_times(w['cache'], args.checks.split(','))}\n{header}")
            for (variant, temp), r in best_of(w, args, cold).items():
                print(row(kind, variant, temp, r), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
