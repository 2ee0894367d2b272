"""experiments/benchmark.py: a tiny run end to end (figures present, never asserted fast), the
FLOP count, and that its PyTorch network is the JAX network (same logits for the same weights)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import script_runner

from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.nn import onednn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))
import benchmark  # noqa: E402


def test_flops_of_the_tutorials_network_are_the_issues_figures():
    forward, total = benchmark.model_flops(config_lib.PRESETS["tutorial"])
    # conv1 26*26*(3*3*1)*20, conv2 9*9*(5*5*20)*50, dense 800*128 + 128*10 multiply-adds.
    macs = [26 * 26 * 9 * 20, 9 * 9 * 500 * 50, 800 * 128, 128 * 10]
    assert forward == 2 * sum(macs)
    assert total == 2 * sum(macs) + 2 * (2 * sum(macs) - macs[0])   # no input gradient for conv1
    assert round(forward / 1e6, 1) == 4.5 and round((total - forward) / 1e6, 1) == 8.8


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_torch_network_computes_the_jax_network(pool):
    torch = pytest.importorskip("torch")
    config = config_lib.replace(config_lib.PRESETS["tutorial"], pool=pool, init="he")
    params, model_state = model.init(jax.random.key(3), config)
    net = benchmark.torch_net(config)
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for m, name in zip(convs, ["conv1", "conv2"]):
            m.weight.copy_(torch.from_numpy(np.asarray(params[name]["w"]).transpose(3, 2, 0, 1).copy()))
            m.bias.copy_(torch.from_numpy(np.array(params[name]["b"])))
        # JAX flattens (H, W, C); torch flattens (C, H, W): permute dense1's input rows to match.
        h, w, c = dict(model.layer_shapes(config))["pool2"]
        dense1 = np.asarray(params["dense1"]["w"]).reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
        linears[0].weight.copy_(torch.from_numpy(dense1.T.copy()))
        linears[0].bias.copy_(torch.from_numpy(np.array(params["dense1"]["b"])))
        linears[1].weight.copy_(torch.from_numpy(np.asarray(params["output"]["w"]).T.copy()))
        linears[1].bias.copy_(torch.from_numpy(np.array(params["output"]["b"])))
    images = np.random.default_rng(0).random((5, 28, 28, 1), np.float32)
    expected = np.asarray(model.apply(params, model_state, images, config)[0])
    got = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_peak_times_the_dtype_asked_for(dtype, monkeypatch):
    seen = []
    real_dot = benchmark.jnp.dot
    monkeypatch.setattr(benchmark.jnp, "dot", lambda a, b, **kw: seen.append((a.dtype, kw)) or real_dot(a, b, **kw))
    assert benchmark.matmul_peak_gflops(size=64, repeats=2, dtype=dtype) > 0
    assert seen == [(jax.numpy.dtype(dtype), {"preferred_element_type": jax.numpy.float32})]


@pytest.mark.slow
def test_tiny_benchmark_run_writes_its_table_and_json(tmp_path):
    output = tmp_path / "bench.json"
    proc = script_runner.run(
        [sys.executable, os.path.join(REPO_ROOT, "experiments", "benchmark.py"), "--batch_sizes=8",
         "--pools=max", "--strategies=default,reference", "--repeats=2", "--repeat_images=16",
         "--train_images=64", "--runs=", "--quiet_wait=0", "--families=vgg", "--compute_dtypes=float32",
         f"--output={output}"])
    assert proc.returncode == 0, proc.stderr
    report = json.loads(output.read_text())
    group, = report["training"]
    assert (group["pool"], group["batch_size"], group["steps_per_repeat"]) == ("max", 8, 2)
    names = [r["name"] for r in group["results"]]
    has_torch = report["machine"]["torch"] is not None
    assert names == ["default", "reference"] + (["torch"] if has_torch else [])
    for r in group["results"]:
        assert len(r["repeats_images_per_second"]) == 2 and r["images_per_second"] > 0
        assert r["compile_s"] > 0 and r["gflops"] > 0
    assert report["matmul_peak_gflops"] > 0
    assert report["matmul_peak_gflops_bfloat16"] is None   # measured only where bfloat16 rows are timed
    assert {e["name"] for e in report["evaluation"]} == {"default", "reference"} | ({"torch"} if has_torch else set())
    assert "conv=winograd pool=reshape layout=CHWN loop=scan ynnpack=off" in group["results"][0]["description"]
    assert "vs torch" in proc.stdout and "default" in proc.stdout
    # A row per model family asked for (one: they share the code), at its preset, the batch capped at
    # the 64 images, its own FLOP count, and PyTorch's throughput where it is installed.
    # Each timed with the default convolution (oneDNN where it builds), patches and XLA's own
    # (`--family_convs`, default auto,patches,lax).
    assert [(r["name"], r["batch_size"]) for r in report["families"]] == [("vgg", 64), ("vgg:patches", 64),
                                                                           ("vgg:lax", 64)]
    for r in report["families"]:
        assert r["images_per_second"] > 0 and r["compile_s"] > 0
        assert (r["torch"] is not None) == has_torch   # the same network in PyTorch, side by side
        assert not has_torch or (r["torch"]["images_per_second"] > 0 and len(r["torch"]["repeats_images_per_second"]) == 2)
        assert r["flops_per_image"] == model.flops(config_lib.PRESETS["vgg"])[1]
        assert "layout=NHWC" in r["description"]
    auto, patches, lax = (r["description"] for r in report["families"])
    assert f"conv={'onednn' if onednn.available() else 'patches'} " in auto and "loop=scan" in auto
    assert "conv=patches " in patches and "loop=scan" in patches
    assert "conv=lax " in lax and "loop=step" in lax
    assert "model families at their presets" in proc.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--batch_sizes=64,big"], "--batch_sizes=64,big is not allowed: give comma-separated integers"),
    (["--strategies=default,fastest"], "--strategies=fastest is not allowed: use one of default,"),
    (["--train_images=32"], "--batch_sizes=64 is larger than --train_images=32"),
    (["--repeats=0"], "--repeats=0 is not allowed: it must be positive"),
    (["--runs=nope"], "--runs=nope is not allowed: use one of default"),
    (["--runs=seed"], "--runs: preset=seed was renamed: use preset=tutorial"),
    (["--families=vgg,alexnet"], "--families=alexnet is not allowed: use one of vgg, resnet"),
    (["--family_convs=auto,direct"], "--family_convs=direct is not allowed: use one of auto, lax, patches, winograd"),
    (["--pools=min"], "--pool='min' is not allowed"),
    (["--output=/nowhere/bench.json"], "--output=/nowhere/bench.json: folder /nowhere does not exist"),
    (["--run_seeds=0,one"], "--run_seeds=0,one is not allowed: give comma-separated integers"),
    (["--run_seeds="], "--run_seeds is empty: give at least one seed, or --runs= for no full runs"),
    (["--run_subset=-1"], "--run_subset=-1 is not allowed: it must be 0 (all) or positive"),
])
def test_bad_flags_are_refused_before_any_timing(args, fragment):
    proc = script_runner.run([sys.executable, os.path.join(REPO_ROOT, "experiments", "benchmark.py"),
                              "--batch_sizes=64", *args], timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr


@pytest.mark.slow
def test_training_run_reports_the_childs_own_peak_memory(mnist_dir):
    """A short train.py run, launched while this process holds 2 GiB: the reported peak is the
    child's (wait4's ru_maxrss would include the parent's memory that fork carries over)."""
    ballast = np.ones(1 << 29, np.float32)   # 2 GiB, touched
    run = benchmark.training_run("fast", mnist_dir, ("--train_subset=640", "--test_subset=500"))
    del ballast
    assert run["exit_status"] == 0, run["output_tail"]
    assert run["strategy"] and run["test_accuracy"] is not None
    assert 100 < run["peak_rss_mib"] < 2048


def _run(name, framework, seed, accuracy, wall, status=0, rss=900.0):
    return {"name": name, "framework": framework, "seed": seed, "test_accuracy": accuracy, "wall_s": wall,
            "exit_status": status, "peak_rss_mib": rss}


def test_a_run_row_and_the_time_to_99_ratio_come_from_the_runs():
    jax_runs = [_run("--preset=fast", "jax", s, a, w, rss=r)
                for s, a, w, r in [(0, 0.9921, 40.0, 1000.0), (1, 0.9905, 44.0, 1100.0), (2, 0.993, 42.0, 1050.0)]]
    torch_runs = [_run("torch_peer", "torch", s, a, w) for s, a, w in [(0, 0.991, 80.0), (1, 0.992, 90.0),
                                                                       (2, 0.990, 85.0)]]
    row = benchmark.summarize_runs(jax_runs)
    assert row["seeds"] == [0, 1, 2] and row["test_accuracies"] == [0.9921, 0.9905, 0.993]
    assert row["wall_s"] == [40.0, 44.0, 42.0] and row["mean_wall_s"] == pytest.approx(42.0)
    assert row["min_test_accuracy"] == 0.9905 and row["mean_test_accuracy"] == pytest.approx(0.99186666)
    assert row["max_peak_rss_mib"] == 1100.0 and row["all_reached_target"]
    peer = benchmark.summarize_runs(torch_runs)
    assert benchmark.time_to_target_ratio(row, peer) == pytest.approx(42.0 / 85.0)
    # One run under 0.99, one crashed (no accuracy): the row says so and no ratio is claimed.
    below = benchmark.summarize_runs([*jax_runs[:2], _run("--preset=fast", "jax", 2, 0.9899, 41.0)])
    assert not below["all_reached_target"] and below["min_test_accuracy"] == 0.9899
    assert benchmark.time_to_target_ratio(below, peer) is None
    crashed = benchmark.summarize_runs([*torch_runs[:2], _run("torch_peer", "torch", 2, None, 3.0, status=1)])
    assert crashed["min_test_accuracy"] is None and crashed["mean_test_accuracy"] is None
    assert benchmark.time_to_target_ratio(row, crashed) is None


def test_full_runs_alternate_the_fast_preset_and_the_torch_peer_seed_by_seed(tmp_path, mnist_dir):
    """Two seeds on a 640-image subset: every run's accuracy and wall time land in its row, and the
    ratio is the rows' mean walls (whether 0.99 is reached on the subset is not the point)."""
    output = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "experiments", "benchmark.py"), f"--data_dir={mnist_dir}",
         "--batch_sizes=8", "--pools=max", "--strategies=default", "--repeats=1", "--repeat_images=8",
         "--train_images=64", "--eval=false", "--families=", "--quiet_wait=0", "--runs=fast",
         "--run_seeds=3,4", "--run_subset=640", f"--output={output}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(output.read_text())
    has_torch = report["machine"]["torch"] is not None
    order = [(r["name"], r["seed"]) for r in report["runs"]]
    peer = lambda seed: [("torch_peer", seed)] if has_torch else []   # noqa: E731
    assert order == [("--preset=fast", 3), *peer(3), ("--preset=fast", 4), *peer(4)]
    for run in report["runs"]:
        assert run["exit_status"] == 0, run["output_tail"]
        assert run["test_accuracy"] is not None and run["wall_s"] > 0 and run["peak_rss_mib"] > 0
        assert "--train_subset=640" in run["command"] and f"--seed={run['seed']}" in run["command"]
    for row in report["run_rows"]:
        mine = [r for r in report["runs"] if r["name"] == row["name"]]
        assert row["test_accuracies"] == [r["test_accuracy"] for r in mine]
        assert row["wall_s"] == [r["wall_s"] for r in mine]
        assert row["min_test_accuracy"] == min(row["test_accuracies"])
    fast = report["run_rows"][0]
    assert fast["name"] == "--preset=fast" and fast["seeds"] == [3, 4]
    assert report["runs"][0]["strategy"] and report["runs"][0]["compilation_cache"]
    assert report["machine"]["cpu_model"] in proc.stdout and "full training runs" in proc.stdout
    if has_torch:
        ratio, = report["time_to_99"]
        torch_row = report["run_rows"][1]
        expected = fast["mean_wall_s"] / torch_row["mean_wall_s"] if (
            fast["all_reached_target"] and torch_row["all_reached_target"]) else None
        assert ratio == {"jax": "--preset=fast", "torch": "torch_peer", "ratio": expected}
        assert "time to 99%" in proc.stdout
