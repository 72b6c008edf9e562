"""bench.tp_passes on the CPU: the same ranks, passes and all-reduces as on GPUs, over gloo with a tiny model
(the GPU run adds CUDA graphs, torch.compile and profiles). Keeps the device runs' tool working between them."""

from __future__ import annotations

import json

from bench import tp_passes


def test_two_gloo_ranks_time_each_row_count_and_write_the_record(tmp_path):
    out = tmp_path / "tp.json"
    tp_passes.main(["--model", "dummy:tiny", "--device", "cpu", "--dtype", "float32", "--rows", "1,3",
                    "--max-seq-len", "64", "--prompt-len", "8", "--stack", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["card"] == "CPU (2 processes)" and record["shapes"]["world"] == 2
    assert record["shapes"]["stack_projections"] is True  # each rank's own slices stacked
    assert record["command"].startswith("python3 -m bench.tp_passes --model dummy:tiny")
    for name in ("pass_ms", "all_reduces_ms", "first_pass_s"):
        assert set(record[name]) == {"1", "3"}
    assert all(ms > 0 for ms in record["pass_ms"].values())
    assert all(ms > 0 for ms in record["all_reduces_ms"].values())
