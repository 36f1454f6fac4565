"""`mtplx bench --model M --concurrency`: B streams batched against one at a time, in one process
(the structure of the report and that both ways give the same tokens; no timing asserts)."""

from __future__ import annotations

import json

import pytest


def test_concurrency_bench_reports_every_cell_and_the_same_tokens(grafted_bf16, tmp_path):
    from click.testing import CliRunner

    from mtplx.cli.commands import cli

    out = tmp_path / "c.json"
    result = CliRunner().invoke(cli, ["bench", "--model", str(grafted_bf16[0]), "--concurrency", "1,2",
                                      "--depths", "0,2", "--max-tokens", "8", "--temperature", "0", "--join-tokens", "160",
                                      "--prefill-chunk", "64,256", "--json", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())["concurrency"]
    assert set(r["streams"]) == {"1", "2"} and all(set(row) == {"0", "2"} for row in r["streams"].values())
    for row in r["streams"].values():
        for cell in row.values():
            for way in ("batched", "one_at_a_time"):
                assert cell[way]["aggregate_tokens_per_s"] > 0 and cell[way]["ttft_s"] > 0
            assert cell["identical"] is True  # greedy: each stream's tokens do not depend on the batch
            assert cell["batched"]["tokens"] == cell["one_at_a_time"]["tokens"] > 0
    # depth 0 also runs mlx_lm.batch_generate on the same trunk: at greedy, the same tokens
    for row in r["streams"].values():
        assert row["0"]["mlx_lm"]["aggregate_tokens_per_s"] > 0 and row["0"]["vs_mlx_lm"] > 0
        assert row["0"]["same_as_mlx_lm"] is True and "mlx_lm" not in row["2"]
    # the join, once per prefill chunk: a smaller chunk takes more steps
    small, large = r["join_cost"]
    assert [small["prefill_chunk"], large["prefill_chunk"]] == [64, 256]
    for j in (small, large):
        assert j["running_rows"] == 1 and j["steps_while_joining"] >= -(-j["prompt_tokens"] // j["prefill_chunk"])
        assert 0 < j["worst_gap_s"] <= j["prefill_s"] and j["solo_prefill_s"] > 0
    assert small["steps_while_joining"] > large["steps_while_joining"]
    assert "streams" in result.output and "worst gap" in result.output and "mlx_lm.batch_generate" in result.output


@pytest.mark.parametrize("args, named", [(["--concurrency", "0"], "--concurrency"),
                                         (["--concurrency", "2", "--chat-turns", "2"], "--chat-turns"),
                                         (["--concurrency", "2", "--prefill-chunk", "256,,512"], "--prefill-chunk")])
def test_bad_concurrency_is_one_clear_error(args, named):
    from click.testing import CliRunner

    from mtplx.cli.commands import cli

    result = CliRunner().invoke(cli, ["bench", "--model", "demo", *args])
    assert result.exit_code != 0 and "Traceback" not in result.output and named in result.output
