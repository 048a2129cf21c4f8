"""Every code block in README.md and docs/*.md is executed or checked.

How a block is checked is set by a ``<!-- check: KIND [ARGUMENT] -->``
comment on the last non-blank line before its opening fence, or by its
language (``python``, ``yaml``, ``lua``); the kinds are described in
docs/architecture.md. A block that no kind covers fails, so none is
silently skipped. Links between the pages, the module map and the
benchmark rows are checked against the repository as well.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import plain_environment
from isobranch import LuaRuntime, YAMLEngine, available_backends
from isobranch.regression import is_case_file, load_case_file

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<fence>`{3,})\s*(?P<language>[\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*check:\s*(?P<kind>[\w-]+)(?:\s+(?P<argument>.*?))?\s*-->$")
DEFAULT_KINDS = {"python": "python", "yaml": "workflow", "lua": "lua"}
# A path that only exists on one machine: a home, a checkout, a temp dir.
MACHINE_PATH = re.compile(r"(^|[\s'\"(=:])/(home|work|Users|root|tmp|private)/|rootdir:", re.M)
COMMAND_TIMEOUT_SECONDS = 110


@dataclass(frozen=True)
class Block:
    """One fenced code block of a documentation page."""

    page: Path
    line: int                  # 1-based line of the opening fence
    language: str
    kind: str | None           # from the marker, else from the language
    argument: str | None
    text: str

    @property
    def where(self) -> str:
        """``page:line``, as shown in failures and test ids."""
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"


def parse_page(page: Path) -> tuple[list[Block], list[str]]:
    """The page's code blocks, and every structural problem (unclosed fence, stray marker)."""
    return parse_text(page.read_text(encoding="utf-8"), page)


def parse_text(text: str, page: Path) -> tuple[list[Block], list[str]]:
    """``parse_page`` for the text of ``page`` (a path under the repository)."""
    lines = text.splitlines()
    name = page.relative_to(ROOT).as_posix()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[int, re.Match[str]] | None = None  # a marker waiting for its fence
    index = 0
    while index < len(lines):
        line = lines[index]
        marker = MARKER.match(line.strip())
        fence = FENCE.match(line)
        if marker:
            if pending is not None:
                problems.append(f"{name}:{pending[0]}: a check marker not followed by a code block")
            pending = (index + 1, marker)
        elif fence:
            closing = next((j for j in range(index + 1, len(lines))
                            if lines[j].strip() == fence["fence"]), None)
            if closing is None:
                problems.append(f"{name}:{index + 1}: a code block that is never closed")
                break
            language = fence["language"].lower()
            kind, argument = DEFAULT_KINDS.get(language), None
            if pending is not None:
                kind, argument = pending[1]["kind"], pending[1]["argument"]
                pending = None
            text = "".join(f"{body}\n" for body in lines[index + 1:closing])
            blocks.append(Block(page, index + 1, language, kind, argument, text))
            index = closing
        elif line.strip() and pending is not None:
            problems.append(f"{name}:{pending[0]}: a check marker not followed by a code block")
            pending = None
        index += 1
    if pending is not None:
        problems.append(f"{name}:{pending[0]}: a check marker not followed by a code block")
    return blocks, problems


def all_blocks() -> list[Block]:
    """Every block of every page, in page order."""
    return [block for page in PAGES for block in parse_page(page)[0]]


BLOCKS = all_blocks()


def outside_code(page: Path) -> str:
    """The page's text with its fenced blocks removed (YAML comments are not headings)."""
    kept, fence = [], None
    for line in page.read_text(encoding="utf-8").splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match["fence"]
        elif fence is not None and line.strip() == fence:
            fence = None
        elif fence is None:
            kept.append(line)
    return "\n".join(kept)


def heading_anchors(page: Path) -> set[str]:
    """GitHub-style anchors of the page's headings."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", outside_code(page), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


# -- the kinds of check --------------------------------------------------------


def check_python(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)
    # Padding keeps line numbers in a traceback equal to the page's. The block runs as
    # a reader's script would: without this module's __future__ imports (annotations).
    code = compile("\n" * block.line + block.text, str(block.page), "exec", dont_inherit=True)
    exec(code, {"__name__": "docs_example"})


def check_lua(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with LuaRuntime(timeout=10) as lua:
        lua.execute(block.text, chunk_name=block.where)


def compile_workflow(document: object, where: str) -> None:
    assert isinstance(document, dict), f"{where}: a workflow is a mapping"
    YAMLEngine().load_from_dict(document, source=where, base_dir=ROOT).close()


def check_workflow(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    compile_workflow(yaml.safe_load(block.text), block.where)


def check_file(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert block.argument, f"{block.where}: 'file' needs the repository path"
    path = ROOT / block.argument
    assert block.text == path.read_text(encoding="utf-8"), (
        f"{block.where}: the block differs from {block.argument}; copy the file into the page")
    assert path.suffix in (".yaml", ".yml"), f"{block.where}: no check for a {path.suffix} file"
    YAMLEngine().load_from_file(path).close()


def check_settings(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fragment = yaml.safe_load(block.text)
    assert isinstance(fragment, dict) and "settings" in fragment, (
        f"{block.where}: a settings block is a mapping with 'settings'")
    assert set(fragment) <= {"settings", "variables"}, f"{block.where}: only settings and variables"
    document = {**fragment, "nodes": [
        {"name": "start", "run": "return {}"},
        {"name": "branch", "language": "lua", "run": "return {lua = true}"},
        {"name": "join", "fan_in": True, "run": "return {}"}],
        "edges": [{"from": "start", "to": "branch", "type": "parallel", "fan_in": "join"}]}
    compile_workflow(document, block.where)


def check_case_file(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert block.argument, f"{block.where}: 'case-file' needs the directory of its agent"
    path = tmp_path / "test_docs.agent.yaml"
    path.write_text(block.text, encoding="utf-8")
    case_file = load_case_file(path, backends=available_backends())
    assert case_file.fatal is None, f"{block.where}: {case_file.fatal}"
    assert not case_file.problems, f"{block.where}: {case_file.problems}"
    for case in case_file.cases:
        assert not case.problems, f"{block.where}: case {case.name}: {case.problems}"
    agent = ROOT / block.argument / case_file.agent
    assert YAMLEngine().validate_file(agent) == [], f"{block.where}: agent {agent}"


def check_pytest(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert block.argument, f"{block.where}: 'pytest' needs the directory of its agents"
    for agent in (ROOT / block.argument).glob("*.y*ml"):
        if not is_case_file(agent.name):
            shutil.copy(agent, tmp_path / agent.name)
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (tmp_path / "test_docs_block.py").write_text(block.text, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                          cwd=tmp_path, env=command_environment(tmp_path), capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_SECONDS)
    assert done.returncode == 0, f"{block.where}:\n{done.stdout}\n{done.stderr}"
    assert " passed" in done.stdout


def check_yaml_fragment(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert yaml.safe_load(block.text) is not None, f"{block.where}: empty YAML"


def command_environment(tmp_path: Path) -> dict[str, str]:
    """``python``, ``pytest`` and ``isobranch`` of the running interpreter first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shims = {"python": "", "python3": "", "pytest": "-m pytest", "isobranch": "-m isobranch"}
    for name, module in shims.items():
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" {module} "$@"\n', encoding="utf-8")
        shim.chmod(0o755)
    env = plain_environment()  # a reader's shell: no PYTHONUNBUFFERED, no PYTEST_*
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env["PYTEST_ADDOPTS"] = "-p no:cacheprovider"  # nothing written into the checkout
    return env


def run_commands(block: Block, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=ROOT,
                          env=command_environment(tmp_path), capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_SECONDS)
    assert done.returncode == 0, (
        f"{block.where}: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def check_commands(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run_commands(block, tmp_path)


def check_shell_syntax(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    done = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_SECONDS)
    assert done.returncode == 0, f"{block.where}: {done.stderr}"


def check_output(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    earlier = [b for b in BLOCKS if b.page == block.page and b.line < block.line]
    assert earlier and earlier[-1].kind == "commands", (
        f"{block.where}: an output block follows the commands block it shows")
    printed = run_commands(earlier[-1], tmp_path).stdout

    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip("\n").splitlines()]

    assert lines(printed) == lines(block.text), f"{block.where}: the commands now print:\n{printed}"


def check_sample_output(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    found = MACHINE_PATH.search(block.text)
    assert found is None, f"{block.where}: machine-specific text {found.group(0)!r}"
    assert block.text.strip(), f"{block.where}: empty sample"


def check_cli_synopsis(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for line in filter(str.strip, block.text.splitlines()):
        words = line.split()
        assert words[0] == "isobranch" and len(words) > 1, f"{block.where}: {line!r}"
        done = subprocess.run([sys.executable, "-m", "isobranch", words[1], "--help"],
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS)
        assert done.returncode == 0, f"{block.where}: no subcommand {words[1]!r}"
        for option in re.findall(r"--[\w-]+", line):
            assert option in done.stdout, f"{block.where}: {words[1]} has no {option}"


CHECKS = {
    "python": check_python, "lua": check_lua, "workflow": check_workflow, "file": check_file,
    "settings": check_settings, "case-file": check_case_file, "pytest": check_pytest,
    "yaml-fragment": check_yaml_fragment, "commands": check_commands,
    "shell-syntax": check_shell_syntax, "output": check_output,
    "sample-output": check_sample_output, "cli-synopsis": check_cli_synopsis,
}


@pytest.mark.parametrize("block", BLOCKS, ids=[block.where for block in BLOCKS])
def test_documentation_block(block: Block, monkeypatch: pytest.MonkeyPatch,
                             tmp_path: Path) -> None:
    """The block passes the check its marker (or its language) names."""
    if block.kind is None:
        pytest.fail(f"{block.where}: a {block.language or 'plain'} block needs a "
                    f"'<!-- check: KIND -->' marker (kinds: {', '.join(CHECKS)})")
    check = CHECKS.get(block.kind)
    if check is None:
        pytest.fail(f"{block.where}: unknown check kind {block.kind!r} (kinds: {', '.join(CHECKS)})")
    check(block, monkeypatch, tmp_path)


# -- the pages as a whole ------------------------------------------------------


def test_pages_are_well_formed_and_have_blocks() -> None:
    """Every fence closes, every marker precedes a block, and the parser finds the blocks."""
    problems = [problem for page in PAGES for problem in parse_page(page)[1]]
    assert problems == []
    assert ROOT / "README.md" in {block.page for block in BLOCKS} and len(BLOCKS) > len(PAGES)


def test_the_parser_sees_markers_defaults_and_mistakes() -> None:
    """The convention itself: a marker wins over the language; stray and unclosed are reported."""
    text = ("<!-- check: settings -->\n\n```yaml\nsettings: {}\n```\n"
            "```python\nx = 1\n```\n```bash\nls\n```\n<!-- check: python -->\ntext\n"
            "```text\nnever closed\n")
    blocks, problems = parse_text(text, ROOT / "docs" / "example.md")
    assert [(b.language, b.kind, b.line) for b in blocks] == [
        ("yaml", "settings", 3), ("python", "python", 6), ("bash", None, 9)]
    assert problems == ["docs/example.md:12: a check marker not followed by a code block",
                        "docs/example.md:14: a code block that is never closed"]


def test_links_between_pages_resolve() -> None:
    """Every relative link names an existing file, and every #anchor a heading there."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", outside_code(page)):
            if re.match(r"[a-z]+:", target):
                continue  # an external link
            path_part, _, anchor = target.partition("#")
            path = (page.parent / path_part).resolve() if path_part else page
            if not path.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_module_map_lists_every_module_and_only_those() -> None:
    """docs/architecture.md has one row per module of src/isobranch."""
    package = ROOT / "src" / "isobranch"
    modules = {path.relative_to(package).as_posix() for pattern in ("*.py", "*.lua")
               for path in package.rglob(pattern)}
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([^`]+)` \|", section, re.M))
    assert listed == modules


def test_benchmark_page_describes_every_row() -> None:
    """Every row ``python -m benchmarks --only`` accepts is described in docs/benchmarks.md."""
    from benchmarks.__main__ import NAMES

    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    described = set(re.findall(r"^\| `([\w-]+)` \|", text, re.M))
    assert described == set(NAMES)
