"""One prepared GPU check: the CUDA paths proved, and the numbers that set the `full` preset's GPU defaults.

    python bench/gpu_check.py --out OUT                 # on the GPU machine (bench/README.md: what it needs there)
    python bench/gpu_check.py --out OUT --dry-run       # the same parts, tiny shapes, on the CPU (a test runs it)

Parts, in this order, each in its own process with its share of the `--minutes` budget (8 by default):
    cuda_tests   `pytest -m cuda`: graph-replayed sampling against eager, fp16 and channels-last resumes (tests/test_cuda.py)
    training     bench/throughput.py's models and batches parts: ours against diffusers' UNet2DModel and VQModel at the
                 same shapes, eager, NCHW and block-compiled (first step included), MFU; ours at several batches with
                 the peak memory
    samplers     the card's DDPM-1000 + 5x30 at 16 images, DDIM-50 and DPM-Solver++ 20 (its ODE and SDE forms) at
                 16 and 256, with and without CUDA graphs
    profile      one UNet training step under torch.profiler: the top kernels and how much of the step the GPU idles
After every part OUT/gpu_check.json and OUT/gpu_check.md are written again, so a run cut off returns what it
measured; a part that fails or runs out of time is recorded with the end of its output, and the next one runs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARES = {"cuda_tests": 0.3, "training": 0.35, "samplers": 0.25, "profile": 0.1}  # of the budget, in this order


def commands(args, out: Path) -> dict[str, list[list[str]]]:
    """Each part's commands. A dry run keeps every part and flag path, at tiny shapes and one or two steps."""
    py, bench = sys.executable, str(ROOT / "bench" / "throughput.py")
    device = ["--device", args.device]
    tiny = ["--shapes", "tiny"] if args.dry_run else []
    steps = ["--steps", "1" if args.dry_run else "5"]
    batches = (["--vq-batches", "2,4", "--unet-batches", "4,8", "--vq-batch", "2", "--unet-batch", "4", "--no-compiled"]
               if args.dry_run else [])
    return {
        "cuda_tests": [[py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'cuda_tests.xml'}",
                        str(ROOT / "tests")]],
        "training": [[py, bench, *device, "--parts", "models,batches", *steps, *tiny, *batches,
                      "--out", str(out / "training.json")]],
        "samplers": [[py, bench, *device, "--parts", "samplers", "--samplers", "ddim-50" if args.dry_run else "ddpm-repeat",
                      "--sample-counts", "2" if args.dry_run else "16", *tiny, "--out", str(out / "samplers_card.json")],
                     [py, bench, *device, "--parts", "samplers", "--samplers",
                      "dpmpp-sde-20" if args.dry_run else "ddim-50,dpmpp-20,dpmpp-sde-20",
                      *(["--sample-counts", "2,3"] if args.dry_run else []), *tiny, "--out", str(out / "samplers_fast.json")]],
        "profile": [[py, __file__, "--profile-step", *device, *(["--dry-run"] if args.dry_run else []),
                     "--out", str(out)]],
    }


def run_part(name: str, part_commands: list[list[str]], seconds: float) -> dict:
    """Run a part's commands in turn within `seconds`: {ok, seconds, returncodes, tail of the output}."""
    t0, codes, tails = time.perf_counter(), [], []
    for command in part_commands:
        left = seconds - (time.perf_counter() - t0)
        if left <= 1:
            codes.append("no time left")
            break
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=left)
            codes.append(done.returncode)
            tails.append((done.stdout + done.stderr)[-3000:])
        except subprocess.TimeoutExpired as e:
            codes.append(f"timed out after {left:.0f} s")
            tails.append(((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))[-3000:])
    return {"ok": all(c == 0 for c in codes) and len(codes) == len(part_commands), "seconds": time.perf_counter() - t0,
            "returncodes": codes, "output_tail": "\n".join(tails)}


def read_results(name: str, out: Path) -> dict:
    """What a part wrote, read back into the summary (the lists of several files joined)."""
    if name == "cuda_tests":
        return junit_counts(out / "cuda_tests.xml") if (out / "cuda_tests.xml").exists() else {}
    files = {"training": ["training.json"], "samplers": ["samplers_card.json", "samplers_fast.json"],
             "profile": ["profile.json"]}[name]
    results = {}
    for f in files:
        if (out / f).exists():
            for key, value in json.loads((out / f).read_text()).items():
                results[key] = results.get(key, []) + value if isinstance(value, list) else value
    return results


def junit_counts(path: Path) -> dict:
    """pytest's JUnit XML: the counts, and each failing test with the start of its message."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = []
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            failed.append(f"{case.get('name')}: {problem.get('message', '')[:300]}")
    return {**{k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}, "failed": failed}


def summary_line(name: str, part: dict) -> str:
    r = part.get("results", {})
    if name == "cuda_tests" and "tests" in r:
        return f"{r['tests']} tests, {r['failures']} failed, {r['errors']} errors, {r['skipped']} skipped"
    if name == "training" and r.get("models"):
        return "; ".join(f"{row['case']} {row['model']}: {row['per_s']:.0f} {row['unit']}/s" for row in r["models"])
    if name == "samplers" and r.get("samplers"):
        return "; ".join(f"{row['sampler']} b{row['batch']}{' graphs' if row['cuda_graphs'] else ''}: "
                         f"{1e3 * row['s_per_image']:.1f} ms/image" for row in r["samplers"])
    if name == "profile" and r.get("top_kernels"):
        idle = r["gpu_idle_fraction"]
        return (f"step {r['step_ms']:.1f} ms, GPU idle {'-' if idle is None else f'{idle:.0%}'}; "
                f"top: {r['top_kernels'][0]['name'][:60]}")
    return "" if part["ok"] else str(part["returncodes"])


def write_report(report: dict, out: Path):
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    lines = [f"# GPU check, {report['started']}", "", f"device: {report['device']}; torch {report['torch']}; "
             f"dry run: {report['dry_run']}", "", "| part | ok | seconds | summary |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        lines.append(f"| {name} | {'yes' if part['ok'] else 'NO'} | {part['seconds']:.0f} | {summary_line(name, part)} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- the profile part

def profile_step(args, out: Path):
    """One UNet training step (after 3 to warm up) under torch.profiler: the 10 kernels that take longest, and the
    fraction of the step's wall-clock time in which no kernel ran (the GPU waiting for the CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT))
    from throughput import SHAPES, our_unet, unet_loss
    from diffusion.gaussian import GaussianDiffusion
    from runtime.optimizer import adamw

    device, s = torch.device(args.device), SHAPES["tiny" if args.dry_run else "full"]
    model = our_unet(s).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer, diffusion = adamw(model.parameters(), 1e-4), GaussianDiffusion(prediction="v").to(device)
    z = torch.randn(4 if args.dry_run else s.unet["batch_size"], 4, s.latent, s.latent, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def step():
        with autocast:
            loss = unet_loss(model, diffusion, z, True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    key = "device_time_total" if cuda else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    kernels = [e for e in events if not cuda or getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy_us = sum(getattr(e, "self_device_time_total", 0) for e in kernels) if cuda else None
    result = {"batch": len(z), "step_ms": wall_us / 1e3,
              "top_kernels": [{"name": e.key, "ms": getattr(e, key, 0) / 1e3, "calls": e.count} for e in kernels[:10]],
              "gpu_idle_fraction": max(0.0, 1 - busy_us / wall_us) if cuda else None}
    (out / "profile.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- the check

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and each part's files")
    parser.add_argument("--device", default=None, help="cuda (default), or cpu for a dry run")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of all parts (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes and one step: proves the command, measures nothing")
    parser.add_argument("--parts", default=",".join(SHARES), help="parts to run (default: all, in order)")
    parser.add_argument("--profile-step", action="store_true", help=argparse.SUPPRESS)  # the profile part's own process
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.profile_step:
        return profile_step(args, out)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else "CPU"
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": name, "torch": torch.__version__,
              "dry_run": args.dry_run, "minutes": args.minutes, "parts": {}}
    deadline = time.perf_counter() + 60 * args.minutes
    plan = commands(args, out)
    wanted = [p for p in SHARES if p in args.parts.split(",")]
    for i, part in enumerate(wanted):
        left = deadline - time.perf_counter()
        share = SHARES[part] / sum(SHARES[p] for p in wanted[i:])   # what earlier parts left unused is passed on
        print(f"part {part}: up to {left * share:.0f} s", flush=True)
        result = run_part(part, plan[part], left * share)
        result["results"] = read_results(part, out)
        report["parts"][part] = result
        write_report(report, out)
        print(f"part {part}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.0f} s; "
              f"{summary_line(part, result)}", flush=True)
    print((out / "gpu_check.md").read_text())
    return 0 if all(p["ok"] for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
