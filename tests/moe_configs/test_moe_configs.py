"""Fused-MoE config files: sglang/vLLM names, both layouts, nearest-M, fallbacks, shipped tables."""

from __future__ import annotations

import json
import logging

import pytest

from moed.moe_configs import lookup

DEV = "NVIDIA H100 80GB HBM3"
CFG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 4}


def cfg(bm: int, **kw) -> dict:
    return {**CFG, "BLOCK_SIZE_M": bm, **kw}


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv(lookup.ENV_DIR, str(tmp_path))
    lookup.clear_cache()
    yield tmp_path
    lookup.clear_cache()


def test_moe_config_file_names_match_sglang_and_vllm():
    assert (
        lookup.file_name(257, 2048, DEV, "fp8_w8a8", [128, 128])
        == "E=257,N=2048,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128, 128].json"
    )
    assert (
        lookup.file_name(257, 2048, DEV, "fp8_w8a8", [128, 128], down=True)
        == "E=257,N=2048,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128, 128]_down.json"
    )
    assert (
        lookup.file_name(256, 256, DEV, "fp8_w8a8", (128, 128), vllm=True)
        == "E=256,N=256,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json"
    )
    assert lookup.file_name(256, 512, DEV, None, None) == "E=256,N=512,device_name=NVIDIA_H100_80GB_HBM3.json"
    assert lookup.triton_dir_name("3.6.0") == "triton_3_6_0"
    assert lookup.triton_dir_name("3.9.0+git1234") == "triton_3_9_0"


def test_moe_config_nearest_batch_size_ties_to_smaller():
    table = {1: cfg(16), 64: cfg(32), 128: cfg(64)}
    assert lookup.nearest(table, 1)["BLOCK_SIZE_M"] == 16
    assert lookup.nearest(table, 40)["BLOCK_SIZE_M"] == 32
    assert lookup.nearest(table, 96)["BLOCK_SIZE_M"] == 32  # tie between 64 and 128 -> 64
    assert lookup.nearest(table, 97)["BLOCK_SIZE_M"] == 64
    assert lookup.nearest(table, 10**6)["BLOCK_SIZE_M"] == 64


def test_moe_config_sglang_layout_with_down_table(root, caplog):
    d = root / "triton_3_6_0"
    d.mkdir()
    name = lookup.file_name(257, 2048, DEV, "fp8_w8a8", [128, 128])
    (d / name).write_text(json.dumps({"triton_version": "3.6.0", "1": cfg(16), "4096": cfg(64)}))
    (d / name.replace(".json", "_down.json")).write_text(
        json.dumps({"1": {**cfg(32, BLOCK_SIZE_N=128), "USE_TMA": True}, "4096": cfg(128)})
    )
    with caplog.at_level(logging.WARNING, logger="moed.moe_configs"):
        t = lookup.get_tables(257, 2048, "fp8_w8a8", [128, 128], DEV, "3.6.0")
    assert not caplog.records  # the installed version's file: no warning
    up, down = t.pick(2)
    assert up == cfg(16)
    assert down["BLOCK_SIZE_N"] == 128 and down["BLOCK_SIZE_M"] == 16  # down BLOCK_SIZE_M follows the up table
    assert "USE_TMA" not in down
    up, down = t.pick(5000)
    assert up["BLOCK_SIZE_M"] == down["BLOCK_SIZE_M"] == 64


def test_moe_config_other_triton_version_warns_once(root, caplog):
    for ver in ("triton_3_2_0", "triton_3_5_1"):
        (root / ver).mkdir()
        (root / ver / lookup.file_name(256, 512, DEV, None, None)).write_text(
            json.dumps({"8": cfg(32 if ver.endswith("5_1") else 16)})
        )
    with caplog.at_level(logging.WARNING, logger="moed.moe_configs"):
        t = lookup.get_tables(256, 512, None, None, DEV, "3.6.0")
        lookup.get_tables(256, 512, None, None, DEV, "3.6.0")
    assert t.source.parent.name == "triton_3_5_1"  # newest other version first
    assert t.pick(8)[0]["BLOCK_SIZE_M"] == 32
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "triton_3_6_0/E=256,N=512,device_name=NVIDIA_H100_80GB_HBM3.json" in warnings[0].getMessage()


def test_moe_config_vllm_flat_layout_loads(root):
    name = lookup.file_name(256, 256, DEV, "fp8_w8a8", [128, 128], vllm=True)
    assert "[128,128]" in name
    (root / name).write_text(json.dumps({"1": cfg(64, GROUP_SIZE_M=16, num_stages=3), "2": cfg(16)}))
    t = lookup.get_tables(256, 256, "fp8_w8a8", [128, 128], DEV, "3.6.0")
    assert t.source == root / name and t.down is None
    up, down = t.pick(1)
    assert up["BLOCK_SIZE_M"] == 64 and up["GROUP_SIZE_M"] == 16 and down == up


def test_moe_config_vllm_h200_name_normalisation(root):
    (root / lookup.file_name(256, 1024, "NVIDIA H200", None, None, vllm=True)).write_text(json.dumps({"1": cfg(16)}))
    t = lookup.get_tables(256, 1024, None, None, "NVIDIA H200 NVL", "3.6.0")
    assert t.source is not None and t.source.name == "E=256,N=1024,device_name=NVIDIA_H200.json"


def test_moe_config_defaults_with_one_warning_naming_the_file(root, caplog):
    with caplog.at_level(logging.WARNING, logger="moed.moe_configs"):
        t = lookup.get_tables(300, 777, "fp8_w8a8", [128, 128], DEV, "3.6.0")
        t.pick(1)
        lookup.get_tables(300, 777, "fp8_w8a8", [128, 128], DEV, "3.6.0").pick(4096)
    assert t.up is None and t.source is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "E=300,N=777,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128, 128].json" in msg
    small, _ = t.pick(1)
    big, _ = t.pick(4096)
    assert small["BLOCK_SIZE_K"] == big["BLOCK_SIZE_K"] == 128
    assert small["BLOCK_SIZE_M"] < big["BLOCK_SIZE_M"]


@pytest.mark.parametrize(
    "body,match",
    [
        ("not json", "cannot read JSON"),
        ('{"x": {}}', "not a batch size"),
        ('{"1": {"BLOCK_SIZE_M": 16}}', "lacks"),
        (
            '{"1": {"BLOCK_SIZE_M": 0, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4, '
            '"num_stages": 3}}',
            "positive int",
        ),
        ("[]", "top level"),
    ],
)
def test_moe_config_bad_file_is_named(root, body, match):
    p = root / "bad.json"
    p.write_text(body)
    with pytest.raises(lookup.ConfigFileError, match=match) as e:
        lookup.load_table(p)
    assert "bad.json" in str(e.value)


def test_moe_config_shipped_tables_are_valid():
    """Every table moed ships parses, names a GLM-5.1 shape and passes the kernel's config check."""
    from moed.kernels.fused_moe_config import check_config

    files = sorted(lookup.PACKAGE_DIR.glob("triton_*/*.json"))
    for f in files:
        table = lookup.load_table(f)
        fp8 = "dtype=fp8_w8a8" in f.name
        assert f.name.startswith(("E=256,", "E=257,")), f
        for m, c in table.items():
            check_config(c, fp8, (128, 128) if fp8 else None, f"{f.name}[{m}]")
        if f.name.endswith("_down.json"):
            up = lookup.load_table(f.with_name(f.name.replace("_down.json", ".json")))
            assert all(up[m]["BLOCK_SIZE_M"] == table[m]["BLOCK_SIZE_M"] for m in table)
