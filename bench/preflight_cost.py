#!/usr/bin/env python3
"""soci-node's own cost on the boot path, measured side by side in one run.

- preflight wall time on the bundled example node (first run, which writes,
  and steady-state runs, which find nothing to change), median of N;
- containerd 2.1's start-to-ready time (process start until `ctr version`
  answers) on the same config, median of M, in the same run;
- preflight with IMDS enabled but unreachable: a loopback server that accepts
  and never answers (the worst case: the bound is the configured timeout),
  and a closed port;
- peak RSS of preflight, binary size.

Usage: python3 bench/preflight_cost.py [--runs N] [--containerd-runs M]
Prints a table and one JSON line. Needs scripts/test-deps.sh to have run.
"""
import argparse, json, os, shutil, socket, statistics, subprocess, sys, tempfile, threading, time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPS = os.environ.get("SOCI_NODE_DEPS", os.path.join(HERE, ".deps"))


def make_node(bin_dir):
    root = tempfile.mkdtemp(prefix="sn-bench.")
    shutil.copytree(os.path.join(HERE, "examples/al2023-node"), root, dirs_exist_ok=True)
    os.makedirs(f"{root}/usr/bin", exist_ok=True)
    os.symlink(f"{DEPS}/containerd-2.1/usr/bin/containerd", f"{root}/usr/bin/containerd")
    for b in ("soci", "soci-snapshotter-grpc"):
        os.symlink(f"{DEPS}/soci/usr/bin/{b}", f"{root}/usr/bin/{b}")
    return root


def timed(cmd, **kw):
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)} (exit {r.returncode})")
    return dt


def hanging_server():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    held = []

    def loop():
        while True:
            try:
                c, _ = s.accept()
                held.append(c)  # never answer
            except OSError:
                return

    threading.Thread(target=loop, daemon=True).start()
    return s, s.getsockname()[1]


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def containerd_ready(root, ctr):
    state = tempfile.mkdtemp(prefix="sn-cd.", dir="/tmp")
    sock = f"{state}/c.sock"
    t = time.perf_counter()
    p = subprocess.Popen(
        [f"{root}/usr/bin/containerd", "--config", f"{root}/etc/containerd/config.toml",
         "--root", f"{state}/root", "--state", f"{state}/state", "--address", sock],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = t + 30
        while time.perf_counter() < deadline:
            if os.path.exists(sock) and subprocess.run(
                    [ctr, "--address", sock, "version"], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL).returncode == 0:
                return time.perf_counter() - t
            time.sleep(0.005)
        sys.exit("containerd did not become ready in 30 s")
    finally:
        p.terminate()
        p.wait()
        shutil.rmtree(state, ignore_errors=True)


def stats(xs):
    return {"median_ms": round(statistics.median(xs) * 1000, 1),
            "min_ms": round(min(xs) * 1000, 1), "max_ms": round(max(xs) * 1000, 1), "n": len(xs)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--containerd-runs", type=int, default=7)
    ap.add_argument("--bin", default=os.path.join(HERE, "target/release/soci-node"))
    a = ap.parse_args()
    if not os.path.exists(a.bin):
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "soci-node"], cwd=HERE, check=True)
    ctr = f"{DEPS}/containerd-2.1/usr/bin/ctr"

    first, steady, dry, cd = [], [], [], []
    # Interleave the measurements so machine noise hits both alike.
    for i in range(a.runs):
        root = make_node(a.bin)
        first.append(timed([a.bin, "--root", root, "preflight"]))
        steady.append(timed([a.bin, "--root", root, "preflight"]))
        dry.append(timed([a.bin, "--root", root, "preflight", "--dry-run"]))
        if i < a.containerd_runs:
            cd.append(containerd_ready(root, ctr))
        shutil.rmtree(root)

    imds = {}
    srv, hang_port = hanging_server()
    for name, port in (("hung", hang_port), ("closed", closed_port())):
        xs, recorded = [], []
        for _ in range(max(5, a.runs // 3)):
            root = make_node(a.bin)
            with open(f"{root}/etc/soci-node/config.toml", "w") as f:
                f.write(f'[imds]\nenabled = true\nendpoint = "http://127.0.0.1:{port}"\n')
            xs.append(timed([a.bin, "--root", root, "preflight"]))
            st = json.load(open(f"{root}/run/soci-node/status.json"))
            recorded.append(st["facts"]["imds"]["elapsed_ms"])
            assert st["state"] == "active", st["reasons"]
            shutil.rmtree(root)
        imds[name] = stats(xs) | {"imds_elapsed_ms_max": max(recorded)}
    srv.close()

    # Peak RSS of one preflight (children included: containerd config dump).
    root = make_node(a.bin)
    p = subprocess.Popen([a.bin, "--root", root, "preflight"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, _, ru = os.wait4(p.pid, 0)
    shutil.rmtree(root)

    res = {
        "preflight_first": stats(first),
        "preflight_steady": stats(steady),
        "preflight_dry_run": stats(dry),
        "containerd_start_to_ready": stats(cd),
        "imds_unreachable": imds,
        "ratio_preflight_steady_over_containerd_ready": round(statistics.median(steady) / statistics.median(cd), 3),
        "preflight_peak_rss_kib": ru.ru_maxrss,
        "binary_bytes": os.path.getsize(a.bin),
    }
    print(f"{'measure':32} {'median ms':>10} {'min':>8} {'max':>8} {'n':>4}")
    for k in ("preflight_first", "preflight_steady", "preflight_dry_run", "containerd_start_to_ready"):
        s = res[k]
        print(f"{k:32} {s['median_ms']:>10} {s['min_ms']:>8} {s['max_ms']:>8} {s['n']:>4}")
    for k, s in imds.items():
        print(f"{'preflight, IMDS ' + k:32} {s['median_ms']:>10} {s['min_ms']:>8} {s['max_ms']:>8} {s['n']:>4}")
    print(f"preflight (steady) / containerd ready: {res['ratio_preflight_steady_over_containerd_ready']}")
    print(f"peak RSS of preflight (largest of it and the binaries it runs): {res['preflight_peak_rss_kib']} KiB; binary {res['binary_bytes']} bytes")
    print(json.dumps(res, sort_keys=True))


if __name__ == "__main__":
    main()
