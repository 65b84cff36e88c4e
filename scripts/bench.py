#!/usr/bin/env python3
"""The benchmark sections of scripts/bench (see there for what each measures).

Runs `stead dev` (release build) on free loopback ports in a temporary
folder, deploys copies of examples/hello-rust, and measures. Every wait is
bounded; every child process is stopped at the end.
"""

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BIN = os.environ["STEAD_BENCH_BIN"]
OUT = os.environ["STEAD_BENCH_OUT"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATION = int(os.environ.get("BENCH_DURATION", "10"))
SAMPLES = int(os.environ.get("BENCH_SAMPLES", "15"))
BURSTS = int(os.environ.get("BENCH_BURSTS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
# BENCH_TRACE=1: debug logs of the cold-start path, and a table of where
# each cold start's time went (parsed from them). Logging costs time of its
# own, so the headline figures come from runs without it.
TRACE = os.environ.get("BENCH_TRACE") == "1"
TRACE_LOG = "info,stead_agent=debug,stead_sandbox=debug,stead_server::agent=trace"
WRK_CONNECTIONS = 64
WRK_THREADS = 2

CHILDREN = []


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values, p):
    """The p-th percentile (nearest rank) of values."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = max(0, min(len(v) - 1, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


class Dev:
    """`stead dev` in a temporary folder, and the CLI against it."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.data = os.path.join(tmp, "data")
        self.api_port = free_port()
        self.router_port = free_port()
        self.log_path = os.path.join(tmp, "dev.log")
        env = dict(os.environ)
        # No access log (nginx runs with `access_log off` too); warnings only.
        env["STEAD_LOG"] = TRACE_LOG if TRACE else os.environ.get("BENCH_STEAD_LOG", "warn")
        env["STEAD_CONFIG_DIR"] = os.path.join(tmp, "config")
        self.env = env
        self.proc = subprocess.Popen(
            [BIN, "dev", "--data-dir", self.data,
             "--api-listen", f"127.0.0.1:{self.api_port}",
             "--router-listen", f"127.0.0.1:{self.router_port}"],
            stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        CHILDREN.append(self.proc)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"stead dev exited: see {self.log_path}")
            try:
                urllib.request.urlopen(f"{self.api()}/v1/health", timeout=1)
                urllib.request.urlopen(f"{self.router()}/_stead/health", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        else:
            raise SystemExit("stead dev did not start within 60 s")
        with open(os.path.join(self.data, "dev-token")) as f:
            self.env["STEAD_TOKEN"] = f.read().strip()
        self.env["STEAD_API"] = self.api()

    def api(self):
        return f"http://127.0.0.1:{self.api_port}"

    def router(self):
        return f"http://127.0.0.1:{self.router_port}"

    def cli(self, *args):
        r = subprocess.run([BIN, *args], env=self.env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise SystemExit(f"stead {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def status(self, app):
        return json.loads(self.cli("apps", "status", app, "--json"))

    def deploy(self, name, scale):
        src = os.path.join(ROOT, "examples", "hello-rust")
        dest = os.path.join(self.tmp, name)
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("target"))
        toml_path = os.path.join(dest, "stead.toml")
        with open(toml_path) as f:
            toml = f.read()
        toml = toml.replace('name = "hello-rust"', f'name = "{name}"')
        toml = re.sub(r"\[scale\][^\[]*", "[scale]\n" + scale + "\n\n", toml)
        with open(toml_path, "w") as f:
            f.write(toml)
        self.cli("deploy", dest)

    def live(self, app):
        return [i for i in self.status(app)["instances"] if i["state"] != "exited"]

    def wait(self, what, cond, within):
        deadline = time.time() + within
        while time.time() < deadline:
            try:
                if cond():
                    return
            except Exception:
                pass
            time.sleep(0.05)
        raise SystemExit(f"timed out waiting for {what}; see {self.log_path}")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON{"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def wrk(url, seconds, host=None, script=None):
    cmd = ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--latency", "-s", script]
    if host:
        cmd += ["-H", f"Host: {host}"]
    cmd.append(url)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"JSON(\{.*\})", r.stdout)
    if not m:
        raise SystemExit(f"wrk gave no result:\n{r.stdout}\n{r.stderr}")
    d = json.loads(m.group(1))
    d["rps"] = d["requests"] / (d["duration_us"] / 1e6)
    return d


def cpu_seconds(pids):
    """User + system CPU time so far of the processes `pids` (from /proc)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def child_pids(pid):
    r = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()]


def nginx_start(tmp, upstream, port):
    prefix = os.path.join(tmp, "nginx")
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes auto;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream app {{
        server {upstream};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    p = subprocess.Popen([nginx, "-p", prefix, "-c", conf], stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(prefix, "logs", "stderr.log"), "w"))
    CHILDREN.append(p)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return p
        except OSError:
            time.sleep(0.05)
    raise SystemExit("nginx did not start")


def bench_router(dev, tmp, results):
    log("== router overhead")
    dev.deploy("bench-hello", "min = 1\nmax = 1")
    endpoint = dev.live("bench-hello")[0]["endpoint"]
    nginx_port = free_port()
    nginx = nginx_start(tmp, endpoint, nginx_port)
    # A router of its own, as in production (`stead router`), rather than
    # the one inside `stead dev`, which shares its threads with the control
    # plane and the agent: a separate process like nginx.
    router_port = free_port()
    with open(os.path.join(dev.data, "host-token")) as f:
        host_token = f.read().strip()
    router = subprocess.Popen(
        [BIN, "router", "--server", dev.api(), "--token", host_token,
         "--listen", f"127.0.0.1:{router_port}", "--domain", "localhost"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "router.log"), "w"),
        env=dict(os.environ, STEAD_LOG="warn"))
    CHILDREN.append(router)
    dev.wait("the router", lambda: urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{router_port}/", headers={"Host": "bench-hello.localhost"}),
        timeout=2).status == 200, 30)
    script = os.path.join(tmp, "report.lua")
    with open(script, "w") as f:
        f.write(WRK_LUA)
    # The processes whose CPU time each path costs (besides wrk, the agent's
    # forwarder and the app, which all three share): CPU per request does
    # not depend on how busy the machine is, unlike requests per second.
    nginx_pids = [nginx.pid] + child_pids(nginx.pid)
    targets = {
        "direct": (f"http://{endpoint}/", None, []),
        "stead": (f"http://127.0.0.1:{router_port}/", "bench-hello.localhost", [router.pid]),
        "nginx": (f"http://127.0.0.1:{nginx_port}/", None, nginx_pids),
    }
    for name, (url, host, _) in targets.items():
        wrk(url, 2, host, script)  # warm up connections and pools
    runs = {k: [] for k in targets}
    for rnd in range(ROUNDS):
        for name, (url, host, pids) in targets.items():
            cpu0, fwd0 = cpu_seconds(pids), cpu_seconds([dev.proc.pid])
            d = wrk(url, DURATION, host, script)
            d["load"] = os.getloadavg()[0]
            n = max(d["requests"], 1)
            d["proxy_cpu_us_per_req"] = (cpu_seconds(pids) - cpu0) / n * 1e6
            d["dev_cpu_us_per_req"] = (cpu_seconds([dev.proc.pid]) - fwd0) / n * 1e6
            log(f"   round {rnd + 1} {name:6} {d['rps']:10.0f} req/s  p50 {d['p50_us']/1000:.3f} ms  "
                f"p99 {d['p99_us']/1000:.3f} ms  errors {d['errors']} non-2xx {d['non2xx']}  "
                f"proxy CPU {d['proxy_cpu_us_per_req']:.1f} us/req, stead dev (forwarder) "
                f"{d['dev_cpu_us_per_req']:.1f} us/req  (load {d['load']:.2f})")
            runs[name].append(d)
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "rps": statistics.median(r["rps"] for r in rs),
            "p50_ms": statistics.median(r["p50_us"] for r in rs) / 1000,
            "p95_ms": statistics.median(r["p95_us"] for r in rs) / 1000,
            "p99_ms": statistics.median(r["p99_us"] for r in rs) / 1000,
            "errors": sum(r["errors"] + r["non2xx"] for r in rs),
            "proxy_cpu_us_per_req": statistics.median(r["proxy_cpu_us_per_req"] for r in rs),
            "dev_cpu_us_per_req": statistics.median(r["dev_cpu_us_per_req"] for r in rs),
            "runs": rs,
        }
    base = summary["nginx"]
    for name in summary:
        s = summary[name]
        s["rps_vs_nginx"] = s["rps"] / base["rps"]
        s["p99_vs_nginx"] = s["p99_ms"] / base["p99_ms"]
        s["rps_vs_direct"] = s["rps"] / summary["direct"]["rps"]
    # Each round runs the three paths back to back, so the ratio within a
    # round is the least disturbed by the machine's load drifting between
    # rounds: its median is reported too.
    stead_over_nginx = [s_["rps"] / n["rps"] for s_, n in zip(runs["stead"], runs["nginx"])]
    p99_over_nginx = [s_["p99_us"] / n["p99_us"] for s_, n in zip(runs["stead"], runs["nginx"])]
    summary["stead"]["round_rps_vs_nginx"] = stead_over_nginx
    summary["stead"]["round_p99_vs_nginx"] = p99_over_nginx
    summary["stead"]["median_round_rps_vs_nginx"] = statistics.median(stead_over_nginx)
    summary["stead"]["median_round_p99_vs_nginx"] = statistics.median(p99_over_nginx)
    results["router"] = {
        "wrk": f"wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{DURATION}s --latency",
        "endpoint": endpoint,
        "summary": summary,
    }
    nginx.terminate()
    nginx.wait(10)
    router.terminate()
    router.wait(30)


def first_byte(host, port, path, host_header):
    """Seconds from connecting to the first byte of the answer to GET path."""
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode())
        b = s.recv(1)
        t1 = time.perf_counter()
        rest = b
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    status = rest.split(b" ", 2)[1] if rest.startswith(b"HTTP/") else b"?"
    return t1 - t0, status.decode(errors="replace")


def bench_coldstart(dev, tmp, results):
    log("== cold start")
    app = "bench-cold"
    dev.deploy(app, 'min = 0\nmax = 2\nidle_timeout = "1s"\nscale_down_delay = "1s"')
    binary = os.path.join(dev.data, "agent", "apps", app, "v1", "target", "release", "hello")
    if not os.path.exists(binary):
        found = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(dev.data, "agent", "apps", app))
                 for f in fs if f == "hello" and os.access(os.path.join(d, f), os.X_OK)]
        if not found:
            raise SystemExit("cannot find the built hello binary")
        binary = found[0]

    def at_zero():
        st = dev.status(app)
        return st["autoscale"] and st["autoscale"]["desired"] == 0 and not st["instances"]

    def direct_sample():
        port = free_port()
        env = dict(os.environ, PORT=str(port))
        t0 = time.perf_counter()
        p = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=os.path.dirname(binary))
        try:
            deadline = t0 + 10
            while True:
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=1)
                    break
                except OSError:
                    if time.perf_counter() > deadline:
                        raise SystemExit("the binary never listened")
                    time.sleep(0.0005)
            with s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                s.recv(1)
                return time.perf_counter() - t0
        finally:
            p.kill()
            p.wait()

    # Interleaved: each platform sample is followed at once by a direct
    # one, so the machine's load weighs on both alike.
    platform = []
    direct = []
    loads = []
    for i in range(SAMPLES):
        dev.wait("scale to zero", at_zero, 60)
        load = os.getloadavg()[0]
        loads.append(load)
        t, status = first_byte("127.0.0.1", dev.router_port, "/", f"{app}.localhost")
        if status != "200":
            raise SystemExit(f"cold request answered {status}")
        platform.append(t)
        d = direct_sample()
        direct.append(d)
        log(f"   sample {i + 1}: platform {t * 1000:.1f} ms, direct {d * 1000:.1f} ms, "
            f"added {(t - d) * 1000:.1f} ms (load {load:.2f})")

    def stats(v):
        return {"median_ms": statistics.median(v) * 1000, "p95_ms": pct(v, 95) * 1000,
                "p99_ms": pct(v, 99) * 1000, "min_ms": min(v) * 1000, "max_ms": max(v) * 1000,
                "samples_ms": [x * 1000 for x in v]}
    results["coldstart"] = {
        "platform": stats(platform),
        "direct": stats(direct),
        "added_median_ms": (statistics.median(platform) - statistics.median(direct)) * 1000,
        "added_p95_ms": (pct(platform, 95) - pct(direct, 95)) * 1000,
        "ratio_median": statistics.median(platform) / statistics.median(direct),
        "added_pairwise_median_ms": statistics.median(p - d for p, d in zip(platform, direct)) * 1000,
        "load": {"min": min(loads), "max": max(loads)},
    }
    if TRACE:
        results["coldstart"]["breakdown"] = coldstart_breakdown(dev.log_path, app)


def coldstart_breakdown(log_path, app):
    """Stages of each cold start of `app`, from `stead dev`'s debug log (BENCH_TRACE=1)."""
    from datetime import datetime, timezone

    def ts(line):
        return datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()
    rows, cur = [], None
    with open(log_path) as f:
        for line in f:
            line = re.sub(r"\x1b\[[0-9;]*m", "", line)
            if f"app={app} " in line and "waking for" in line:
                cur = {"decided": ts(line)}
            elif cur is None:
                continue
            elif "starting instance" in line and "start" not in cur:
                cur["start"] = ts(line)
            elif "init executed" in line and "init" not in cur:
                cur["init"] = ts(line)
            elif "sandbox started" in line and "exec" not in cur:
                cur["exec"] = ts(line)
            elif "instance ready" in line and "ready" not in cur:
                cur["ready"] = ts(line)
            elif "heartbeat stored" in line and "ready" in cur and "stored" not in cur:
                cur["stored"] = ts(line)
            elif "stead_router::access" in line and f'app="{app}"' in line and "stored" in cur:
                m = re.search(r"duration_ms=([\d.]+)", line)
                cur["done"] = ts(line)
                cur["arrived"] = cur["done"] - float(m.group(1)) / 1000
                rows.append(cur)
                cur = None
    stages = [("arrived", "decided", "request held at the router -> wake-up decided (0 -> 1)"),
              ("decided", "start", "-> held heartbeat answered, agent starts the instance"),
              ("start", "init", "-> sandbox init executed (prepare, cgroup, fork, cgroup join, unshare, exec)"),
              ("init", "exec", "-> app executed (the init's chain: root, pid 1, user namespace, seccomp)"),
              ("exec", "ready", "-> health probe passes"),
              ("ready", "stored", "-> ready heartbeat stored by the control plane"),
              ("stored", "done", "-> routes long-poll answered, request forwarded, answer back")]
    out = []
    for a, b, name in stages:
        v = [(r[b] - r[a]) * 1000 for r in rows if a in r and b in r]
        if v:
            out.append({"stage": name, "median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)})
    return {"samples": len(rows), "stages": out}


def bench_scaleup(dev, tmp, results):
    log("== scale-up reaction")
    app = "bench-burst"
    dev.deploy(app, 'min = 1\nmax = 4\ntarget_concurrency = 10\nstable_window = "5s"\n'
                    'panic_window = "1s"\nscale_down_delay = "1s"')
    script = os.path.join(tmp, "report.lua")
    with open(script, "w") as f:
        f.write(WRK_LUA)
    reactions = []
    ready_times = []
    for rep in range(BURSTS):
        dev.wait("one instance", lambda: len(dev.live(app)) == 1
                 and dev.live(app)[0]["state"] == "ready", 120)
        first = dev.live(app)[0]["id"]
        seen_new = {}
        stop = threading.Event()

        def probe():
            while not stop.is_set():
                try:
                    req = urllib.request.Request(f"{dev.router()}/apps/{app}/")
                    with urllib.request.urlopen(req, timeout=10) as r:
                        inst = r.headers.get("x-stead-instance", "")
                        if inst and inst != first and "t" not in seen_new:
                            seen_new["t"] = time.perf_counter()
                except Exception:
                    pass
                time.sleep(0.005)
        th = threading.Thread(target=probe)
        t0 = time.perf_counter()
        burst = subprocess.Popen(["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", "-d8s", "-s", script,
                                  f"{dev.router()}/apps/{app}/"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        th.start()
        ready_at = None
        deadline = t0 + 8
        while time.perf_counter() < deadline and ready_at is None:
            ready = [i for i in dev.live(app) if i["state"] == "ready"]
            if len(ready) >= 2:
                ready_at = time.perf_counter() - t0
            time.sleep(0.05)
        out, _ = burst.communicate(timeout=60)
        stop.set()
        th.join(30)
        if "t" not in seen_new:
            raise SystemExit(f"no new instance served during burst {rep + 1}; see {dev.log_path}")
        reaction = seen_new["t"] - t0
        reactions.append(reaction)
        if ready_at is not None:
            ready_times.append(ready_at)
        m = re.search(r"JSON(\{.*\})", out)
        errors = json.loads(m.group(1)) if m else {}
        log(f"   burst {rep + 1}: new instance serving after {reaction * 1000:.0f} ms "
            f"(2 ready seen at {ready_at and ready_at * 1000:.0f} ms); "
            f"errors {errors.get('errors')}, non-2xx {errors.get('non2xx')}")
    results["scaleup"] = {
        "median_ms": statistics.median(reactions) * 1000,
        "max_ms": max(reactions) * 1000,
        "samples_ms": [r * 1000 for r in reactions],
        "two_ready_median_ms": statistics.median(ready_times) * 1000 if ready_times else None,
        "burst": f"wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d8s, app at min 1, target_concurrency 10",
    }


def main():
    sections = sys.argv[1:] or ["router", "coldstart", "scaleup"]
    for s in sections:
        if s not in ("router", "coldstart", "scaleup"):
            raise SystemExit(f"unknown section {s!r}: use router, coldstart or scaleup")
    tmp = tempfile.mkdtemp(prefix="stead-bench-")
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "sections": sections,
    }
    dev = Dev(tmp)
    try:
        if "router" in sections:
            bench_router(dev, tmp, results)
        if "coldstart" in sections:
            bench_coldstart(dev, tmp, results)
        if "scaleup" in sections:
            bench_scaleup(dev, tmp, results)
    finally:
        dev.stop()
        for c in CHILDREN:
            if c.poll() is None:
                c.kill()
    path = os.path.join(OUT, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(summary(results))
    log(f"results in {path}; logs in {tmp}")


def summary(r):
    lines = []
    if "router" in r:
        lines += [f"Router overhead (medians of {ROUNDS} rounds, " + r["router"]["wrk"] + "):", "",
                  "| path | req/s | p50 ms | p95 ms | p99 ms | req/s vs nginx | p99 vs nginx "
                  "| proxy CPU µs/req | forwarder (stead dev) CPU µs/req |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, s in r["router"]["summary"].items():
            lines.append(f"| {name} | {s['rps']:.0f} | {s['p50_ms']:.3f} | {s['p95_ms']:.3f} | "
                         f"{s['p99_ms']:.3f} | {s['rps_vs_nginx']:.2f} | {s['p99_vs_nginx']:.2f} "
                         f"| {s['proxy_cpu_us_per_req']:.1f} | {s['dev_cpu_us_per_req']:.1f} |")
        st = r["router"]["summary"]["stead"]
        lines += ["", "stead/nginx per round: req/s " + " ".join(f"{x:.2f}" for x in st["round_rps_vs_nginx"])
                  + f" (median {st['median_round_rps_vs_nginx']:.2f}); p99 "
                  + " ".join(f"{x:.2f}" for x in st["round_p99_vs_nginx"])
                  + f" (median {st['median_round_p99_vs_nginx']:.2f}); load "
                  + " ".join(f"{d['load']:.1f}" for d in st["runs"])]
        lines.append("")
    if "coldstart" in r:
        c = r["coldstart"]
        lines += ["Cold start (ms):", "", "| | median | p95 | p99 |", "|---|---|---|---|",
                  f"| through the router, app at zero | {c['platform']['median_ms']:.1f} | "
                  f"{c['platform']['p95_ms']:.1f} | {c['platform']['p99_ms']:.1f} |",
                  f"| binary spawned directly | {c['direct']['median_ms']:.1f} | "
                  f"{c['direct']['p95_ms']:.1f} | {c['direct']['p99_ms']:.1f} |",
                  f"| added by the platform | {c['added_median_ms']:.1f} | {c['added_p95_ms']:.1f} | |",
                  "",
                  f"(pairwise median of platform - direct: {c['added_pairwise_median_ms']:.1f} ms; "
                  f"load {c['load']['min']:.2f}-{c['load']['max']:.2f})", ""]
        if "breakdown" in c:
            b = c["breakdown"]
            lines += [f"Where the time went ({b['samples']} traced cold starts, ms):", "",
                      "| stage | median | min | max |", "|---|---|---|---|"]
            lines += [f"| {x['stage']} | {x['median_ms']:.1f} | {x['min_ms']:.1f} | {x['max_ms']:.1f} |"
                      for x in b["stages"]]
            lines.append("")
    if "scaleup" in r:
        s = r["scaleup"]
        lines += [f"Scale-up reaction: median {s['median_ms']:.0f} ms, max {s['max_ms']:.0f} ms "
                  f"over {len(s['samples_ms'])} bursts ({s['burst']})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
