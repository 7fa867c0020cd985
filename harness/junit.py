"""JUnit XML for CI dashboards: one test case per criterion, one suite per spec."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from harness.artifacts import write_bytes
from harness.stages.criteria import format_result


def write_junit(path: Path, outcomes: list) -> None:
    """`outcomes` is a list of (spec path, RunOutcome)."""
    suites = ET.Element("testsuites")
    for spec_path, outcome in outcomes:
        failures = sum(1 for result in outcome.results if not result.passed)
        suite = ET.SubElement(
            suites, "testsuite", name=str(spec_path), tests=str(len(outcome.results)),
            failures=str(failures), time=f"{outcome.seconds:.3f}",
        )
        for result in outcome.results:
            case = ET.SubElement(suite, "testcase", classname=Path(spec_path).stem, name=result.name)
            if not result.passed:
                ET.SubElement(case, "failure", message=result.error or "criterion not met").text = format_result(result)
    write_bytes(path, ET.tostring(suites, encoding="utf-8", xml_declaration=True))
