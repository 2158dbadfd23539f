"""A multi-node Ray cluster on this machine for the tests that lose a node: `ray.cluster_utils.Cluster` with a
head that has no CPUs (no unit runs there, and a driver joining the cluster connects to it) and worker nodes
of one CPU each, every node bound to 127.0.0.1.

The cluster lives in a process of its own (`python tests/local_cluster.py WORKERS`), driven by `LocalCluster`
over stdin and stdout, rather than in the test process: Ray's node set-up installs a SIGTERM handler, which
only a main thread may do (the tests' slow set-up runs in background threads, tests/early.py), and some tests
put a stand-in for `ray` in sys.modules while others run.

    stdout, once up:  {"address": "127.0.0.1:PORT", "head": NODE_ID, "workers": [NODE_ID, ...]}
    stdin "kill ID":  the worker node's processes (raylet, object store, workers) SIGKILLed; stdout "killed ID"
    stdin closed:     the cluster shut down, the process exits
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

LOCAL = "127.0.0.1"
# The driver resubmits a lost node's task at once, but the head offers the node's CPU to tasks until it declares
# the node dead: by default after 5 missed health checks 3 s apart (~15 s). One check a second makes it ~5 s;
# each check keeps Ray's default 10 s to answer, so that a loaded machine loses no live node.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}


# A driver given 127.0.0.1 connects to this machine's network address instead (Ray's
# services.resolve_ip_for_localhost; ray-project/ray#59110), where nodes bound to 127.0.0.1 do not listen.
# With this switch off, services.get_node_ip_address answers 127.0.0.1 and the address stays as given; it is
# set in the driver's environment only, where nothing else reads it (besides that function, only `ray start`).
LOOPBACK_DRIVER = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class LocalCluster:
    """`with LocalCluster(folder, workers=2) as cluster:` the cluster's `address`, `head` and `workers` (node
    ids); `kill(node_id)`; `driver_env`, the environment of a driver that joins it. Every wait is bounded; the
    cluster's log is folder/cluster.log."""

    def __init__(self, folder: Path, workers: int, timeout: float = 120) -> None:
        self.folder, self.n_workers, self.timeout = folder, workers, timeout

    def __enter__(self) -> "LocalCluster":
        self.log = (self.folder / "cluster.log").open("w")
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.n_workers)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, start_new_session=True)
        try:
            info = json.loads(self._line())
        except BaseException:
            self.__exit__()
            raise
        self.address, self.head, self.workers = info["address"], info["head"], info["workers"]
        self.driver_env = os.environ | LOOPBACK_DRIVER
        return self

    def _line(self) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the local Ray cluster did not answer in {self.timeout} s; see {self.log.name}")
        return line

    def kill(self, node_id: str) -> None:
        self.proc.stdin.write(f"kill {node_id}\n")
        self.proc.stdin.flush()
        assert self._line().split() == ["killed", node_id]

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()  # the cluster shuts down
        try:
            self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def serve(workers: int) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": LOCAL,
                                                            "include_dashboard": False,
                                                            "_system_config": SYSTEM_CONFIG})
    try:
        nodes = {n.node_id: n for n in [cluster.add_node(num_cpus=1, node_ip_address=LOCAL) for _ in range(workers)]}
        print(json.dumps({"address": cluster.address, "head": cluster.head_node.node_id, "workers": list(nodes)}),
              flush=True)
        for line in sys.stdin:
            node_id = line.split()[1]
            cluster.remove_node(nodes.pop(node_id), allow_graceful=False)
            print(f"killed {node_id}", flush=True)
    finally:  # at once: a test's cluster has nothing to drain
        for node in [*cluster.worker_nodes, cluster.head_node]:
            cluster.remove_node(node, allow_graceful=False)
        cluster.shutdown()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
