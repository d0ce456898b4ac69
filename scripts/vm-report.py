#!/usr/bin/env python3
"""Reads what a test VM wrote (scripts/vm.sh): turns the e2e suite's libtest output into
JUnit (e2e.xml), counts the lab's JUnit files, prints one `SUITE: N passed, N failed` line and
exits 1 unless everything ran and passed.

    vm-report.py SUITE OUT_DIR
"""
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

RESULT = re.compile(r"^test (\S+) \.\.\. (ok|FAILED|ignored)\b")
CAPTURED = re.compile(r"^---- (\S+) stdout ----$")


def libtest(text):
    """(name, outcome) per test, and each failed test's captured output."""
    results, output, current = [], {}, None
    for line in text.splitlines():
        m = RESULT.match(line)
        if m:
            results.append((m.group(1), m.group(2)))
            continue
        m = CAPTURED.match(line)
        if m:
            current = m.group(1)
            output[current] = []
            continue
        if line in ("failures:", "successes:"):
            current = None
        elif current is not None:
            output[current].append(line)
    return results, {k: "\n".join(v) for k, v in output.items()}


def e2e_junit(suite, results, output):
    failed = sum(1 for _, r in results if r == "FAILED")
    skipped = sum(1 for _, r in results if r == "ignored")
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<testsuites name="portfwd-e2e-{suite}" tests="{len(results)}" failures="{failed}">',
        f'  <testsuite name="e2e-{suite}" tests="{len(results)}" failures="{failed}" skipped="{skipped}">',
    ]
    for name, outcome in results:
        case = f"    <testcase classname={quoteattr('e2e.' + suite)} name={quoteattr(name)}"
        if outcome == "ok":
            lines.append(case + "/>")
        elif outcome == "ignored":
            lines.append(case + "><skipped/></testcase>")
        else:
            body = output.get(name, "")
            first = next((l for l in body.splitlines() if "panicked" in l), "failed")
            lines.append(
                case + f"><failure message={quoteattr(first)}>{escape(body)}</failure></testcase>"
            )
    lines += ["  </testsuite>", "</testsuites>", ""]
    return "\n".join(lines)


def main():
    suite, out = sys.argv[1], Path(sys.argv[2])
    status = {}
    if (out / "status").is_file():
        for line in (out / "status").read_text().splitlines():
            key, _, value = line.partition("=")
            status[key] = value
    passed = failed = 0
    problems = []
    text = (out / "e2e.txt").read_text(errors="replace") if (out / "e2e.txt").is_file() else ""
    results, output = libtest(text)
    (out / "e2e.xml").write_text(e2e_junit(suite, results, output))
    passed += sum(1 for _, r in results if r == "ok")
    e2e_failed = [n for n, r in results if r == "FAILED"]
    failed += len(e2e_failed)
    if "e2e" not in status:
        problems.append("the e2e suite did not finish (see console.log)")
    elif status["e2e"] != "0" and not e2e_failed:
        problems.append(f"the e2e suite exited with {status['e2e']} (see e2e.txt)")
    for name in e2e_failed:
        print(f"{suite}: FAILED e2e {name}")
    for xml in sorted(out.glob("lab-*.xml")):
        root = ET.parse(xml).getroot()
        for case in root.iter("testcase"):
            if case.find("failure") is not None:
                failed += 1
                print(f"{suite}: FAILED {xml.stem} {case.get('classname')} {case.get('name')}")
            else:
                passed += 1
    if (out / "tools.txt").is_file():
        print(f"{suite}: " + "; ".join((out / "tools.txt").read_text().splitlines()))
    # Per suite module (forward, nftables, routing, conntrack, trace, doctor, ...) and lab run:
    # what the README's table of supported systems is made from.
    areas = {}
    for name, outcome in results:
        if outcome == "ignored":
            continue
        ok, total = areas.get(name.split("::")[0], (0, 0))
        areas[name.split("::")[0]] = (ok + (outcome == "ok"), total + 1)
    for xml in sorted(out.glob("lab-*.xml")):
        cases = list(ET.parse(xml).getroot().iter("testcase"))
        good = sum(1 for c in cases if c.find("failure") is None)
        areas[xml.stem] = (good, len(cases))
    print(f"{suite}: " + ", ".join(f"{a} {ok}/{n}" for a, (ok, n) in sorted(areas.items())))
    for key, value in status.items():
        if key.startswith("lab_") and value != "0" and not (out / f"lab-{key[4:]}.xml").is_file():
            problems.append(f"{key} exited with {value} without a report")
    if "done" not in status:
        problems.append("the guest did not finish its run (see console.log)")
    for p in problems:
        print(f"{suite}: {p}")
    print(f"{suite}: {passed} passed, {failed} failed")
    sys.exit(0 if failed == 0 and not problems else 1)


if __name__ == "__main__":
    main()
