"""A durable-workflow app on DBOS Transact for Python 2.31, deployable by Stead.

The same app as examples/dbos-python, on the last 2.x release, which still
has the DBOS admin server: it runs on port 3001 (GET /dbos-healthz,
POST /dbos-workflow-recovery with a JSON list of executor ids), turned on by
the app's own config (run_admin_server) rather than by DBOS__CLOUD, so that
the library's startup self-recovery stays on too.

- POST /workflows/start?steps=N&step_seconds=S starts a workflow of N steps,
  each a DBOS step that sleeps S seconds; answers {"workflow_id": ...}.
- GET /workflows/{id} answers its status, and its result once it finished.
- GET /executions answers every recorded step execution, as a JSON array.
- GET /healthz answers 200.
- POST /gates/NAME opens the gate NAME: a workflow started with
  `gate=NAME&gate_step=K` holds step K open (after its sleep) until then, so
  a test can keep a workflow running for as long as it needs.

Each time a step body begins and ends it appends one JSON line
{workflow_id, step, event: "start"|"end", executor, version, ts} to
$STEAD_DATA_DIR/executions.jsonl, fsync'd, so a test sees which steps ran,
on which executor and how many times, across instance replacements.

Identity comes from the environment Stead sets: DBOS__VMID (executor id),
DBOS__APPVERSION, DBOS_SYSTEM_DATABASE_URL (SQLite or PostgreSQL). The app
listens on $PORT. Standard library only, besides dbos.
"""

import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from dbos import DBOS

APP_NAME = "dbos-python2"
DATA_DIR = os.environ.get("STEAD_DATA_DIR", ".")
EXECUTIONS = os.path.join(DATA_DIR, "executions.jsonl")
GATES = os.path.join(DATA_DIR, "gates")


def wait_for_gate(name, limit_seconds=900):
    """Blocks until POST /gates/NAME (on any instance of the app) opened it."""
    deadline = time.time() + limit_seconds
    path = os.path.join(GATES, name)
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.1)


def record(workflow_id, step, event):
    """Appends one execution record, durably: a test reads it after a kill -9."""
    line = json.dumps(
        {
            "workflow_id": workflow_id,
            "step": step,
            "event": event,
            "executor": os.environ.get("DBOS__VMID", "local"),
            "version": os.environ.get("DBOS__APPVERSION", ""),
            "ts": time.time(),
        }
    )
    fd = os.open(EXECUTIONS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@DBOS.step()
def sleep_step(step, seconds, gate=None):
    workflow_id = DBOS.workflow_id
    record(workflow_id, step, "start")
    time.sleep(seconds)
    if gate:
        wait_for_gate(gate)
    record(workflow_id, step, "end")
    return f"step {step} done"


@DBOS.workflow()
def steps_workflow(steps, step_seconds, gate=None, gate_step=0):
    return [
        sleep_step(i, step_seconds, gate if i == gate_step else None)
        for i in range(1, steps + 1)
    ]


def executions():
    try:
        with open(EXECUTIONS) as f:
            return [json.loads(l) for l in f if l.strip()]
    except FileNotFoundError:
        return []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, code, payload):
        body = (json.dumps(payload) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/healthz":
            self.answer(200, {"status": "ok"})
        elif url.path == "/executions":
            self.answer(200, executions())
        elif url.path.startswith("/workflows/"):
            workflow_id = url.path[len("/workflows/") :]
            status = DBOS.get_workflow_status(workflow_id)
            if status is None:
                self.answer(404, {"error": f"no workflow {workflow_id}"})
                return
            self.answer(
                200,
                {
                    "workflow_id": workflow_id,
                    "status": status.status,
                    "result": status.output if status.status == "SUCCESS" else None,
                    "error": str(status.error) if status.error is not None else None,
                    "executor": status.executor_id,
                    "version": status.app_version,
                },
            )
        else:
            self.answer(404, {"error": "not found"})

    def do_POST(self):
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if url.path.startswith("/gates/"):
            name = os.path.basename(url.path[len("/gates/") :])
            os.makedirs(GATES, exist_ok=True)
            with open(os.path.join(GATES, name), "w") as f:
                f.write("open\n")
            self.answer(200, {"gate": name, "open": True})
            return
        if url.path != "/workflows/start":
            self.answer(404, {"error": "not found"})
            return
        query = parse_qs(url.query)
        try:
            steps = int(query.get("steps", ["3"])[0])
            step_seconds = float(query.get("step_seconds", ["1"])[0])
        except ValueError:
            self.answer(400, {"error": "steps must be an integer and step_seconds a number"})
            return
        gate = query.get("gate", [None])[0]
        gate_step = int(query.get("gate_step", ["0"])[0] or 0)
        handle = DBOS.start_workflow(steps_workflow, steps, step_seconds, gate, gate_step)
        self.answer(200, {"workflow_id": handle.get_workflow_id()})

    def log_message(self, fmt, *args):
        sys.stdout.write("%s %s\n" % (self.address_string(), fmt % args))
        sys.stdout.flush()


def main():
    config = {
        "name": APP_NAME,
        "system_database_url": os.environ["DBOS_SYSTEM_DATABASE_URL"],
        # The admin server (deprecated in 2.x, removed in 3.x) is how Stead
        # can ask this process to recover a dead executor's workflows.
        "run_admin_server": True,
        "admin_port": int(os.environ.get("DBOS_ADMIN_PORT", "3001")),
    }
    # 2.x also has an application database (for @DBOS.transaction); this app
    # has no transactions, but uses the one Stead provisions when given.
    if os.environ.get("DBOS_DATABASE_URL"):
        config["application_database_url"] = os.environ["DBOS_DATABASE_URL"]
    DBOS(config=config)
    DBOS.launch()
    port = int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    # On SIGTERM (Stead stops an instance only once its version has no work
    # left) exit at once; anything unfinished stays PENDING in the system
    # database and is recovered by another executor.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print(f"{APP_NAME} listening on port {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
