"""A hostile app for Stead's escape suite.

Each `GET /attempt/<name>?...` really tries one way out of its sandbox and
answers JSON `{"attempted": bool, "contained": bool, "detail": str}`:
`contained` is true only when the attempt failed the way a sandbox makes it
fail. Every attempt is one that succeeds for root on the host, so a
sandbox that does not hold makes the escape suite fail.
"""

import ctypes
import errno
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

libc = ctypes.CDLL(None, use_errno=True)


def err_name(e):
    return errno.errorcode.get(e, str(e))


def syscall_result(r):
    if r == 0 or (r > 0):
        return True, "succeeded"
    return False, err_name(ctypes.get_errno())


def read_file(path):
    try:
        with open(path, "rb") as f:
            data = f.read(200)
        return False, f"read {len(data)} bytes of {path}"
    except OSError as e:
        return True, f"{path}: {err_name(e.errno)}"


def attempt_read_shadow(q):
    return read_file("/etc/shadow")


def attempt_read_other_app(q):
    return read_file(q["path"])


def attempt_list_agent_data(q):
    # The folder may exist as a bare mount-point skeleton (the app's own
    # build is mounted at its host path below it): what must not show is
    # what the host really keeps there (`secret`: names the test saw).
    path = q["path"]
    secret = set(q.get("secret", "").split(","))
    try:
        names = os.listdir(path)
    except OSError as e:
        return True, f"{path}: {err_name(e.errno)}"
    leaked = sorted(secret & set(names))
    return not leaked, f"listed {path}: {names[:10]}; of the host's entries: {leaked}"


def attempt_write_outside(q):
    wrote = []
    tried = []
    if q.get("host_path"):
        # A path of the host (the test checks the host afterwards): inside
        # the sandbox the same path may well be writable, in a private
        # /tmp; what matters is that nothing appears on the host.
        t = q["host_path"]
        try:
            os.makedirs(os.path.dirname(t), exist_ok=True)
            with open(t, "w") as f:
                f.write("x")
            return True, f"wrote {t} inside the sandbox"
        except OSError as e:
            return True, f"{t}: {err_name(e.errno)}"
    targets = ["/escape", "/usr/escape", "/etc/escape", "/bin/escape",
               os.path.join(os.getcwd(), "escape"),
               "/proc/sys/kernel/hostname", "/proc/sysrq-trigger"]
    for t in targets:
        tried.append(t)
        try:
            with open(t, "w") as f:
                f.write("x")
            wrote.append(t)
        except OSError:
            pass
    return not wrote, f"tried {tried}; wrote {wrote}"


def attempt_see_processes(q):
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    cmds = []
    for p in pids:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmds.append(f.read().replace(b"\0", b" ").decode(errors="replace").strip())
        except OSError:
            cmds.append("?")
    # Ours: the sandbox's pid 1 (its init) and this app with its shell.
    # Anything else (the host's processes, the platform's, another app's)
    # must be invisible.
    others = [c for p, c in zip(pids, cmds)
              if p != "1" and not ("app.py" in c or c.startswith("sh -c") or c.startswith("/bin/sh"))]
    contained = not others and len(pids) <= 8
    return contained, f"{len(pids)} processes visible: {cmds}; foreign: {others}"


def attempt_ptrace(q):
    results = []
    PTRACE_ATTACH = 16
    PTRACE_TRACEME = 0
    for target in [1, os.getppid()]:
        r = libc.ptrace(PTRACE_ATTACH, target, None, None)
        ok, d = syscall_result(r)
        results.append((f"attach {target}", ok, d))
    pid = os.fork()
    if pid == 0:
        r = libc.ptrace(PTRACE_TRACEME, 0, None, None)
        os._exit(0 if r != 0 else 1)
    _, status = os.waitpid(pid, 0)
    results.append(("traceme", os.WEXITSTATUS(status) == 1, "child"))
    return not any(ok for _, ok, _ in results), str(results)


def attempt_mount(q):
    r = libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)
    ok, d = syscall_result(r)
    r2 = libc.umount2(b"/proc", 2)
    ok2, d2 = syscall_result(r2)
    return not ok and not ok2, f"mount tmpfs: {d}; umount /proc: {d2}"


def attempt_load_module(q):
    SYS_init_module = 175
    SYS_finit_module = 313
    SYS_delete_module = 176
    image = ctypes.create_string_buffer(b"\x7fELF" + b"\0" * 60)
    r1 = libc.syscall(SYS_init_module, image, 64, b"")
    e1 = ctypes.get_errno()
    fd = os.open("/dev/null", os.O_RDONLY)
    r2 = libc.syscall(SYS_finit_module, fd, b"", 0)
    e2 = ctypes.get_errno()
    os.close(fd)
    r3 = libc.syscall(SYS_delete_module, b"loop", 0)
    e3 = ctypes.get_errno()
    # Outside a sandbox root gets ENOEXEC/EBADMSG/ENOENT: the kernel looked
    # at the module. EPERM means it was never allowed to.
    contained = all(r != 0 and e == errno.EPERM for r, e in [(r1, e1), (r2, e2), (r3, e3)])
    return contained, f"init_module: {err_name(e1)}, finit_module: {err_name(e2)}, delete_module: {err_name(e3)}"


def attempt_raw_socket(q):
    out = []
    ok_any = False
    for fam, typ, proto, name in [
        (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP, "inet raw"),
        (socket.AF_PACKET, socket.SOCK_RAW, 0, "packet"),
    ]:
        try:
            s = socket.socket(fam, typ, proto)
            s.close()
            out.append(f"{name}: opened")
            ok_any = True
        except OSError as e:
            out.append(f"{name}: {err_name(e.errno)}")
    return not ok_any, "; ".join(out)


def try_connect(host, port, timeout=2.0):
    try:
        s = socket.create_connection((host, int(port)), timeout=timeout)
        s.close()
        return True, f"connected to {host}:{port}"
    except OSError as e:
        return False, f"{host}:{port}: {err_name(e.errno) if e.errno else e}"


def attempt_connect(q):
    results = []
    for target in q["targets"].split(","):
        host, port = target.rsplit(":", 1)
        ok, d = try_connect(host, port)
        results.append((ok, d))
    return not any(ok for ok, _ in results), "; ".join(d for _, d in results)


def attempt_unshare(q):
    out = []
    bad = False
    for flag, name in [(0x10000000, "user"), (0x00020000, "mount"), (0x40000000, "net")]:
        r = libc.unshare(flag)
        ok, d = syscall_result(r)
        bad |= ok
        out.append(f"{name}: {d}")
    r = libc.setns(os.open("/proc/1/ns/net", os.O_RDONLY), 0) if os.path.exists("/proc/1/ns/net") else -1
    ok, d = syscall_result(r)
    bad |= ok
    out.append(f"setns: {d}")
    return not bad, "; ".join(out)


def attempt_fork_bomb(q):
    limit = int(q.get("limit", "100000"))
    children = []
    failed = None
    start = time.time()
    while len(children) < limit and time.time() - start < 20:
        # posix_spawn (vfork-like): many small processes, without copying
        # this interpreter's memory each time.
        try:
            pid = os.posix_spawn("/bin/sleep", ["sleep", "30"], {})
        except OSError as e:
            failed = err_name(e.errno)
            break
        children.append(pid)
    n = len(children)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for pid in children:
        try:
            os.waitpid(pid, 0)
        except OSError:
            pass
    return failed is not None, f"forked {n} processes before fork failed with {failed}"


def attempt_disk_quota(q):
    path = os.path.join(os.environ.get("HOME", "/data"), "fill")
    written = 0
    chunk = b"\0" * (1 << 20)
    err = None
    try:
        with open(path, "wb") as f:
            while written < (4 << 30):
                f.write(chunk)
                f.flush()
                written += len(chunk)
    except OSError as e:
        err = err_name(e.errno)
    try:
        os.unlink(path)
    except OSError:
        pass
    return err == "ENOSPC", f"wrote {written >> 20} MiB before {err}"


SPIN_UNTIL = [0.0]


def spin():
    x = 0
    while time.time() < SPIN_UNTIL[0]:
        x += 1


def attempt_spin_cpus(q):
    seconds = float(q.get("seconds", "5"))
    n = os.cpu_count() or 2
    SPIN_UNTIL[0] = time.time() + seconds
    pids = []
    for _ in range(n * 2):
        pid = os.fork()
        if pid == 0:
            spin()
            os._exit(0)
        pids.append(pid)

    def reap():
        for p in pids:
            try:
                os.waitpid(p, 0)
            except OSError:
                pass

    threading.Thread(target=reap, daemon=True).start()
    # Whether the others keep their latency is for the test to measure.
    return True, f"spinning {len(pids)} processes for {seconds} s"


HOG = []


def attempt_memory(q):
    # Answer first, then eat memory in a thread: the kernel kills us.
    def eat():
        time.sleep(0.5)
        while True:
            HOG.append(bytearray(16 << 20))
            for i in range(0, len(HOG[-1]), 4096):
                HOG[-1][i] = 1

    threading.Thread(target=eat, daemon=True).start()
    return True, "allocating without end"


ATTEMPTS = {
    "read_shadow": attempt_read_shadow,
    "read_other_app": attempt_read_other_app,
    "list_agent_data": attempt_list_agent_data,
    "write_outside": attempt_write_outside,
    "see_processes": attempt_see_processes,
    "ptrace": attempt_ptrace,
    "mount": attempt_mount,
    "load_module": attempt_load_module,
    "raw_socket": attempt_raw_socket,
    "connect": attempt_connect,
    "unshare": attempt_unshare,
    "fork_bomb": attempt_fork_bomb,
    "disk_quota": attempt_disk_quota,
    "spin_cpus": attempt_spin_cpus,
    "memory": attempt_memory,
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, code, body):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        if url.path == "/healthz":
            return self.reply(200, "ok\n")
        if url.path == "/whoami":
            # What the sandbox looks like from inside: the kernel (gVisor
            # says 4.4.0) and whether there is a route out (egress).
            try:
                with open("/proc/net/route") as f:
                    routes = [l.split()[0] for l in f.read().splitlines()[1:] if l.strip()]
            except OSError:
                routes = []
            return self.reply(200, json.dumps({"kernel": os.uname().release, "routes": routes}))
        if url.path.startswith("/attempt/"):
            name = url.path[len("/attempt/"):]
            fn = ATTEMPTS.get(name)
            if fn is None:
                return self.reply(404, json.dumps({"error": f"no attempt {name}"}))
            q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
            try:
                contained, detail = fn(q)
                body = {"attempted": True, "contained": bool(contained), "detail": detail}
            except Exception as e:  # an attempt that could not even be made
                body = {"attempted": False, "contained": False, "detail": f"{type(e).__name__}: {e}"}
            return self.reply(200, json.dumps(body))
        return self.reply(404, "{}")

    def log_message(self, fmt, *args):
        pass


def main():
    port = int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"hostile listening on port {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
