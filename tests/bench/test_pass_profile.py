"""bench.pass_profile on the CPU: the same passes, their operators grouped (the GPU run groups kernels)."""

from __future__ import annotations

import json

from bench import pass_profile


def test_each_row_count_is_timed_and_its_time_split_into_groups(tmp_path):
    out = tmp_path / "profile.json"
    pass_profile.main(["--model", "dummy:tiny", "--device", "cpu", "--dtype", "float32", "--rows", "1,3",
                       "--prompt-len", "8", "--max-seq-len", "64", "--passes", "2", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["card"] == "CPU" and record["shapes"]["graphs"] is False
    assert set(record["passes"]) == {"1", "3"}
    for p in record["passes"].values():
        assert p["wall_ms"] > 0 and p["groups_ms"]["matrix products"] > 0  # the layers' linear products
        assert abs(sum(p["groups_ms"].values()) - p["kernels_ms"]) < 0.01


def test_kernel_names_fall_into_their_groups():
    assert pass_profile.group_of("sm90_xmma_gemm_bf16bf16_bf16f32") == "matrix products"
    assert pass_profile.group_of("nvjet_tst_64x8_64x16_4x1_v_bz_TNT") == "matrix products"
    assert pass_profile.group_of("void cublasLt::splitKreduce_kernel<32, 16, int, float>") == "matrix products"
    assert pass_profile.group_of("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    assert pass_profile.group_of("_partials") == "attention"  # engine.attention_kernel
    assert pass_profile.group_of("triton_red_fused__to_copy_add_decode_attention_mean_mm_mul_pow_rsqrt_1") == "matrix products"
    assert pass_profile.group_of("triton_poi_fused_add_mul_rsqrt_0") == "other"
    # a bf16 pass's float32 products are attention's; a float32 pass's are the layers' own
    f32 = "sm80_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize32x32x8"
    assert pass_profile.group_of(f32) == "attention" and pass_profile.group_of(f32, float32=True) == "matrix products"
