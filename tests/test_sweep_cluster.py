"""A 2-node Ray cluster on loopback (ray.cluster_utils.Cluster) runs a small real grid, and its
cells run on both nodes. In a subprocess: one process hosts one Ray instance, and the test
session's own instance stays untouched."""
import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, logging, sys
    import ray
    from ray.cluster_utils import Cluster
    from sweep.grid import expand, parse_grid
    from sweep.layout import SweepLayout
    from sweep.results import load_results
    from sweep.runner import RunOptions, run_sweep

    out = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    plan = expand(parse_grid('''
    name: cluster
    datasets: [digits]
    models: [smallcnn]
    attacks: [badnet, blended]
    ratios: [0.1]
    defenses: [{name: ft, params: {epochs: 1, clean_fraction: 0.1}}]
    train: {epochs: 1}
    '''))
    outcome = run_sweep(plan, RunOptions(out=out, progress=False, max_concurrent=2))
    nodes = {json.loads(l)["node"] for l in open(SweepLayout(out).executions)}
    rows = load_results(out)
    print(json.dumps({"statuses": outcome.statuses, "nodes": sorted(n for n in nodes if n),
                      "cluster_nodes": len([n for n in ray.nodes() if n["Alive"]]), "rows": len(rows)}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_two_node_cluster_runs_a_grid(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cluster_nodes"] == 2
    assert report["statuses"] == {"done": 4} and report["rows"] == 4
    assert len(report["nodes"]) == 2, report  # cells ran on both nodes
