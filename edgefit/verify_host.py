"""The verify timer's entry point on the host: sample this host's stack with sampler.py and judge
it against the plan of record. Run as `python3 -m edgefit.verify_host` with the standard-library
modules render.py places under /usr/local/lib/edgefit (the unit sets PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

from edgefit.judge import EXIT_ERROR, error_report, evaluate
from edgefit.report import SHOWN, compact_line, finding_line
from edgefit.sampler import run_bound

START_SLACK_S = 10  # python3's start and the JSON's parsing, beyond the sampler's own bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgefit-verify-local",
                                     description="Sample this host's stack and judge it against the plan it was deployed with.")
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--expect", required=True, help="the plan of record written by the deploy (/etc/edgefit/plan.json)")
    parser.add_argument("--sampler", default=os.path.join(here, "sampler.py"))
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--events-since", type=float, default=900.0)
    parser.add_argument("--json-out", help="write the full report here")
    parser.add_argument("--host", default=os.uname().nodename)
    parser.add_argument("--sampler-args", default="", help="more arguments for the sampler (tests)")
    args = parser.parse_args(argv)
    try:
        with open(args.expect) as handle:
            expected = json.load(handle)["expect"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"{args.host}: could not check: {args.expect}: {error}")
        return EXIT_ERROR
    command = [sys.executable, args.sampler, "--window", str(args.window), "--interval", str(args.interval),
               "--events-since", str(args.events_since)]
    for path in sorted(expected.get("files") or {}):
        command += ["--hash", path]
    command += shlex.split(args.sampler_args)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=run_bound(args.window) + START_SLACK_S)
        samples = json.loads(done.stdout.strip().splitlines()[-1])
        report = evaluate(samples, expected, host=args.host)
    except (subprocess.TimeoutExpired, ValueError, IndexError, OSError) as error:
        report = error_report(args.host, f"the sampler failed: {error}")
    print(compact_line(report) if report["verdict"] != "error" else report["summary"])
    for finding in report["findings"]:
        if finding["severity"] in SHOWN:
            print(finding_line(finding))
    if args.json_out:
        temporary = args.json_out + ".tmp"
        with open(temporary, "w") as handle:
            json.dump(report, handle, indent=1)
        os.replace(temporary, args.json_out)
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
