"""`python -m benchmarks.summary` (= `make bench`): run the suite, save the JSON, print a table.

    python -m benchmarks.summary                 # whole suite (~10 min on a 2-core CPU)
    python -m benchmarks.summary --quick         # the `quick` smoke subset (~1 min)
    python -m benchmarks.summary --threads 1     # CPU intra-op threads (shared, loaded box)
    python -m benchmarks.summary --full          # + slow CPU compiles (FASTDIFF_BENCH_FULL)
    python -m benchmarks.summary --from-json F   # only print the table of a saved run

The JSON (pytest-benchmark's format, ceilings in ``machine_info.fastdiff_ceilings``) goes to
``runs/bench/bench-<time>.json`` unless ``--json`` says otherwise. Table columns: provider,
size, achieved rate (kernels: GB/s of the minimum bytes; rounds: samples/s), its fraction of
the ceiling (copy bandwidth; matmul rate of the config's dtype), and the ratio to the
baseline (kernels: eager torch, also shown against torch.compile; rounds: the naive PD).
Times are the fastest round: the least disturbed by other load on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_suite(json_path: Path, *, quick: bool = False, extra: list[str] = ()) -> int:
    """Run the benchmarks in this process; returns pytest's exit code."""
    import pytest

    json_path.parent.mkdir(parents=True, exist_ok=True)
    args = [str(HERE), "-c", str(HERE / "pytest.ini"), "--rootdir", str(HERE),
            "--benchmark-only", f"--benchmark-json={json_path}", "-q"]
    if quick:
        args += ["-m", "quick"]
    return int(pytest.main(args + list(extra)))


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def rows(data: dict) -> list[dict]:
    """One dict per benchmark with the ratios filled in."""
    out = []
    recs = [b["extra_info"] | {"min_s": b["stats"]["min"]} for b in data["benchmarks"]]
    kernels = {(r["op"], r["size"], r["dtype"], r["provider"]): r
               for r in recs if r.get("kind") == "kernel"}
    rounds = {(r["model"], r["provider"]): r for r in recs if r.get("kind") == "round"}
    for (op, size, dtype, provider), r in kernels.items():
        eager = kernels.get((op, size, dtype, "eager"))
        comp = kernels.get((op, size, dtype, "compile"))
        out.append(dict(
            kind="kernel", what=f"{op} {dtype}", provider=provider, size=size,
            rate=r["GBps"], unit="GB/s", frac=r["frac_copy"],
            vs_base=eager["min_s"] / r["min_s"] if eager else None,
            vs_compile=comp["min_s"] / r["min_s"] if comp else None))
    for (model, provider), r in rounds.items():
        naive = rounds.get((model, "naive"))
        loss_diff = None
        if naive and naive["loss"]:
            loss_diff = abs(r["loss"] - naive["loss"]) / abs(naive["loss"])
        out.append(dict(
            kind="round", what=f"PD update {model}", provider=provider, size=r["size"],
            rate=r["samples_per_s"], unit="samples/s", frac=r["frac_matmul"],
            vs_base=naive["min_s"] / r["min_s"] if naive else None, vs_compile=None,
            loss_diff=loss_diff, mem=r.get("peak_mem_MiB"), autocast=r.get("autocast")))
    return out


def format_table(data: dict) -> str:
    ceil = data.get("machine_info", {}).get("fastdiff_ceilings", {})
    end = data.get("machine_info", {}).get("fastdiff_loadavg_end")
    lines = [
        f"device: {ceil.get('device')}, {ceil.get('threads')} threads; "
        f"load average at start {ceil.get('loadavg_start')}, at end {end}",
        f"ceilings: copy {_fmt(ceil.get('copy_GBps'), '.1f')} GB/s, matmul fp32 "
        f"{_fmt(ceil.get('matmul_fp32_TFLOPs'), '.3f')} TFLOP/s, bf16 "
        f"{_fmt(ceil.get('matmul_bf16_TFLOPs'), '.3f')} TFLOP/s",
        "",
        f"{'benchmark':<30}{'provider':<22}{'size':<14}{'rate':>16}{'of ceil':>9}"
        f"{'vs base':>9}{'vs comp':>9}{'loss Δ':>9}{'peak MiB':>10}",
    ]
    for r in rows(data):
        rate = f"{r['rate']:.4g} {r['unit']}"
        lines.append(
            f"{r['what']:<30}{r['provider']:<22}{r['size']:<14}{rate:>16}"
            f"{_fmt(r['frac'], '.1%'):>9}{_fmt(r['vs_base'], '.2f'):>9}"
            f"{_fmt(r['vs_compile'], '.2f'):>9}{_fmt(r.get('loss_diff'), '.0e'):>9}"
            f"{_fmt(r.get('mem'), '.0f'):>10}")
    lines += ["", "vs base: speed-up over eager torch (kernels) or the naive PD update (rounds);",
              "vs comp: over torch.compile of the eager math; loss Δ: relative difference of the",
              "first update's loss from naive's (same weights, same batch).", ""]
    lines += targets(data)
    return "\n".join(lines)


def targets(data: dict) -> list[str]:
    """The issue-5 targets, judged on this run."""
    out = ["targets (issue 5):"]
    rs = rows(data)
    big = {"1M", "4M", "16M", "64M"}
    for r in rs:
        if r["kind"] == "kernel" and r["what"].startswith("fused_pd_loss_fwdbwd") \
                and r["provider"] != "eager" and r["provider"] != "compile" \
                and r["size"] in big:
            ok = (r["vs_base"] or 0) >= 3 and (r["vs_compile"] or 0) >= 1
            out.append(f"  fused_pd_loss fwd+bwd {r['provider']} {r['what'].split()[-1]} "
                       f"{r['size']}: "
                       f"{_fmt(r['vs_base'], '.2f')}x eager (>= 3), "
                       f"{_fmt(r['vs_compile'], '.2f')}x compile (>= 1), "
                       f"{r['frac']:.1%} of copy ceiling: {'MET' if ok else 'MISSED'}")
    for r in rs:
        if r["kind"] == "round" and r["what"].endswith("demo") and r["provider"] != "naive":
            equal = r["loss_diff"] is not None and r["loss_diff"] < 1e-4
            ok = (r["vs_base"] or 0) >= 1.5 and equal
            out.append(f"  demo PD update {r['provider']}: {_fmt(r['vs_base'], '.2f')}x naive "
                       f"(>= 1.5), loss Δ {_fmt(r['loss_diff'], '.0e')} "
                       f"({'equal' if equal else 'not equal'}), {r['frac']:.1%} of matmul "
                       f"ceiling: {'MET' if ok else 'MISSED'}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the `quick` smoke subset")
    p.add_argument("--json", default=None, help="where to save the JSON")
    p.add_argument("--from-json", default=None, help="print the table of a saved JSON")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: default)")
    p.add_argument("--full", action="store_true", help="also the slow CPU compile cases")
    p.add_argument("-k", default=None, help="pytest -k expression (a subset)")
    args = p.parse_args(argv)
    if args.from_json:
        path = Path(args.from_json)
    else:
        if args.threads:
            os.environ["FASTDIFF_BENCH_THREADS"] = str(args.threads)
        if args.full:
            os.environ["FASTDIFF_BENCH_FULL"] = "1"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(args.json or Path("runs/bench") / f"bench-{stamp}.json")
        code = run_suite(path, quick=args.quick, extra=["-k", args.k] if args.k else [])
        if code != 0 or not path.exists():
            print(f"benchmarks failed (pytest exit code {code})", file=sys.stderr)
            return code or 1
        print(f"\nsaved {path}\n")
    with open(path) as f:
        data = json.load(f)
    print(format_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
