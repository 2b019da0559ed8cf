"""The table of benchmarks/gpu_check.sh from fake stage results: figures parsed, failures,
timeouts and skips marked, `pytest -m gpu` without CUDA never reported as a pass."""

from __future__ import annotations

import json

from benchmarks import gpu_check

ENV = {
    "nvidia_smi": None,
    "cuda_available": False,
    "torch": "2.x",
    "torch_cuda": None,
    "cudnn": None,
    "python": "3.11",
    "cpus": 2,
    "commit": None,
    "installed": "nothing",
}
LOADER = {
    "config": {"hidden": 768, "layers": [9, 5, 5], "batch": 32, "workers": 8},
    "loader_samples_per_s": 5000.0,
    "train_samples_per_s": 400.0,
    "headroom": 12.5,
}
JUNIT = '<testsuites><testsuite tests="2" failures="0" errors="2" skipped="0"/></testsuites>'


def test_table_marks_each_outcome(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir(), results.mkdir()
    (work / "env.json").write_text(json.dumps(ENV))
    (work / "loader.json").write_text(json.dumps(LOADER))
    (work / "pytest.xml").write_text(JUNIT)
    rows = [  # name, status, exit code, seconds, budget, log, command
        ("env", "OK", 0, 5),
        ("frcnn", "OK", 0, 9),  # exit 0 but no frcnn.json: FAILED
        ("vit", "TIMEOUT", 124, 110),
        ("lxmert", "SKIPPED", 0, 0),
        ("loader", "OK", 0, 20),
        ("pytest", "FAILED", 1, 8),  # no CUDA: NO-CUDA
    ]
    lines = [f"{n}\t{s}\t{rc}\t{t}\t100\t{n}.log\tcmd {n}" for n, s, rc, t in rows]
    (work / "stages.tsv").write_text("\n".join(lines) + "\n")
    for name, *_ in rows:
        (results / f"{name}.log").write_text(f"$ cmd {name}\nlast line of {name}\n")

    gpu_check.table(work, results, "gpu", 152.0)

    out = json.loads((results / "results.json").read_text())
    status = {s["name"]: s["status"] for s in out["stages"]}
    assert status == {
        "env": "OK",
        "frcnn": "FAILED",
        "vit": "TIMEOUT",
        "lxmert": "SKIPPED",
        "loader": "OK",
        "pytest": "NO-CUDA",
    }
    table = (results / "table.md").read_text()
    assert "headroom 12.5x" in table and "2 errors" in table
    assert "## vit: TIMEOUT (exit 124), log tail" in table and "last line of vit" in table
    assert "## lxmert" not in table  # a skipped stage has no log worth a tail
