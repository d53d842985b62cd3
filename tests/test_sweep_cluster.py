"""A 2-node Ray cluster on loopback (ray.cluster_utils.Cluster) runs a grid on both nodes, and
loses its second node mid-sweep: the cells that node was running are retried on the head node,
and the sweep finishes with every cell recorded once and computed once. In a subprocess: one
process hosts one Ray instance, and the test session's own instance stays untouched. The cells
run sweep.execute:simulated_cell (bdcore's crash behaviour without its compute)."""
import json
import os
import subprocess
import sys
import textwrap

from sweep_checks import check_sweep

from sweep.grid import expand, parse_grid

GRID = """
name: cluster
datasets: [digits]
models: [smallcnn]
attacks: [badnet, blended]
ratios: [0.1, 0.05]
defenses: [ft, fp]
"""

SCRIPT = textwrap.dedent("""
    import json, logging, sys, threading, time
    import ray
    from ray.cluster_utils import Cluster
    from sweep.grid import expand, parse_grid
    from sweep.layout import SweepLayout
    from sweep.runner import RunOptions, run_sweep

    out, grid = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    second_id = [n["NodeID"] for n in ray.nodes() if n["NodeManagerPort"] == second.node_manager_port][0]
    layout = SweepLayout(out)
    removed = {}

    def remove_second_node():
        # Once the second node has finished two cells (and is busy with its third), take it away.
        while True:
            done_there = [l for l in open(layout.executions) if json.loads(l)["node"] == second_id] \\
                if layout.executions.exists() else []
            if len(done_there) >= 2:
                break
            time.sleep(0.05)
        cluster.remove_node(second, allow_graceful=False)
        removed["after"] = len(layout.finished_ids())

    threading.Thread(target=remove_second_node, daemon=True).start()
    plan = expand(parse_grid(open(grid).read()))
    outcome = run_sweep(plan, RunOptions(out=out, progress=False, max_concurrent=2,
                                         executor="sweep.execute:simulated_cell",
                                         executor_args={"epoch_seconds": 0.4}))
    nodes = [json.loads(l)["node"] for l in open(layout.executions)]
    print("RESULT " + json.dumps({"statuses": outcome.statuses, "second": second_id, "nodes": nodes, "removed": removed}),
          flush=True)
    ray.shutdown()
    cluster.shutdown()
""")


def test_two_node_cluster_runs_a_grid_and_survives_losing_a_node(tmp_path):
    out, grid = tmp_path / "out", tmp_path / "grid.yaml"
    grid.write_text(GRID)
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(grid)], env=env, capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][0][7:])
    assert report["statuses"] == {"done": 12}
    assert "after" in report["removed"] and report["removed"]["after"] < 12  # removed mid-sweep
    assert report["nodes"].count(report["second"]) >= 2 and len(set(report["nodes"])) == 2  # both nodes worked
    check_sweep(out, expand(parse_grid(GRID)))
