"""bench compare --tree: Serve systems run from another checkout, and the report's revision ratios."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tree(tmp_path):
    """A checkout-shaped folder whose shipped config differs from this one's in one setting."""
    import yaml

    (tmp_path / "cluster").mkdir()
    (tmp_path / "serve").mkdir()
    config = yaml.safe_load((ROOT / "cluster" / "serve_local.yaml").read_text())
    config["applications"][0]["deployments"][0]["max_ongoing_requests"] = 7
    (tmp_path / "cluster" / "serve_local.yaml").write_text(yaml.safe_dump(config))
    for name in ("__main__.py", "app.py"):
        (tmp_path / "serve" / name).write_text("")
    return tmp_path


def test_tree_systems_parse_and_are_checked(tree, tmp_path_factory):
    from bench.compare import parse_args

    a = parse_args(["--store", "s", "--tree", f"old={tree}", "--systems", "textserve-default@old,textserve-default"])
    assert a.systems == ["textserve-default@old", "textserve-default"]
    assert a.trees["old"].path == str(tree.resolve())
    empty = tmp_path_factory.mktemp("empty")
    for bad in (["--systems", "textserve-default@new"],  # no such tree
                ["--tree", f"old={empty}", "--systems", "textserve-default@old"],  # not a checkout
                ["--tree", f"bad name={tree}", "--systems", "textserve-default"],
                ["--tree", f"old={tree}", "--tree", f"old={tree}", "--systems", "textserve-default@old"],
                ["--tree", f"old={tree}", "--systems", "tuned-single@old"],  # not a Serve variant
                ["--tree", f"old={tree}", "--systems", "textserve-default@old,textserve-default@old"]):
        with pytest.raises(SystemExit):
            parse_args(["--store", "s", *bad])


def test_a_tree_system_runs_the_trees_own_config_and_code(tree):
    from bench.compare import VARIANTS
    from bench.systems import SourceTree, start_variant, variant_changes

    source = SourceTree.parse(f"old={tree}")
    system = start_variant(VARIANTS["textserve-default"], "/store", 8123, tree=source)
    try:
        app = system.config["applications"][0]
        assert app["deployments"][0]["max_ongoing_requests"] == 7  # the tree's shipped value
        assert app["args"]["model_store"] == "/store" and system.port == 8123
        assert app["args"]["learner"]["state_dir"] == system.state_dir
        command = system.command()
        assert command[:3] == ["env", "-C", str(tree.resolve())] and command[4:7] == ["-m", "serve", "run"]
        assert system.environment()["PYTHONPATH"].split(":")[0] == str(tree.resolve())
    finally:
        system.cleanup()
    assert not Path(system.state_dir).exists() and not Path(system._config_path).exists()
    assert variant_changes(VARIANTS["textserve-default"], source) == {}  # as that tree ships it
    batched = variant_changes(VARIANTS["textserve-batched-1"], source)  # against the tree's own, too
    assert batched["applications.0.deployments.0.num_replicas"] == (None, 1)
    assert "applications.0.deployments.0.max_ongoing_requests" not in batched


def _row(users, tps, p99, cpu):
    runs = [{"users": users, "tps": t, "p50_ms": 10.0, "p99_ms": p, "cpu_s_per_1k": c}
            for t, p, c in zip(tps, p99, cpu)]
    return {"users": users, "tps": sorted(tps)[1], "p50_ms": 10.0, "p99_ms": sorted(p99)[1],
            "cpu_s_per_1k": sorted(cpu)[1], "runs": runs}


def test_revision_ratios_per_round():
    from bench.compare_report import revision_lines

    report = {"users": [64], "interleaved": True, "trees": {"A": {}, "B": {}},
              "systems": {"textserve-default@A": {"closed_loop": [_row(64, [100, 110, 90], [50, 60, 40], [2, 2, 2])]},
                          "textserve-default@B": {"closed_loop": [_row(64, [110, 99, 99], [50, 60, 40], [1, 3, 2])]}}}
    lines = revision_lines(report)
    row = next(line for line in lines if line.startswith("| B / A | 64 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "0.99x (rounds 1.10x, 0.90-1.10)"  # medians 99/100; rounds 110/100, 99/110, 99/90
    assert cells[5] == "1.00x (rounds 1.00x, 1.00-1.00)" and cells[6] == "1.00x (rounds 1.00x, 0.50-1.50)"
    assert not any(line.startswith("| A / B") for line in lines)  # later trees over earlier ones only
