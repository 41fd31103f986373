"""`make bench-submit`: submits per second through the whole stack, measured with wrk.

Starts a fake A1111 (0.5 s per image, one at a time, as A1111), a migrated SQLite database, the
API (`a1111-proxy serve`, SERVE_PROCESSES as configured) and a worker, then runs Debian's `wrk`
posting a small txt2img with `Prefer: respond-async` and a bearer token, as a user's script
would, while the worker claims and completes jobs alongside. Prints submits/s and the latency
percentiles wrk reports; every figure is a measurement, none is asserted.

    python bench/submit.py [--connections 32] [--seconds 10] [--processes N] [--database-url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import clean_environ, deployment

TOKEN = "bench-token"
BODY = {
    "prompt": "a lighthouse at dusk, volumetric light",
    "negative_prompt": "blurry",
    "steps": 4,
    "width": 64,
    "height": 64,
    "seed": 1,
}
SCRIPT = """
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Prefer"] = "respond-async"
wrk.headers["Authorization"] = "Bearer {token}"
codes = {{}}
response = function(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
end
done = function(summary, latency, requests)
  for _, p in ipairs({{50, 90, 99, 99.9}}) do
    io.write(string.format("P%s %f\\n", p, latency:percentile(p) / 1e6))
  end
  io.write(string.format("REQUESTS %d\\nSECONDS %f\\n", summary.requests, summary.duration / 1e6))
  io.write(string.format("ERRORS %d\\n", summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
"""


def run_wrk(url: str, connections: int, seconds: int, threads: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(SCRIPT.format(body=json.dumps(BODY), token=TOKEN))
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        script.name,
        f"{url}/sdapi/v1/txt2img",
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    found = dict(re.findall(r"^(P[\d.]+|REQUESTS|SECONDS|ERRORS) ([\d.]+)$", out, re.M))
    figures = {key: float(value) for key, value in found.items()}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["NON2XX"] = float(non2xx.group(1)) if non2xx else 0.0
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--processes", type=int, default=0, help="SERVE_PROCESSES (0: default)")
    parser.add_argument("--service-time", type=float, default=0.5)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--profile",
        default=None,
        help="record the API with py-spy during the run into this file (collapsed stacks) and "
        "print the top functions",
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: `apt-get install wrk` (Debian's package)", file=sys.stderr)
        return 2
    clean_environ()
    env = {"A1111_PROXY_API_TOKENS": f"bench:{TOKEN}", "A1111_PROXY_ADMIN_TOKENS": "ops:ops"}
    if args.processes:
        env["A1111_PROXY_SERVE_PROCESSES"] = str(args.processes)
    with (
        tempfile.TemporaryDirectory() as root,
        deployment(
            Path(root),
            "submit",
            log_level=args.log_level,
            fakes=1,
            service_time=args.service_time,
            workers=1,
            database_url=args.database_url,
            env=env,
        ) as d,
    ):
        run_wrk(d.api_url, args.connections, 2, args.threads)  # warm-up
        spy = start_profile(args.profile, d.api_pid, args.seconds) if args.profile else None
        cpu_before = api_cpu_seconds(d.api_pid)
        figures = run_wrk(d.api_url, args.connections, args.seconds, args.threads)
        figures["CPU"] = api_cpu_seconds(d.api_pid) - cpu_before
        if spy is not None:
            spy.wait(timeout=60)
    rate = (figures["REQUESTS"] - figures["NON2XX"]) / figures["SECONDS"]
    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.seconds}s, a worker running "
        f"({os.cpu_count()} cores, {args.database_url or 'SQLite'}):"
    )
    print(
        f"  submits/s {rate:,.0f}   p50 {figures['P50'] * 1000:.1f} ms   "
        f"p90 {figures['P90'] * 1000:.1f} ms   p99 {figures['P99'] * 1000:.1f} ms   "
        f"p99.9 {figures['P99.9'] * 1000:.1f} ms   non-2xx {figures['NON2XX']:.0f}   "
        f"socket errors {figures['ERRORS']:.0f}"
    )
    print(
        f"  API CPU per submit {1e6 * figures['CPU'] / max(1.0, figures['REQUESTS']):.0f} us "
        f"(user + system time of the API's processes, all threads, over the run)"
    )
    if args.profile:
        print_profile(Path(args.profile))
    return 0


def api_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the API process and its children (SERVE_PROCESSES > 1)."""
    import psutil

    parent = psutil.Process(pid)
    total = 0.0
    for process in [parent, *parent.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def start_profile(path: str, pid: int, seconds: int) -> subprocess.Popen[bytes]:
    """py-spy (pip install py-spy) sampling the API process (all its threads) during the run."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "200", "--format", "raw"]
    return subprocess.Popen([*command, "-o", path, "--nonblocking"], stderr=subprocess.DEVNULL)


def print_profile(path: Path, top: int = 25) -> None:
    """The functions that held the API's main thread longest: self and inclusive shares."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames or not count.isdigit():  # a frame's name with a line break in it
            continue
        n = int(count)
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    print(f"  profile: {total} samples; top self time:")
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {100 * n / total:5.1f}%  {frame[:150]}")
    print("  top inclusive time:")
    for frame, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {100 * n / total:5.1f}%  {frame[:150]}")


if __name__ == "__main__":
    raise SystemExit(main())
