#!/usr/bin/env python3
"""Checks and times DBOS recovery for the example apps, by hand (no Stead).

Runs an example app (examples/dbos-python, dbos-python2 or dbos-rust) as
Stead would (PORT, DBOS__VMID, DBOS__APPVERSION, DBOS_SYSTEM_DATABASE_URL,
STEAD_DATA_DIR), starts a 4-step workflow (2 s per step), kills the process
with SIGKILL while step 2 runs, and then either:

  handover  starts a new process with ANOTHER executor id and the same
            version, triggers recovery (POST /dbos-workflow-recovery on the
            new process's admin port with --trigger admin, or the stead-dbos
            re-enqueue with --trigger database), and checks that the workflow
            completes with steps 1 not re-run and steps 3-4 run once.
  baseline  restarts the process by hand with the SAME executor id (the
            library's own startup recovery) and measures the time from the
            kill to step 2 starting again (its "start" record), over --runs
            runs; prints every figure and the median.

Standard library only. Loops are bounded in count and time.

  recovery_check.py --app python --python target/dbos-venvs/3.4.0/bin/python \
      --db sqlite --mode baseline --runs 7
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
APPS = {
    "python": os.path.join(ROOT, "examples", "dbos-python"),
    "python2": os.path.join(ROOT, "examples", "dbos-python2"),
    "rust": os.path.join(ROOT, "examples", "dbos-rust"),
}
STEPS, STEP_SECONDS, KILL_STEP = 4, 2.0, 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=5):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def wait(what, check, timeout=60.0, interval=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            v = check()
            if v:
                return v
        except Exception:
            pass
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


class Runner:
    def __init__(self, args):
        self.args = args
        self.data = tempfile.mkdtemp(prefix="dbos-recovery-")
        if args.db == "sqlite":
            self.url = "sqlite:///" + os.path.join(self.data, "system.sqlite")
        else:
            self.url = args.db
        self.procs = []

    def start(self, executor, version="v1"):
        port, admin = free_port(), free_port()
        env = dict(os.environ)
        env.update(
            PORT=str(port),
            DBOS__VMID=executor,
            DBOS__APPVERSION=version,
            DBOS_SYSTEM_DATABASE_URL=self.url,
            STEAD_DATA_DIR=self.data,
            DBOS_ADMIN_PORT=str(admin),
        )
        app = self.args.app_dir or APPS[self.args.app]
        if self.args.app == "rust":
            cmd = [os.path.join(app, "target", "release", "dbos-rust-example")]
        else:
            cmd = [os.path.abspath(self.args.python) if os.sep in self.args.python else self.args.python, os.path.join(app, "app.py")]
        log = open(os.path.join(self.data, f"{executor}-{len(self.procs)}.log"), "w")
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=self.data)
        p.port, p.admin = port, admin
        self.procs.append(p)
        return p

    def ready(self, p):
        wait("the app to answer", lambda: http("GET", f"http://127.0.0.1:{p.port}/healthz"))

    def records(self):
        try:
            with open(os.path.join(self.data, "executions.jsonl")) as f:
                return [json.loads(l) for l in f if l.strip()]
        except FileNotFoundError:
            return []

    def starts(self, wf, step):
        return [r for r in self.records() if r["workflow_id"] == wf and r["step"] == step and r["event"] == "start"]

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def launch_and_kill(self, executor):
        a = self.start(executor)
        self.ready(a)
        wf = http("POST", f"http://127.0.0.1:{a.port}/workflows/start?steps={STEPS}&step_seconds={STEP_SECONDS}")[
            "workflow_id"
        ]
        wait("step 2 to start", lambda: self.starts(wf, KILL_STEP), timeout=30)
        time.sleep(0.3)
        killed_at = time.time()
        os.kill(a.pid, signal.SIGKILL)
        a.wait()
        return wf, killed_at


def handover(r, args):
    wf, _ = r.launch_and_kill("exec-a")
    b = r.start("exec-b")
    r.ready(b)
    if args.trigger == "admin":
        ids = http("POST", f"http://127.0.0.1:{b.admin}/dbos-workflow-recovery", ["exec-a"])
    else:
        out = subprocess.run(args.reenqueue + [r.url, "v1", "exec-a"], capture_output=True, text=True, check=True)
        ids = out.stdout.split()
    print("recovered:", ids)
    assert wf in ids, (wf, ids)
    status = wait(
        "the workflow to succeed",
        lambda: (lambda s: s if s["status"] == "SUCCESS" else None)(http("GET", f"http://127.0.0.1:{b.port}/workflows/{wf}")),
        timeout=60,
    )
    runs = {step: [x["executor"] for x in r.starts(wf, step)] for step in range(1, STEPS + 1)}
    print("status:", status)
    print("step executions:", runs)
    assert runs[1] == ["exec-a"], runs
    assert runs[2] == ["exec-a", "exec-b"], runs
    assert runs[3] == ["exec-b"] and runs[4] == ["exec-b"], runs
    print("OK: completed on exec-b, completed steps not re-run")


def baseline(r, args):
    figures, readies = [], []
    for i in range(args.runs):
        wf, killed_at = r.launch_and_kill("exec-a")
        b = r.start("exec-a")
        t = wait("step 2 to start again", lambda: [x for x in r.starts(wf, KILL_STEP) if x["ts"] > killed_at], timeout=60)
        figures.append(t[0]["ts"] - killed_at)
        r.ready(b)
        wait("the workflow to succeed", lambda: http("GET", f"http://127.0.0.1:{b.port}/workflows/{wf}")["status"] == "SUCCESS")
        assert len(r.starts(wf, 1)) == 1, "step 1 re-ran"
        b.kill()
        b.wait()
        print(f"run {i + 1}: kill -9 -> step {KILL_STEP} starts again: {figures[-1]:.3f} s", flush=True)
    print(
        f"median {statistics.median(figures):.3f} s, min {min(figures):.3f} s, max {max(figures):.3f} s over {len(figures)} runs"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--app", choices=APPS, required=True)
    ap.add_argument("--python", default="python3", help="a python with the app's dbos installed")
    ap.add_argument("--db", default="sqlite", help="'sqlite' or a postgresql:// URL (an existing, dedicated database)")
    ap.add_argument("--mode", choices=["handover", "baseline"], required=True)
    ap.add_argument("--trigger", choices=["admin", "database"], default="database")
    ap.add_argument(
        "--reenqueue",
        nargs="+",
        default=[os.path.join(ROOT, "target-dbos", "debug", "examples", "dbos-reenqueue")],
        help="the stead-dbos re-enqueue command (cargo build -p stead-dbos --example dbos-reenqueue)",
    )
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--app-dir", help="the app's folder (default: the example in this repository); for rust, one with target/release built")
    args = ap.parse_args()
    r = Runner(args)
    try:
        (handover if args.mode == "handover" else baseline)(r, args)
    finally:
        r.close()
        print("data and logs in", r.data)


if __name__ == "__main__":
    main()
