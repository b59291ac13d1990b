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
baseline (kernels: eager torch, also shown against torch.compile; rounds: the naive PD;
time-to-quality: the naive loop), min / median / spread / repeats and the load average
before and after each interleaved measurement. Ratios are of medians; a target is called
MET or MISSED only when every provider it compares has spread < 1.3 (max/min) over at least
3 repeats; otherwise it prints "noisy: rerun" (DESIGN §5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks import common

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


_TIMING = ("min_s", "median_s", "max_s", "spread", "reps", "loadavg_before", "loadavg_after")


def _timing(r: dict) -> dict:
    return {k: r.get(k) for k in _TIMING}


def _ratio(base: dict | None, r: dict) -> float | None:
    """base's median time over r's: > 1 when r is faster."""
    if not base or not base.get("median_s") or not r.get("median_s"):
        return None
    return base["median_s"] / r["median_s"]


def rows(data: dict) -> list[dict]:
    """One dict per benchmark: its timing (min, median, spread, load) and the ratios of
    medians against its baselines, with the baselines' timings under `figures` (what a
    target's verdict is judged on)."""
    out = []
    recs = [b["extra_info"] for b in data["benchmarks"]]
    kernels = {(r["op"], r["size"], r["dtype"], r["provider"]): r
               for r in recs if r.get("kind") == "kernel"}
    rounds = {(r["model"], r["provider"]): r for r in recs if r.get("kind") == "round"}
    quality = {(r["model"], r["provider"]): r for r in recs if r.get("kind") == "quality"}
    for (op, size, dtype, provider), r in kernels.items():
        eager = kernels.get((op, size, dtype, "eager"))
        comp = kernels.get((op, size, dtype, "compile"))
        figures = {provider: _timing(r)} | ({"eager": _timing(eager)} if eager else {}) \
            | ({"compile": _timing(comp)} if comp else {})
        out.append(dict(
            kind="kernel", what=f"{op} {dtype}", provider=provider, size=size,
            rate=r["GBps"], unit="GB/s", frac=r["frac_copy"],
            vs_base=_ratio(eager, r), vs_compile=_ratio(comp, r), figures=figures,
            **_timing(r)))
    for (model, provider), r in rounds.items():
        naive = rounds.get((model, "naive"))
        loss_diff = None
        if naive and naive["loss"]:
            loss_diff = abs(r["loss"] - naive["loss"]) / abs(naive["loss"])
        figures = {provider: _timing(r)} | ({"naive": _timing(naive)} if naive else {})
        out.append(dict(
            kind="round", what=f"PD update {model}", provider=provider, size=r["size"],
            rate=r["samples_per_s"], unit="samples/s", frac=r["frac_matmul"],
            vs_base=_ratio(naive, r), vs_compile=None, figures=figures,
            loss_diff=loss_diff, mem=r.get("peak_mem_MiB"), autocast=r.get("autocast"),
            **_timing(r)))
    for (model, provider), r in quality.items():
        naive = quality.get((model, "naive"))
        figures = {provider: _timing(r)} | ({"naive": _timing(naive)} if naive else {})
        out.append(dict(
            kind="quality", what=f"time-to-quality {model}", provider=provider,
            size=r["size"], rate=r["median_s"], unit="s", frac=None,
            vs_base=_ratio(naive, r), vs_compile=None, figures=figures,
            error_ratio=r.get("error_ratio"), reached=r.get("reached"), **_timing(r)))
    return out


def _load(x) -> str:
    return "-" if not x else "/".join(f"{v:.2f}" for v in x)


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
        f"{'vs base':>9}{'vs comp':>9}{'min ms':>10}{'med ms':>10}{'spread':>8}"
        f"{'reps':>5}{'loss Δ':>9}{'peak MiB':>10}  load before -> after",
    ]
    for r in rows(data):
        rate = f"{r['rate']:.4g} {r['unit']}"
        lines.append(
            f"{r['what']:<30}{r['provider']:<22}{r['size']:<14}{rate:>16}"
            f"{_fmt(r['frac'], '.1%'):>9}{_fmt(r['vs_base'], '.2f'):>9}"
            f"{_fmt(r['vs_compile'], '.2f'):>9}"
            f"{_fmt(r['min_s'] and r['min_s'] * 1e3, '.4g'):>10}"
            f"{_fmt(r['median_s'] and r['median_s'] * 1e3, '.4g'):>10}"
            f"{_fmt(r['spread'], '.2f'):>8}{_fmt(r['reps'], 'd'):>5}"
            f"{_fmt(r.get('loss_diff'), '.0e'):>9}{_fmt(r.get('mem'), '.0f'):>10}"
            f"  {_load(r['loadavg_before'])} -> {_load(r['loadavg_after'])}")
    lines += ["", "Providers of one case ran interleaved (A B A B ...) in this process; rates and",
              "ratios use medians; spread = max/min over the repeats (a target counts only when",
              f"every provider it compares has spread < {common.NOISY_SPREAD} over >= "
              f"{common.MIN_REPS} repeats, else 'noisy: rerun').",
              "vs base: speed-up over eager torch (kernels), the naive PD update (rounds) or",
              "the naive loop's time-to-quality; vs comp: over torch.compile of the eager math;",
              "loss Δ: relative difference of the first update's loss from naive's (same",
              "weights, same batch).", ""]
    lines += targets(data)
    return "\n".join(lines)


def targets(data: dict) -> list[str]:
    """The targets (issues 5 and 14), each judged on this run with `common.verdict`: MET or
    MISSED only when every provider it compares has a tight spread, else "noisy: rerun"."""
    out = ["targets (issue 5):"]
    rs = rows(data)
    big = {"1M", "4M", "16M", "64M"}
    for r in rs:
        if r["kind"] == "kernel" and r["what"].startswith("fused_pd_loss_fwdbwd") \
                and r["provider"] not in ("eager", "compile") and r["size"] in big:
            ok = (r["vs_base"] or 0) >= 3 and (r["vs_compile"] or 0) >= 1
            out.append(f"  fused_pd_loss fwd+bwd {r['provider']} {r['what'].split()[-1]} "
                       f"{r['size']}: "
                       f"{_fmt(r['vs_base'], '.2f')}x eager (>= 3), "
                       f"{_fmt(r['vs_compile'], '.2f')}x compile (>= 1), "
                       f"{r['frac']:.1%} of copy ceiling: {common.verdict(r['figures'], ok)}")
    for r in rs:
        if r["kind"] == "round" and r["what"].endswith("demo") and r["provider"] != "naive":
            equal = r["loss_diff"] is not None and r["loss_diff"] < 1e-4
            ok = (r["vs_base"] or 0) >= 1.5 and equal
            out.append(f"  demo PD update {r['provider']}: {_fmt(r['vs_base'], '.2f')}x naive "
                       f"(>= 1.5), loss Δ {_fmt(r['loss_diff'], '.0e')} "
                       f"({'equal' if equal else 'not equal'}), {r['frac']:.1%} of matmul "
                       f"ceiling: {common.verdict(r['figures'], ok)}")
    if any(r["kind"] == "quality" for r in rs):
        out.append("targets (issue 14):")
    for r in rs:
        if r["kind"] == "quality" and r["provider"] != "naive":
            close = r.get("error_ratio") is not None and r["error_ratio"] <= 1.10
            ok = (r["vs_base"] or 0) >= 1.5 and close and bool(r.get("reached"))
            out.append(f"  {r['what']} {r['provider']}: {_fmt(r['vs_base'], '.2f')}x naive "
                       f"(>= 1.5), final held-out error {_fmt(r.get('error_ratio'), '.3f')}x "
                       f"naive's (<= 1.10), naive's final error "
                       f"{'reached' if r.get('reached') else 'NOT reached'}: "
                       f"{common.verdict(r['figures'], ok)}")
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
