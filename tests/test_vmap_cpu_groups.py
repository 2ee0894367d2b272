"""experiments/vmap_cpu_groups.py: each way of training a group of runs that share a data order
computes what the vmapped group does, and the timing table names every variant."""

import re
import sys

import pytest
import script_runner

pytestmark = pytest.mark.real_mnist


def test_the_group_variants_agree_with_the_vmapped_group_and_are_timed(mnist_dir):
    variants = ["shared_conv1", "unrolled", "shared_conv1_serial"]
    done = script_runner.run([sys.executable, "experiments/vmap_cpu_groups.py", f"--data_dir={mnist_dir}",
                              "--runs=2", "--rounds=1", "--steps=6", f"--variants={','.join(variants)}"])
    assert done.returncode == 0, done.stderr
    differences = dict(re.findall(r"^(\w+) R=2: largest parameter difference from vmapped after 5 steps (\S+)$",
                                  done.stdout, re.M))
    assert sorted(differences) == sorted(variants)
    assert all(float(d) < 1e-4 for d in differences.values()), differences
    for name in ["sequential", "vmapped R=2"] + [f"{v} R=2" for v in variants]:
        assert re.search(rf"^{re.escape(name)}\s+\d+\s+\d+\s+\d+\.\d\dx$", done.stdout, re.M), name


def test_an_unknown_variant_is_one_line(mnist_dir):
    done = script_runner.run([sys.executable, "experiments/vmap_cpu_groups.py", f"--data_dir={mnist_dir}",
                              "--variants=sideways"])
    assert done.returncode == 2 and done.stderr.startswith("error: --variants=sideways: use shared_conv1")
