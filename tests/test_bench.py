"""``mobizo bench all --quick``: files, JSON structure and internal consistency (no timing assertions)."""

import json
import math

import pytest
import torch

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory, run_cli):
    out = tmp_path_factory.mktemp("bench") / "quick"
    threads = torch.get_num_threads()
    try:
        code, err = run_cli(["bench", "all", "--quick", "--out", out, "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    return out, json.loads((out / "results.json").read_text())


def _pos(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_files_and_sections(quick):
    out, res = quick
    assert res["quick"] is True and res["sections"] == ["speed", "memory", "convergence"]
    assert res["environment"]["threads"] == 1 and res["environment"]["torch"]
    for png in ("speed.png", "memory.png", "convergence.png"):
        assert (out / png).read_bytes()[:8] == PNG
    md = (out / "results.md").read_text()
    for heading in ("## Speed", "## Memory", "## Convergence", "Targets:"):
        assert heading in md
    assert _pos(res["seconds"])


def test_speed_records_and_ratios_come_from_the_same_run(quick):
    _, res = quick
    sp = res["speed"]
    assert _pos(sp["peak"]["tiny"]["matmul_gflop_per_s"])
    recs = sp["records"]
    estimators = {(r["engine"], r["estimator"]) for r in recs}
    assert {
        ("eager", "mezo"),
        ("eager", "prge-outer"),
        ("eager", "prge"),
        ("executorch", "prge"),
        ("executorch", "fo"),
        ("eager", "fo"),
    } <= estimators
    for r in recs:
        assert _pos(r["seconds"]) and all(_pos(t) for t in r["times"])
        assert len(r["times"]) == sp["plan"]["rounds"]["tiny"]
        assert r["seconds"] == pytest.approx(sorted(r["times"])[len(r["times"]) // 2])
        assert _pos(r["flops"]) and 0 < r["frac_peak"]
        assert r["sequences_per_s"] == pytest.approx(r["batch"] * (2 * r["q"] if r["q"] else 1) / r["seconds"])

    def sec(engine, est, q, b):
        (r,) = [r for r in recs if (r["engine"], r["estimator"], r["q"], r["batch"]) == (engine, est, q, b)]
        return r["seconds"]

    for row in sp["ratios"]:
        if row.get("fo"):
            continue
        q, b = row["q"], row["batch"]
        assert row["mezo_over_prge"] == pytest.approx(sec("eager", "mezo", q, b) / sec("eager", "prge", q, b))
        if row["eager_over_executorch"] is not None:
            assert row["eager_over_executorch"] == pytest.approx(
                sec("eager", "prge", q, b) / sec("executorch", "prge", q, b)
            )
    # FLOPs scale with q: every estimator pushes 2q copies of the batch through the model
    f1 = next(r["flops"] for r in recs if r["engine"] == "eager" and r["estimator"] == "prge" and r["q"] == 1)
    f4 = next(r["flops"] for r in recs if r["engine"] == "eager" and r["estimator"] == "mezo" and r["q"] == 4)
    assert f4 == pytest.approx(4 * f1)
    targets = {t["target"]: t for t in sp["targets"]}
    t = targets["tiny: prge q=4 >= 2.0x faster than mezo q=4 (batch 1)"]
    assert t["holds"] == (t["value"] >= 2.0) and t["value"] == pytest.approx(
        sec("eager", "mezo", 4, 1) / sec("eager", "prge", 4, 1)
    )
    assert sp["thread_check"] and _pos(sp["thread_check"][0]["mezo_over_prge"])


def test_memory_one_process_per_measurement(quick):
    _, res = quick
    mem = res["memory"]
    modes = {r["mode"] for r in mem["records"]}
    assert modes == {"eager-infer", "et-infer", "eager-zo", "et-zo", "eager-fo", "eager-fo-lora", "et-fo"}
    assert len({r["pid"] for r in mem["records"]}) == len(mem["records"])
    for r in mem["records"]:
        assert _pos(r["peak_rss_mb"]) and _pos(r["baseline_rss_mb"]) and r["peak_rss_mb"] >= r["baseline_rss_mb"]
        if r["steps_peak_rss_mb"] is not None:  # Linux: the high-water mark is reset after loading
            assert 0 < r["steps_peak_rss_mb"] <= r["peak_rss_mb"]
        assert _pos(r["seconds_per_step"])
    by = {r["mode"]: r for r in mem["records"]}
    (ratio,) = [x for x in mem["ratios"] if (x["a"], x["b"]) == ("et-zo", "et-infer")]
    assert ratio["peak"] == pytest.approx(by["et-zo"]["peak_rss_mb"] / by["et-infer"]["peak_rss_mb"])
    assert {t["target"].split(": ", 1)[1].split(" (")[0] for t in mem["targets"]} == {
        "ExecuTorch ZO peak RSS <= 1.25x ExecuTorch inference",
        "ExecuTorch FO peak RSS >= 2x ExecuTorch ZO",
    }


def test_convergence_runs_and_summary(quick):
    _, res = quick
    cv = res["convergence"]
    p = cv["plan"]
    names = {c["name"] for c in cv["contenders"]}
    assert names == {f"prge q={q}" for q in p["queries"]} | {"FO (AdamW)"}
    for c in cv["contenders"]:
        if c["estimator"] != "fo":
            assert c["queries"] * c["batch_size"] == p["sequences_per_step"]
    assert len(cv["runs"]) == len(names) * len(p["seeds"])
    for r in cv["runs"]:
        assert len(r["loss"]) == len(r["seconds"]) == p["steps"]
        assert all(math.isfinite(x) for x in r["loss"]) and all(_pos(s) for s in r["seconds"])
        assert next(e["step"] for e in r["evals"]) == 0 and r["evals"][-1]["step"] == p["steps"]
        assert all(0.0 <= e["accuracy"] <= 1.0 for e in r["evals"])
    assert {s["contender"] for s in cv["summary"]} == names


def test_bad_bench_arguments_are_clean_errors(tmp_path, run_cli):
    code, err = run_cli(["bench", "speed", "--out", tmp_path / "x", "--threads", "0"])
    assert code == 2 and "--threads must be >= 1" in err
    f = tmp_path / "file"
    f.write_text("x")
    code, err = run_cli(["bench", "speed", "--out", f])
    assert code == 2 and "not a directory" in err
