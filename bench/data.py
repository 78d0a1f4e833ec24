"""
Benchmark of stage 1 (prepare_data.py): samples per second for the phantom source with the geometry
teacher, the full path (generate, measure, ask, gate, write PNGs and JSONL). Target: 10,000 samples in
under 5 minutes on a 2-core CPU machine.

It also checks that the parallel run is deterministic: the first --check samples are made again with
a single process and must be byte-identical records and PNGs.

  python bench/data.py                      # 10,000 samples, all cores, into a temporary folder
  python bench/data.py --n 2000 --workers 1 --out data/bench --keep
"""
import argparse
import json
import os
import sys
import shutil
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import prepare_data


def main():
    p = argparse.ArgumentParser(description="samples/s of prepare_data.py on phantoms (geometry teacher)")
    p.add_argument("--n", type=int, default=10000, help="phantom images (= samples with one question each)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes")
    p.add_argument("--image-size", type=int, default=128, help="phantom image side in pixels")
    p.add_argument("--check", type=int, default=300,
                   help="samples re-made with one process to check determinism")
    p.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the output folder")
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench_data_")
    if os.path.exists(os.path.join(out, "samples.jsonl")):
        raise SystemExit(f"error: {out} already has samples.jsonl; a benchmark needs an empty folder")
    common = ["--source", "phantom", "--seed", "0", "--image-size", str(args.image_size)]

    t0 = time.perf_counter()
    stats = prepare_data.main(common + ["--out", out, "--n", str(args.n), "--workers", str(args.workers)])
    seconds = time.perf_counter() - t0
    rate = stats["last_run"]["sample"] / seconds

    # determinism: a one-process run of the first --check phantoms gives the same records and images
    ref = tempfile.mkdtemp(prefix="bench_data_ref_")
    prepare_data.main(common + ["--out", ref, "--n", str(args.check), "--workers", "1"])
    first = {}
    with open(os.path.join(out, "samples.jsonl")) as fh:
        for line in fh:
            r = json.loads(line)
            first[r["id"]] = r
    same = 0
    with open(os.path.join(ref, "samples.jsonl")) as fh:
        for line in fh:
            r = json.loads(line)
            pngs = all(open(os.path.join(ref, r[k]), "rb").read()
                       == open(os.path.join(out, r[k]), "rb").read() for k in ("image", "mask", "overlay"))
            same += int(first.get(r["id"]) == r and pngs)
    shutil.rmtree(ref)

    print(f"\nbench_data: {stats['last_run']['sample']} samples ({stats['last_run']['reject']} rejected) in "
          f"{seconds:.1f} s with {args.workers} worker(s): {rate:.1f} samples/s; "
          f"10,000 samples would take {10000 / rate / 60:.2f} min (target < 5 min)")
    print(f"determinism: {same}/{args.check} samples identical to a one-process run")
    if not args.keep and args.out is None:
        shutil.rmtree(out)
    else:
        print(f"output kept in {out}")


if __name__ == "__main__":
    main()
