"""bench/report.py end to end on tiny shapes, so the report script cannot rot. Its timings
are not asserted (no timed assertions in tests); the bytes saved for backward are exact."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_report_quick_writes_every_section(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--quick",
                           "--reps", "1", "--archs", "2", "--json", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads(out.read_text())
    assert rep["machine"]["gemm_gflops"] > 0
    assert [(d["C"], d["H"], d["K"], d["stride"]) for d in rep["depthwise"]] == [
        (24, 14, 3, 1), (48, 14, 5, 2)]
    for d in rep["depthwise"]:
        assert d["ours_ms"] > 0 and d["speedup_vs_best"] == min(d["speedup_vs_nchw"],
                                                                d["speedup_vs_cl"])
    for m in rep["mixed_block"]:
        # x (+ stats), not the 8 candidates' intermediates; maps this small also keep D and
        # Z (fused_cpu.KEEP_BYTES), which stays under half the reference's; the whole step
        # (below) under an eighth
        assert m["saved_MB_fused"] * 2 < m["saved_MB_ref_cl"]
        assert 0 < m["floor_ms"] and m["fused_ms"] > 0
    sn = rep["supernet"]
    assert (sn["resolution"], sn["batch"]) == (32, 2)
    # at 32x32, batch 2 every layer keeps D and Z, the wide ones A too (test_fused_cpu.py
    # checks the eighth at the main job's size, where it holds)
    assert sn["saved_MB_fused"] * 2 < sn["saved_MB_ref_cl"]
    assert sn["max_rss_MB_fused"] > 0 and sn["max_rss_MB_ref_cl"] > 0
    q = sn["quick_size"]
    assert (q["resolution"], q["batch"]) == (32, 2)
    assert min(q["fused_s"], q["ref_cl_s"], q["speedup_vs_ref_cl"], q["fused_alone_s"]) > 0
    masks = rep["masks"]
    assert [(k, v["soft"]["resolution"]) for k, v in masks.items()] == [("quick", 32),
                                                                         ("224", 224)]
    for v in masks.values():
        assert sorted(v) == ["hard", "soft", "two-path"]
        assert v["soft"]["speedup_vs_soft"] == 1.0
        assert all(m["images_per_s"] == 2 / m["step_s"] for m in v.values())
    disc = rep["discrete"]
    assert len(disc) == 2 and all(len(d["arch"]) == 22 and d["batch"] == 2 for d in disc)
    assert all(min(d["fused_ms"], d["plain_ms"], d["speedup"]) > 0 for d in disc)


def test_gpu_compare_on_the_stored_h200_run(tmp_path):
    """bench/gpu_compare.py against the stored H200 report and an edited copy of it: the
    triton rows twice as fast, one row dropped, the memory halved on one."""
    stored = ROOT / "bench" / "gpu_runs" / "h200-2026-11-29" / "report.json"
    report = json.loads(stored.read_text())
    rows = report["timings"]
    for r in rows:
        if r["provider"] == "triton":
            r["median_s"] /= 2
    rows[0]["peak_bytes"] //= 2
    del rows[1]
    new = tmp_path / "new.json"
    new.write_text(json.dumps(report))
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_compare
    finally:
        sys.path.pop(0)
    out = gpu_compare.compare(gpu_compare.timed_rows(str(stored)), gpu_compare.timed_rows(str(new)))
    timed = sum("median_s" in r for r in json.loads(stored.read_text())["timings"])
    assert len(out) == timed - 1
    for r in out:
        assert abs(r["speedup"] - (2.0 if r["provider"] == "triton" else 1.0)) < 1e-9
    first = out[0]
    assert (first["kind"], first["where"], first["provider"]) == ("layer", "[16, 16, 1, 112]",
                                                                  "eager_nchw")
    assert abs(first["memory_ratio"] - 0.5) < 1e-6
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_compare.py"), str(stored),
                           str(new)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "(1 rows are in one file only)" in proc.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_compare.py"), str(stored),
                           str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not a gpu_report.py JSON" in proc.stderr
