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
                           "--reps", "1", "--json", str(out)], cwd=tmp_path,
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
        # recomputation keeps x (+ stats), not the 8 candidates' intermediates
        assert m["saved_MB_fused"] * 8 < m["saved_MB_ref_cl"]
        assert 0 < m["floor_ms"] and m["fused_ms"] > 0
    sn = rep["supernet"]
    assert (sn["resolution"], sn["batch"]) == (32, 2)
    assert sn["saved_MB_fused"] * 8 < sn["saved_MB_ref_cl"]
    assert sn["max_rss_MB_fused"] > 0 and sn["max_rss_MB_ref_cl"] > 0
    q = sn["quick_size"]
    assert (q["resolution"], q["batch"]) == (32, 2)
    assert min(q["fused_s"], q["ref_cl_s"], q["speedup_vs_ref_cl"]) > 0
    masks = rep["masks"]
    assert [(k, v["soft"]["resolution"]) for k, v in masks.items()] == [("quick", 32),
                                                                         ("224", 224)]
    for v in masks.values():
        assert sorted(v) == ["hard", "soft", "two-path"]
        assert v["soft"]["speedup_vs_soft"] == 1.0
        assert all(m["images_per_s"] == 2 / m["step_s"] for m in v.values())
