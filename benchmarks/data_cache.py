"""FER-2013 complete (35,887 JPEGs) decoded: today's one-process decode against the on-disk cache.

    python benchmarks/data_cache.py                          # ../shared/data/fer2013, all cores this process may use
    python benchmarks/data_cache.py --root DIR --limit 2000  # a smoke run on the first 2,000 files
    python benchmarks/data_cache.py --json out.json

Each figure is taken in a fresh process (python + torch imported first, not timed), the loader being
`classlab.data` exactly as a run calls it (data.dataset fer2013, the folder listed every time):

1. reference: CLASSLAB_CACHE=off, one worker -- the decode every process paid before the cache;
2. first decode: an empty cache folder, the process pool over every core this process may use;
3. second start: the same cache folder, a new process (list, stat every file, map, CRC-check);
4. memory: two processes holding the images at once, each reading its mapping's Rss and Pss from
   /proc/self/smaps (Pss divides a shared page among the processes mapping it: the machine's real cost),
   against two processes with the cache off (each its own anonymous copy: Rss = Pss = the tensor's size).

Ratios: first / reference (target <= 0.60 on 2 cores), second start in seconds (target <= 2), and the two
processes' summed Pss over one copy (target: about 1, not 2). On a shared machine other jobs slow every
figure; say so beside the numbers. This is a benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
import torch  # imported before the clock starts, as in any run
from pathlib import Path
from classlab.data.cache import decoded_images, decode_workers
from classlab.data.folder import list_class_files, _class_dirs

root, limit, wait = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "wait"


def anon():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("RssAnon:"))) * 1024


import resource


def cpu():
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


anon0 = anon()
cpu0 = cpu()
t0 = time.perf_counter()
classes = sorted({p.name for s in ("train", "validation", "test") for p in _class_dirs(root / s)})
total, shapes, skipped = 0, [], 0
held = []
for split in ("train", "validation", "test"):
    items = list_class_files(root / split, classes)
    if limit:
        items = items[: max(1, limit // 3)]
    images, labels, missed = decoded_images(items, 1, None)
    held.append(images)
    total += images.numel()
    skipped += len(missed)
seconds = time.perf_counter() - t0
out = {"seconds": seconds, "cpu_s": cpu() - cpu0, "bytes": total, "skipped": skipped, "workers": decode_workers()}
if wait:
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # both processes hold their images now
    rss = pss = 0
    current = None
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if not parts[0].endswith(":") or "-" in parts[0]:
            current = parts[-1] if len(parts) >= 6 else ""
            continue
        if current and current.endswith(".bin"):
            if parts[0] == "Rss:":
                rss += int(parts[1]) * 1024
            elif parts[0] == "Pss:":
                pss += int(parts[1]) * 1024
    out.update(map_rss=rss, map_pss=pss, anon_growth=anon() - anon0)
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # exit only when the other process has read its figures too
else:
    print(json.dumps(out), flush=True)
"""


def _env(cache: str, workers: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CLASSLAB_CACHE": cache}
    if workers is not None:
        env["CLASSLAB_DECODE_WORKERS"] = str(workers)
    return env


def one(root: Path, limit: int, cache: str, workers: int | None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(limit), "once"], env=_env(cache, workers),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def two_at_once(root: Path, limit: int, cache: str) -> list[dict]:
    """Two processes load the images, then (both holding them) read their own memory figures."""
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(limit), "wait"], env=_env(cache, None),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        p.stdout.readline()  # loaded
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.stdout.readline()) for p in procs]
    for p in procs:
        p.communicate("exit\n", timeout=600)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=REPO / ".." / "shared" / "data" / "fer2013")
    parser.add_argument("--limit", type=int, default=0, help="only the first N files (a smoke run); 0 = all")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    root = args.root.resolve()
    with tempfile.TemporaryDirectory(prefix="classlab-cache-bench-") as tmp:
        cache = str(Path(tmp) / "decoded")
        ref = one(root, args.limit, "off", 1)
        first = one(root, args.limit, cache, None)
        second = one(root, args.limit, cache, None)
        shared = two_at_once(root, args.limit, cache)
        private = two_at_once(root, args.limit, "off")
    size = ref["bytes"]
    figures = {
        "images_bytes": size, "skipped": ref["skipped"], "workers": first["workers"], "cpus": os.cpu_count(),
        "reference_s": ref["seconds"], "first_s": first["seconds"], "second_s": second["seconds"],
        "first_over_reference": first["seconds"] / ref["seconds"],
        "reference_cpu_s": ref["cpu_s"], "first_cpu_s": first["cpu_s"], "second_cpu_s": second["cpu_s"],
        "cached_two_processes": {"map_rss": [s["map_rss"] for s in shared], "map_pss": [s["map_pss"] for s in shared],
                                 "start_s": [s["seconds"] for s in shared]},
        "cached_anon_growth": [s["anon_growth"] for s in shared],
        "uncached_two_processes": {"anon_growth": [s["anon_growth"] for s in private]},
        "load": os.getloadavg(),
    }
    mb = 1e6
    pss_sum = sum(figures["cached_two_processes"]["map_pss"])
    rss_sum = sum(figures["cached_two_processes"]["map_rss"])
    print(f"FER-2013 images: {size / mb:.1f} MB uint8 ({root}{f', first {args.limit} files' if args.limit else ''})")
    print(f"reference, one process, cache off : {ref['seconds']:6.2f} s  (CPU {ref['cpu_s']:.2f} s)")
    print(f"first decode, cache, {first['workers']} workers    : {first['seconds']:6.2f} s  "
          f"({figures['first_over_reference']:.2f} of the reference; target <= 0.60; CPU {first['cpu_s']:.2f} s "
          "in all processes)")
    print(f"second start, cache               : {second['seconds']:6.2f} s  (target <= 2 s; CPU "
          f"{second['cpu_s']:.2f} s)")
    print(f"two processes, cache  : mapping Rss {rss_sum / mb:.1f} MB summed, Pss {pss_sum / mb:.1f} MB summed "
          f"= {pss_sum / size:.2f} copies of the images (target ~1)")
    grown = figures["cached_anon_growth"]
    print(f"                         private memory grown while loading: {sum(grown) / mb:.1f} MB summed")
    anon = figures["uncached_two_processes"]["anon_growth"]
    print(f"two processes, no cache: private memory grown while loading {sum(anon) / mb:.1f} MB summed "
          f"= {sum(anon) / size:.2f} copies of the images")
    print(f"load average during the run: {', '.join(f'{v:.2f}' for v in figures['load'])}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
