"""The canvas layout of every bundled workflow (each JSON under workflows/, present and future), from the
JSON alone: no two nodes overlap (title bars included), every node the frontend counts as a group's member
(its centre lies in the group) sits wholly inside the group, below the group's title, no other node touches
a group, no two groups overlap and every group is as wide as its title. tests/build_workflow.py's builder makes layouts that pass; the saved
node sizes are checked against the real frontend in tests/test_browser_workflow.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.build_workflow import GROUP_TITLE_H, group_title_width, node_rect, overlap

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))


def layout_problems(wf: dict) -> list:
    """Every overlap and group-membership problem of a UI-format workflow, as sentences."""
    nodes = [(f"node {n['id']} ({n.get('title') or n['type']})", node_rect(n["pos"], n["size"])) for n in wf["nodes"]]
    groups = []
    for g in wf.get("groups", []):
        x, y, w, h = g["bounding"]
        groups.append((f"group '{g['title']}'", (x, y, x + w, y + h)))
    problems = []
    for i, (a_name, a) in enumerate(nodes):
        for b_name, b in nodes[i + 1:]:
            if overlap(a, b):
                problems.append(f"{a_name} overlaps {b_name}")
    for i, (a_name, a) in enumerate(groups):
        for b_name, b in groups[i + 1:]:
            if overlap(a, b):
                problems.append(f"{a_name} overlaps {b_name}")
    for g, (g_name, r) in zip(wf.get("groups", []), groups):
        if group_title_width(g["title"]) > r[2] - r[0]:
            problems.append(f"{g_name}: the title is wider than the group (it runs into its neighbour)")
    for g_name, g in groups:
        body = (g[0], g[1] + GROUP_TITLE_H, g[2], g[3])
        for n_name, r in nodes:
            centre_in = g[0] <= (r[0] + r[2]) / 2 <= g[2] and g[1] <= (r[1] + r[3]) / 2 <= g[3]
            if centre_in and not (body[0] <= r[0] and body[1] <= r[1] and r[2] <= body[2] and r[3] <= body[3]):
                problems.append(f"{n_name} sticks out of {g_name} (or covers its title)")
            elif not centre_in and overlap(r, g):
                problems.append(f"{n_name} is not in {g_name} but overlaps it")
    return problems


def test_every_bundled_workflow_is_checked():
    assert {p.name for p in WORKFLOWS} >= {"dreamidv_swap.json", "dreamidv_irl_finetune.json",
                                           "syncid_data_synthesis.json"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_nodes_do_not_overlap_and_stay_in_their_groups(path):
    problems = layout_problems(json.loads(path.read_text()))
    assert not problems, f"{path.name}: " + "; ".join(problems)


def test_the_check_sees_overlaps_and_nodes_outside_their_group():
    node = lambda i, pos, size: {"id": i, "type": "T", "pos": pos, "size": size}  # noqa: E731
    good = {"nodes": [node(1, [0, 0], [100, 50]), node(2, [0, 100], [100, 50])],
            "groups": [{"title": "G", "bounding": [-10, -74, 120, 234]}]}
    assert layout_problems(good) == []
    overlapping = {"nodes": [node(1, [0, 0], [100, 50]), node(2, [0, 60], [100, 50])], "groups": []}
    assert layout_problems(overlapping) == ["node 1 (T) overlaps node 2 (T)"]  # node 2's title bar is at 30..60
    sticking_out = {"nodes": [node(1, [0, 0], [300, 50])], "groups": [{"title": "G", "bounding": [-10, -74, 200, 134]}]}
    assert any("sticks out" in p for p in layout_problems(sticking_out))
    title_covered = {"nodes": [node(1, [0, 0], [100, 50])], "groups": [{"title": "G", "bounding": [-10, -40, 120, 100]}]}
    assert any("covers its title" in p for p in layout_problems(title_covered))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_bundled_workflow_has_its_picture(path):
    """The template browser's thumbnail and the README figure: ``<name>.jpg`` next to the JSON (drawn by
    ``python -m tests.test_browser_workflow``)."""
    picture = path.with_suffix(".jpg")
    assert picture.is_file(), f"{picture.name} is missing: python -m tests.test_browser_workflow"
    assert picture.read_bytes()[:3] == b"\xff\xd8\xff", f"{picture.name} is not a JPEG"
