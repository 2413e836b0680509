"""Structure of the benchmark result (no timing asserts: this CPU is shared)."""

from __future__ import annotations

import json

import pytest

from defectcls.bench import benchmark, format_table


@pytest.fixture(scope="module")
def result(tiny_model):
    return benchmark({"tiny": str(tiny_model)}, device="cpu", iters=2, warmup=1, batch=2, request_size=96, naive_iters=1,
                     threads=1)


def test_json_structure(result):
    assert result["device"] == "cpu" and result["batch"] == 2 and result["threads"] >= 1 and result["torch"]
    assert set(result["models"]) == {"tiny"}
    for name, m in result["models"].items():
        for key in ("forward_ms", "cam_ms", "e2e_ms"):
            assert {"p50", "p95"} <= set(m[key]) and m[key]["p95"] >= m[key]["p50"] > 0
        assert m["throughput_ips"] > 0 and m["params"] > 1e6 and m["size_mb"] > 1 and m["peak_mem_mb"] >= 0
        assert m["tta"] == 1   # the shipped model and untrained architectures answer with one view
        assert m["backend"] == "onnx" and {"onnx", "torch"} <= set(m["backends"])
        assert {"decode", "model_cam", "overlay", "encode"} <= set(m["e2e_breakdown_ms"])
        assert result["naive"][name]["e2e_ms"]["p50"] > 0 and result["speedup_e2e"][name] > 0
    tiny = result["models"]["tiny"]
    assert tiny["trained"] is True and {"fnr", "fpr", "auroc"} <= set(tiny["metrics"])
    json.dumps(result, allow_nan=False)


def test_table_for_people(result):
    text = format_table(result)
    assert "tiny" in text and "speedup" in text and "fwd p50/p95 ms" in text


def test_no_naive_and_bad_arguments():
    from defectcls.errors import DefectclsError

    with pytest.raises(DefectclsError):
        benchmark({"mobilenet_v3_large": None}, iters=0)
    with pytest.raises(DefectclsError, match="unknown architecture"):
        benchmark({"not_an_arch": None}, iters=1, naive=False)


def test_bench_cli(capsys):
    from defectcls.cli import main

    assert main(["bench", "--models", "mobilenet_v3_small", "--iters", "1", "--warmup", "0", "--batch", "1",
                 "--img-size", "32", "--no-naive", "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert list(res["models"]) == ["mobilenet_v3_small"] and res["naive"] == {} and res["speedup_e2e"] == {}
    m = res["models"]["mobilenet_v3_small"]
    assert m["trained"] is False and m["img_size"] == 32 and "metrics" not in m and m["forward_ms"]["p50"] > 0
