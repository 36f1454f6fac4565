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
                                      "--depths", "0,2", "--max-tokens", "8", "--temperature", "0", "--join-tokens", "600",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())["concurrency"]
    assert set(r["streams"]) == {"1", "2"} and all(set(row) == {"0", "2"} for row in r["streams"].values())
    for row in r["streams"].values():
        for cell in row.values():
            for way in ("batched", "one_at_a_time"):
                assert cell[way]["aggregate_tokens_per_s"] > 0 and cell[way]["ttft_s"] > 0
            assert cell["identical"] is True  # greedy: each stream's tokens do not depend on the batch
            assert cell["batched"]["tokens"] == cell["one_at_a_time"]["tokens"] > 0
    j = r["join_cost"]
    assert j["running_rows"] == 1 and j["steps_while_joining"] >= j["prompt_tokens"] // j["prefill_chunk"]
    assert "streams" in result.output and "joining" in result.output


@pytest.mark.parametrize("args", [["--concurrency", "0"], ["--concurrency", "2", "--chat-turns", "2"]])
def test_bad_concurrency_is_one_clear_error(args):
    from click.testing import CliRunner

    from mtplx.cli.commands import cli

    result = CliRunner().invoke(cli, ["bench", "--model", "demo", *args])
    assert result.exit_code != 0 and "Traceback" not in result.output and "--c" in result.output
