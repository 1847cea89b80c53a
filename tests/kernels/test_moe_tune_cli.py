"""`moed tune-moe` hands its options to the tuner unchanged (the issue's own command line starts with one)."""

from __future__ import annotations

import json

import pytest

from moed.daemon.cli import main


def test_moe_tune_cli_passes_options_to_the_tuner(capsys):
    # An invalid --dtype is rejected by the tuner's own parser, which proves --E/--N reached it.
    with pytest.raises(SystemExit) as e:
        main(["tune-moe", "--E", "256", "--N", "1024", "512", "--dtype", "fp9"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "moed tune-moe" in err and "fp9" in err


def test_moe_tune_cli_help_is_the_tuners(capsys):
    with pytest.raises(SystemExit):
        main(["tune-moe", "--help"])
    assert "--batch-sizes" in capsys.readouterr().out


def test_moe_tune_cli_other_commands_still_reject_unknown_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["config", "check", "x.toml", "--bogus"])
    assert e.value.code == 2
    assert "--bogus" in capsys.readouterr().err


def test_moe_tune_tables_from_log_round_trip(tmp_path):
    from moed.kernels.fused_moe_tuner import _short, tables_from_log
    from moed.kernels.fused_moe_tuner import main as tune_main
    from moed.moe_configs import lookup

    up = {
        "BLOCK_SIZE_M": 16,
        "BLOCK_SIZE_N": 64,
        "BLOCK_SIZE_K": 128,
        "GROUP_SIZE_M": 1,
        "num_warps": 4,
        "num_stages": 4,
        "A_QUANT_IN_GEMM": False,
    }
    down = {**up, "BLOCK_SIZE_N": 128, "num_stages": 3, "A_QUANT_IN_GEMM": True}
    big = {
        "BLOCK_SIZE_M": 64,
        "BLOCK_SIZE_N": 128,
        "BLOCK_SIZE_K": 64,
        "GROUP_SIZE_M": 16,
        "num_warps": 8,
        "num_stages": 3,
    }
    log = "\n".join(
        [
            "tune-moe on NVIDIA H100 80GB HBM3, Triton 3.6.0, torch 2.11.0+cu130; writing /x",
            "[fp8_w8a8 E=256 N=512 K=6144] 2 of 2 batch sizes to tune",
            "  compiled 98 kernel variants in 9.7s with 16 processes (0 unusable)",
            f"  M=    1: gate_up     28.6 us {_short(up)} | down     13.8 us {_short(down)}  (0.9s)",
            f"  M= 4096: gate_up    921.8 us {_short(up)} | down    717.0 us {_short(down)}  (0.8s)",
            "[bf16 E=257 N=256 K=6144] 2 of 2 batch sizes to tune",
            f"  M=    1: gate_up     75.2 us {_short(big)} | down     38.6 us {_short(big)}  (1.5s)",
        ]
    )
    tables = tables_from_log(log)
    assert tables[("fp8_w8a8", 256, 512, 6144)] == {"1": {"up": up, "down": down}, "4096": {"up": up, "down": down}}
    assert tables[("bf16", 257, 256, 6144)] == {"1": {"up": big, "down": big}}
    path = tmp_path / "tune.log"
    path.write_text(log)
    # The bf16 job lacks M=4096: only the complete fp8 table is written.
    assert tune_main(["--from-log", str(path), "--batch-sizes", "1,4096", "--out-dir", str(tmp_path)]) == 0
    name = lookup.file_name(256, 512, "NVIDIA H100 80GB HBM3", "fp8_w8a8", [128, 128])
    assert json.loads((tmp_path / name).read_text())["4096"] == up
    assert json.loads((tmp_path / name.replace(".json", "_down.json")).read_text())["1"] == down
    assert not list(tmp_path.glob("E=257*"))


def test_moe_tune_int4_tries_cuda_core_tiles_for_decode_and_logs_them(tmp_path):
    """int4 candidates for decode include GEMV_ROWS tiles (none past GEMV_MAX_TOKENS), every one within the register
    budget, each with and without split K; their log line round-trips, and the lookup keeps the keys."""
    from moed.kernels.fused_moe_tuner import GEMV_MAX_TOKENS, GEMV_PRODUCTS, INT4, _parse_short, _short, candidates
    from moed.moe_configs import lookup

    one = [c for c in candidates(1, INT4) if c.get("GEMV_ROWS")]
    assert one and {c["GEMV_ROWS"] for c in one} == {1}
    four = [c for c in candidates(4, INT4) if c.get("GEMV_ROWS")]
    assert {c["GEMV_ROWS"] for c in four} == {1, 2, 4}
    assert all(c["GEMV_ROWS"] * c["BLOCK_SIZE_K"] // 2 * c["BLOCK_SIZE_N"] <= GEMV_PRODUCTS for c in four)
    assert not [c for c in candidates(GEMV_MAX_TOKENS * 2, INT4) if c.get("GEMV_ROWS")]
    assert not [c for c in candidates(1, "fp8_w8a8") if c.get("GEMV_ROWS")]
    assert {c.get("SPLIT_K", 1) for c in four} == {1, 2, 4, 8}
    for c in four:
        assert _parse_short(_short(c)) == c
    unpack = [c for c in candidates(4, INT4) if c.get("UNPACK_BF16")]
    assert unpack and not any(c.get("GEMV_ROWS") for c in unpack)
    assert not [c for c in candidates(128, INT4) if c.get("UNPACK_BF16")]
    assert not [c for c in candidates(4, "fp8_w8a8") if c.get("UNPACK_BF16")]
    for c in unpack:
        assert _parse_short(_short(c)) == c
    words = [c for c in four if c.get("GEMV_WORDS")]
    assert words and {c["GEMV_ROWS"] for c in words} == {1}
    assert {c.get("SPLIT_K", 1) for c in words} == {1, 2, 4, 8}
    a8 = [c for c in candidates(4, INT4) if c.get("A8")]
    assert a8 and not any(c.get("GEMV_ROWS") or c.get("UNPACK_BF16") for c in a8)
    assert [c for c in candidates(4096, INT4) if c.get("A8")] and not [c for c in candidates(4, "bf16") if c.get("A8")]
    for c in a8:
        assert _parse_short(_short(c)) == c
    pairs = [c for c in a8 if c.get("PAIRS")]
    assert {c.get("SPLIT_K", 1) for c in pairs} == {1, 2, 4} and not [c for c in candidates(4096, INT4) if "PAIRS" in c]
    split = next(c for c in four if c.get("SPLIT_K") == 4)
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"1": split, "2": words[0], "8": unpack[0], "16": a8[0], "32": pairs[-1]}))
    assert lookup.load_table(path) == {1: split, 2: words[0], 8: unpack[0], 16: a8[0], 32: pairs[-1]}
    for bad, why in (
        ({**split, "GEMV_ROWS": 3}, "GEMV_ROWS=3"),
        ({**split, "SPLIT_K": 3}, "SPLIT_K=3; want a power of two"),
        ({**split, "GEMV_ROWS": 0}, "SPLIT_K=4 without GEMV_ROWS"),
        ({**unpack[0], "UNPACK_BF16": 1}, "UNPACK_BF16=1; want true or false"),
        ({**split, "UNPACK_BF16": True}, "UNPACK_BF16=True; want true or false, and false with GEMV_ROWS"),
        ({**unpack[0], "GEMV_WORDS": True}, "GEMV_WORDS=True; want true or false, and false without GEMV_ROWS"),
        ({**words[0], "GEMV_WORDS": "yes"}, "GEMV_WORDS='yes'"),
        ({**unpack[0], "A8": True}, "A8=True; want true or false, and false with GEMV_ROWS or UNPACK_BF16"),
        ({**unpack[0], "PAIRS": True}, "PAIRS=True; want true or false, and false without A8"),
        ({**a8[0], "PAIRS": 2}, "PAIRS=2"),
    ):
        path.write_text(json.dumps({"1": bad}))
        with pytest.raises(lookup.ConfigFileError, match=rf"table.json: entry '1' has {why}"):
            lookup.load_table(path)


def test_moe_tune_kinds_name_the_options_that_change_the_loop():
    # the tuner's per-kind summary is how a run says what PAIRS or a K split was worth at each M
    from moed.kernels.fused_moe_tuner import _kind, candidates

    kinds = {_kind(c) for c in candidates(1, "int4_w4a16")}
    assert {"a8", "a8 pairs", "a8 split", "a8 pairs split", "bf16", "mma", "gemv", "gemv words"} <= kinds
    assert {"a8 in-step", "a8 in-step split"} <= kinds  # the 16-row tiles' small loads kept in the step, timed too
    assert _kind({"A8": True, "AHEAD": False, "SPLIT_K": 2}) == "a8 in-step split"
    assert _kind({"A8": True, "PAIRS": True, "SPLIT_K": 1}) == "a8 pairs"
    assert _kind({"A_QUANT_IN_GEMM": True}) == "mma quant-in-gemm"
