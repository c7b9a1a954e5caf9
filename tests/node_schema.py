"""The pack's node schemas as ComfyUI's ``/object_info`` reports them, and a saved snapshot to compare with.

Saved workflows refer to nodes by id, to their inputs by name (links) and to their widgets by position
(``widgets_values``), and to outputs by slot. :func:`compatibility_problems` lists every change that would
break a workflow saved against the snapshot:

* a node id that disappeared;
* an input that disappeared, changed its type (widening it to more types is fine), or became required;
* widgets reordered: the snapshot's widget inputs must stay the first widgets, in the same order (new
  widgets may only be appended after them);
* an output that disappeared, moved to another slot or changed its type (new outputs go at the end).

Combo options may grow (model file lists depend on the machine, so they are not compared).

Refresh the snapshot only on purpose (an intended, announced schema change)::

    python tests/node_schema.py --write      # starts ComfyUI ($COMFYUI_DIR) with this pack
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

SNAPSHOT = Path(__file__).resolve().parent / "data" / "node_schema_snapshot.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _type_name(spec) -> str:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    if isinstance(kind, list):  # an old-style combo: the option list itself
        return "COMBO"
    return str(kind)


def node_schema(info: dict) -> dict:
    """One node's ``/object_info`` entry -> {inputs: [[name, type, section]], outputs: [[name, type]]}."""
    inputs = []
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            inputs.append([name, _type_name(spec), section])
    outputs = [[name, str(kind)] for name, kind in zip(info.get("output_name", []), info.get("output", []))]
    return {"inputs": inputs, "outputs": outputs}


def pack_schemas(object_info: dict, module_hint: str = "dreamidv") -> Dict[str, dict]:
    """Schemas of every node whose ``python_module`` names this pack."""
    return {name: node_schema(info) for name, info in sorted(object_info.items())
            if module_hint in str(info.get("python_module", "")).lower()}


def _widgets(schema: dict) -> List[str]:
    return [name for name, kind, _ in schema["inputs"] if kind in WIDGET_TYPES]


def _accepts(new, kind: str, section: str) -> bool:
    """The new input takes what the old one took: same section, same type or a widened one ("IMAGE" ->
    "IMAGE,VIDEO"), and a required input may become optional (not the reverse)."""
    new_kind, new_section = new
    widened = kind in new_kind.split(",")
    return widened and (new_section == section or new_section == "optional")


def compatibility_problems(snapshot: Dict[str, dict], current: Dict[str, dict]) -> List[str]:
    problems = []
    for node, old in snapshot.items():
        new = current.get(node)
        if new is None:
            problems.append(f"{node}: node id is gone")
            continue
        have = {name: (kind, section) for name, kind, section in new["inputs"]}
        for name, kind, section in old["inputs"]:
            if name not in have:
                problems.append(f"{node}: input '{name}' is gone")
            elif not _accepts(have[name], kind, section):
                problems.append(f"{node}: input '{name}' was {kind} ({section}), now {have[name][0]} "
                                f"({have[name][1]})")
        old_w, new_w = _widgets(old), _widgets(new)
        if new_w[:len(old_w)] != old_w:
            problems.append(f"{node}: widgets were {old_w}, now start {new_w[:len(old_w)]} (saved widgets_values "
                            "would shift)")
        for slot, out in enumerate(old["outputs"]):
            if slot >= len(new["outputs"]) or new["outputs"][slot] != out:
                got = new["outputs"][slot] if slot < len(new["outputs"]) else None
                problems.append(f"{node}: output slot {slot} was {out}, now {got}")
    return problems


def _write_snapshot() -> None:
    import os

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from comfy_harness import ComfyServer

    comfyui = os.environ.get("COMFYUI_DIR") or str(Path(__file__).resolve().parents[1] / ".cache" / "ComfyUI")
    with tempfile.TemporaryDirectory() as tmp:
        base, models = Path(tmp) / "base", Path(tmp) / "models"
        with ComfyServer(Path(comfyui), base, models) as server:
            schemas = pack_schemas(server.object_info())
    if not schemas:
        sys.exit("no DreamID-V nodes in /object_info; see the server log")
    SNAPSHOT.write_text(json.dumps(schemas, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(schemas)} node schemas to {SNAPSHOT}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    _write_snapshot()
