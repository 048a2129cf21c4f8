"""SVG and PNG through Graphviz's dot (pictures.py), and `isobranch graph --format/-o`.

The tests that need a real ``dot`` skip, saying so, where Graphviz is not
installed (.ci/run installs it); the error paths run everywhere, with a
PATH that has no ``dot`` or a stand-in ``dot`` script.
"""

from __future__ import annotations

import itertools
import os
import pty
import shutil
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from isobranch import END, START, StateGraph, YAMLEngine
from isobranch.cli import main
from isobranch.errors import ConfigError, GraphvizError
from isobranch.pictures import PictureFormat, picture, render_dot, write_picture

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "fan_out_demo.yaml"
DEMO_PICTURE = ROOT / "docs" / "images" / "fan_out_demo.svg"
DOT = shutil.which("dot")
needs_dot = pytest.mark.skipif(
    DOT is None, reason="Graphviz's dot is not on the PATH (apt-get install graphviz; "
                        ".ci/run installs it)")
SVG = "{http://www.w3.org/2000/svg}"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["a b", 'say "hi"', "café 名前", "x --> y", "<b>bold</b>", "back\\slash \\N \\G",
         "two\nlines", "end", "{braces}", "a-b", "a_b"]


@pytest.fixture
def demo():
    with YAMLEngine().load_from_file(DEMO) as graph:
        yield graph


@pytest.fixture
def odd_names():
    """A chain through names that need quoting, with a fan-out to a fan-in."""
    graph = StateGraph()
    for name in NAMES:
        graph.add_node(name, lambda state: {})
    graph.add_fan_in_node("fan in", lambda state, parallel_results: {})
    graph.add_edge(START, NAMES[0])
    for source, target in itertools.pairwise(NAMES[:-1]):
        graph.add_edge(source, target)
    graph.add_parallel_edge(NAMES[-2], NAMES[-1], fan_in="fan in")
    graph.add_edge(NAMES[-1], "fan in").add_edge("fan in", END)
    app = graph.compile(isolation="inline")
    yield app
    app.close()


def stand_in_dot(directory: Path, script: str) -> Path:
    """A ``dot`` in ``directory`` that runs ``script`` (sh) instead of Graphviz."""
    path = directory / "dot"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def node_texts(svg: bytes) -> dict[str, str]:
    """Each drawn node's id (its SVG title) and the text it shows, lines joined by newlines."""
    root = ET.fromstring(svg)
    return {group.find(f"{SVG}title").text: "\n".join(text.text or "" for text in group.iter(
                f"{SVG}text"))
            for group in root.iter(f"{SVG}g") if group.get("class") == "node"}


@needs_dot
def test_svg_from_real_dot_is_xml_showing_every_node_name(odd_names):
    shown = node_texts(picture(odd_names, PictureFormat.SVG))
    assert sorted(shown.values()) == sorted([*NAMES, "fan in", START, END])


@needs_dot
def test_svg_of_the_demo_draws_its_edges_and_labels(demo):
    svg = picture(demo, PictureFormat.SVG)
    root = ET.fromstring(svg)
    edges = {group.find(f"{SVG}title").text for group in root.iter(f"{SVG}g")
             if group.get("class") == "edge"}
    assert edges >= {"n_start->n_lua_stats", "n_combine->n_big", "n_small->n___end__"}
    labels = [text.text for text in root.iter(f"{SVG}text")]
    assert "parallel, fan-in combine" in labels
    assert "lua: state.total < variables.threshold" in labels


@needs_dot
def test_png_from_real_dot_starts_with_the_png_signature(demo):
    assert picture(demo, PictureFormat.PNG).startswith(PNG_SIGNATURE)


def test_text_formats_need_no_graphviz(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert picture(demo, PictureFormat.MERMAID) == (demo.draw_mermaid() + "\n").encode()
    assert picture(demo, PictureFormat.DOT) == (demo.draw_dot() + "\n").encode()


@pytest.mark.parametrize("fmt", [PictureFormat.SVG, PictureFormat.PNG])
def test_without_dot_the_error_names_the_package_to_install(demo, tmp_path, monkeypatch, fmt):
    monkeypatch.setenv("PATH", str(tmp_path))  # a directory without dot
    with pytest.raises(GraphvizError) as info:
        picture(demo, fmt)
    message = str(info.value)
    assert f"drawing {fmt.value} needs the 'dot' program of Graphviz" in message
    assert "install the package graphviz" in message and "apt-get install graphviz" in message


def test_text_formats_are_not_rendered_by_dot():
    with pytest.raises(ConfigError, match="dot is text, not rendered by dot"):
        render_dot("digraph {}", PictureFormat.DOT)


def test_a_failing_dot_is_an_error_with_what_it_said(tmp_path, monkeypatch):
    stand_in_dot(tmp_path, "echo 'Error: <stdin>: syntax error in line 1' >&2\nexit 3")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GraphvizError, match=r"failed drawing svg \(exit code 3\); it said: "
                                            r"Error: <stdin>: syntax error in line 1"):
        render_dot("digraph {}", PictureFormat.SVG)


def test_a_dot_that_prints_nothing_is_an_error(tmp_path, monkeypatch):
    stand_in_dot(tmp_path, "exit 0")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GraphvizError, match=r"exit code 0\); it said: nothing"):
        render_dot("digraph {}", PictureFormat.PNG)


def test_a_stuck_dot_is_stopped_at_the_timeout_and_reaped(tmp_path, monkeypatch):
    pid_file = tmp_path / "pid"
    stand_in_dot(tmp_path, f"echo $$ > {pid_file}\nexec {shutil.which('sleep')} 60")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GraphvizError, match=r"did not finish drawing svg within 0\.5 s"):
        render_dot("digraph {}", PictureFormat.SVG, timeout=0.5)
    with pytest.raises(ProcessLookupError):  # killed and waited for: no process left
        os.kill(int(pid_file.read_text()), 0)


def test_write_picture_replaces_the_file_whole_with_a_normal_mode(tmp_path):
    target = tmp_path / "graph.svg"
    target.write_bytes(b"old")
    write_picture(target, b"new picture")
    assert target.read_bytes() == b"new picture"
    reference = tmp_path / "reference"
    reference.write_bytes(b"")  # created as any new file is (the umask applies)
    fresh = tmp_path / "fresh.svg"
    write_picture(fresh, b"x")
    assert stat.S_IMODE(fresh.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "fresh.svg", "graph.svg", "reference"]


def test_write_picture_that_fails_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "graph.svg"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_picture(target, "text, not bytes")  # fails while writing
    assert target.read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["graph.svg"]


def test_write_picture_over_a_directory_fails_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(IsADirectoryError):
        write_picture(target, b"picture")
    assert [path.name for path in tmp_path.iterdir()] == ["taken"]
    assert list(target.iterdir()) == []


# -- the command -----------------------------------------------------------------


def test_cli_draws_dot_to_stdout_and_mermaid_by_default(demo, capfd):
    assert main(["graph", str(DEMO), "--format", "dot"]) == 0
    assert capfd.readouterr().out == demo.draw_dot() + "\n"
    assert main(["graph", str(DEMO)]) == 0
    assert capfd.readouterr().out == demo.draw_mermaid() + "\n"


def test_cli_writes_to_the_output_file_and_nothing_to_stdout(demo, tmp_path, capfd):
    out = tmp_path / "demo.mmd"
    assert main(["graph", str(DEMO), "-o", str(out)]) == 0
    assert capfd.readouterr().out == ""
    assert out.read_text(encoding="utf-8") == demo.draw_mermaid() + "\n"


def test_cli_output_that_cannot_be_written_names_the_path(tmp_path, capfd):
    missing = tmp_path / "no such directory" / "demo.dot"
    assert main(["graph", str(DEMO), "-f", "dot", "-o", str(missing)]) == 2
    assert capfd.readouterr().err == (f"isobranch: error: -o {missing}: cannot write: "
                                      f"No such file or directory\n")


def plain_environment(path: str, home: Path) -> dict[str, str]:
    """What a user's shell passes: no PYTHONUNBUFFERED, no test variables."""
    return {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8"}


def run_cli(*arguments: str, path: str, home: Path, **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isobranch", "graph", *arguments],
                          env=plain_environment(path, home), cwd=ROOT, timeout=60, **options)


@needs_dot
def test_cli_svg_in_a_plain_environment(tmp_path):
    out = tmp_path / "demo.svg"
    completed = run_cli(str(DEMO), "--format", "svg", "-o", str(out),
                        path=f"{Path(DOT).parent}:/usr/bin:/bin", home=tmp_path,
                        capture_output=True)
    assert (completed.returncode, completed.stdout, completed.stderr) == (0, b"", b"")
    assert set(node_texts(out.read_bytes()).values()) == {
        START, "start", "lua_stats", "python_stats", "combine", "big", "small", END}


@needs_dot
def test_cli_png_goes_to_a_pipe_but_not_to_a_terminal(tmp_path):
    path = f"{Path(DOT).parent}:/usr/bin:/bin"
    piped = run_cli(str(DEMO), "-f", "png", path=path, home=tmp_path, capture_output=True)
    assert piped.returncode == 0 and piped.stdout.startswith(PNG_SIGNATURE)
    controller, terminal = pty.openpty()
    try:
        shown = run_cli(str(DEMO), "-f", "png", path=path, home=tmp_path, stdout=terminal,
                        stderr=subprocess.PIPE)
    finally:
        os.close(terminal)
        os.close(controller)
    assert shown.returncode == 2
    assert shown.stderr == (b"isobranch: error: --format png is binary: write it to a file "
                            b"with -o PATH, or redirect standard output\n")


def test_cli_without_dot_fails_in_one_line_naming_graphviz_and_writes_nothing(tmp_path):
    out = tmp_path / "demo.svg"
    completed = run_cli(str(DEMO), "--format", "svg", "-o", str(out), path=str(tmp_path),
                        home=tmp_path, capture_output=True, text=True)
    assert completed.returncode == 1 and completed.stdout == ""
    lines = completed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "isobranch: error: drawing svg needs the 'dot' program of Graphviz")
    assert "apt-get install graphviz" in lines[0]
    assert not out.exists()


# -- the picture in the docs -----------------------------------------------------

# Where things are, which fonts and Graphviz versions change: not what is drawn.
GEOMETRY = {"points", "x", "y", "cx", "cy", "rx", "ry", "width", "height", "viewBox",
            "transform", "d"}


def drawn_content(svg: bytes) -> list[tuple]:
    """Every SVG element in order with its text and its attributes but the geometry."""
    return [(element.tag, (element.text or "").strip(),
             sorted((key, value) for key, value in element.attrib.items()
                    if key not in GEOMETRY))
            for element in ET.fromstring(svg).iter()]


@needs_dot
def test_the_picture_in_the_docs_is_what_the_command_draws_today(tmp_path):
    # docs/cli.md shows docs/images/fan_out_demo.svg: not a stale copy, but what
    # `isobranch graph examples/fan_out_demo.yaml --format svg` draws now (the
    # same nodes, edges, labels and styles; the layout may differ by a pixel).
    fresh = tmp_path / "fan_out_demo.svg"
    assert main(["graph", str(DEMO), "-f", "svg", "-o", str(fresh)]) == 0
    assert drawn_content(DEMO_PICTURE.read_bytes()) == drawn_content(fresh.read_bytes()), (
        "docs/images/fan_out_demo.svg is stale: redraw it with `isobranch graph "
        "examples/fan_out_demo.yaml --format svg -o docs/images/fan_out_demo.svg`")


@needs_dot
def test_svg_draws_a_subgraph_node_as_a_cluster_of_its_inner_nodes():
    inner = StateGraph()
    inner.add_node("score", lambda state: {})
    inner.add_edge(START, "score").add_edge("score", END)
    graph = StateGraph()
    graph.add_node("review", inner)
    graph.add_node("after", lambda state: {})
    graph.add_edge(START, "review").add_edge("review", "after").add_edge("after", END)
    with graph.compile(isolation="inline") as app:
        root = ET.fromstring(picture(app, PictureFormat.SVG))
    clusters = {group.find(f"{SVG}title").text: [text.text for text in group.iter(f"{SVG}text")]
                for group in root.iter(f"{SVG}g") if group.get("class") == "cluster"}
    assert clusters == {"cluster_n_review__cluster": ["review"]}
    assert sorted(node_texts(picture_of(graph)).values()) == sorted(
        [START, END, START, END, "score", "after"])


def picture_of(graph: StateGraph) -> bytes:
    with graph.compile(isolation="inline") as app:
        return picture(app, PictureFormat.SVG)
