"""MediaPipe face geometry, recomputed in numpy, and the reference pipeline's expression retargeting.

The reference pipeline needs each face's *metric mesh*: the 468 landmarks in centimetres, in the
canonical face frame (the FaceGeometry mesh MediaPipe computes inside the face landmarker, together
with the facial transformation matrix). The ``mediapipe`` wheels of today only hand back the matrix,
so the mesh is recomputed here from the screen landmarks with the procedure MediaPipe documents for
its geometry pipeline: screen landmarks -> perspective-camera frustum -> two-pass scale estimate by a
weighted orthogonal Procrustes fit to the canonical face -> metric landmarks -> pose -> landmarks moved
into the canonical frame. The canonical face and the Procrustes weights are read from the
``geometry_pipeline_metadata_landmarks.binarypb`` inside the ``.task`` file. The recomputed pose
matrix matches MediaPipe's own to float precision (checked by the tests on a real video).

Retargeting (``retarget``): ``mesh_t - mesh_neutral + mesh_reference`` projected with the driving
frame's pose matrix through the 63-degree perspective camera, then the 10 iris points placed inside
the projected eyes at the driving frame's relative iris position.
"""
from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from ...errors import CheckpointError
from .landmark_sets import LEFT_EYE_CONTOUR, LEFT_IRIS, RIGHT_EYE_CONTOUR, RIGHT_IRIS

VERTICAL_FOV_DEGREES = 63.0
NEAR = 1.0
FAR = 10000.0
MESH_VERTICES = 468
_METADATA_NAME = "geometry_pipeline_metadata_landmarks.binarypb"


@dataclass(frozen=True)
class GeometryMetadata:
    canonical: np.ndarray  # [468, 3] canonical face landmarks (cm)
    weights: np.ndarray  # [468] Procrustes weights (zero off the landmark basis)


# ----------------------------------------------------------------------------- protobuf (wire format)
def _varint(buf: bytes, pos: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of one protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, wire, val


def parse_metadata(blob: bytes) -> GeometryMetadata:
    """GeometryPipelineMetadata: 1 canonical_mesh (Mesh3d: 3 vertex_buffer floats, 5 per vertex:
    x, y, z, u, v), 2 procrustes_landmark_basis (1 landmark_id, 2 weight)."""
    vertex: list = []
    basis: list = []
    for num, wire, val in _fields(blob):
        if num == 1 and wire == 2:
            for mnum, mwire, mval in _fields(val):
                if mnum == 3 and mwire == 2:
                    vertex.extend(struct.unpack(f"<{len(mval) // 4}f", mval))
                elif mnum == 3 and mwire == 5:
                    vertex.append(struct.unpack("<f", mval)[0])
        elif num == 2 and wire == 2:
            lid, w = 0, 0.0
            for bnum, bwire, bval in _fields(val):
                if bnum == 1 and bwire == 0:
                    lid = bval
                elif bnum == 2 and bwire == 5:
                    w = struct.unpack("<f", bval)[0]
            basis.append((lid, w))
    vertex_arr = np.asarray(vertex, np.float64)
    if vertex_arr.size != MESH_VERTICES * 5 or not basis:
        raise ValueError(f"expected {MESH_VERTICES} canonical vertices and a landmark basis, "
                         f"got {vertex_arr.size // 5} vertices and {len(basis)} basis points")
    weights = np.zeros(MESH_VERTICES)
    for lid, w in basis:
        weights[lid] = w
    return GeometryMetadata(vertex_arr.reshape(MESH_VERTICES, 5)[:, :3].copy(), weights)


def load_metadata(task_path) -> GeometryMetadata:
    """The canonical face and Procrustes weights stored in a face landmarker ``.task`` file."""
    try:
        with zipfile.ZipFile(task_path) as z:
            return parse_metadata(z.read(_METADATA_NAME))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError, IndexError, struct.error) as exc:
        raise CheckpointError(task_path, "not a MediaPipe face landmarker .task file with face geometry "
                              f"({_METADATA_NAME}); use face_landmarker_v2_with_blendshapes.task ({exc})") from exc


# ----------------------------------------------------------------------------- Procrustes + frustum
def procrustes(source: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted similarity transform (uniform scale, rotation, translation) taking source [N,3] onto
    target [N,3]; returns the 4x4 matrix. Reflections are not allowed."""
    w = weights / weights.sum()
    src_c = (w[:, None] * source).sum(0)
    centered = source - src_c
    design = (target * w[:, None]).T @ centered  # 3x3
    u, _, vt = np.linalg.svd(design)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        u[:, 2] *= -1
    rot = u @ vt
    scale = ((centered @ rot.T) * target * w[:, None]).sum() / ((centered * source) * w[:, None]).sum()
    trans = ((target - scale * source @ rot.T) * w[:, None]).sum(0)
    mat = np.eye(4)
    mat[:3, :3] = scale * rot
    mat[:3, 3] = trans
    return mat


def _frustum(width: int, height: int) -> Tuple[float, float, float, float]:
    h_near = 2.0 * NEAR * np.tan(0.5 * np.deg2rad(VERTICAL_FOV_DEGREES))
    w_near = width * h_near / height
    return -0.5 * w_near, 0.5 * w_near, -0.5 * h_near, 0.5 * h_near  # left, right, bottom, top


def metric_mesh(landmarks: np.ndarray, width: int, height: int, meta: GeometryMetadata) -> Tuple[np.ndarray, np.ndarray]:
    """Normalised screen landmarks [>=468, 3] of a width x height image -> (mesh [468,3] in the
    canonical face frame, pose matrix [4,4] taking the mesh to camera space)."""
    left, right, bottom, top = _frustum(width, height)
    pts = np.asarray(landmarks, np.float64)[:MESH_VERTICES].copy()
    pts[:, 1] = 1.0 - pts[:, 1]
    pts *= np.array([right - left, top - bottom, right - left])
    pts[:, 0] += left
    pts[:, 1] += bottom
    depth_offset = pts[:, 2].mean()

    def first_scale() -> float:
        flipped = pts * np.array([1.0, 1.0, -1.0])
        return float(np.linalg.norm(procrustes(meta.canonical, flipped, meta.weights)[:3, 0]))

    def unproject(scale: float) -> np.ndarray:
        out = pts.copy()
        out[:, 2] = (out[:, 2] - depth_offset + NEAR) / scale
        out[:, 0] *= out[:, 2] / NEAR
        out[:, 1] *= out[:, 2] / NEAR
        out[:, 2] *= -1.0
        return out

    s1 = first_scale()
    s2 = float(np.linalg.norm(procrustes(meta.canonical, unproject(s1), meta.weights)[:3, 0]))
    metric = unproject(s1 * s2)
    pose = procrustes(meta.canonical, metric, meta.weights)
    inv = np.linalg.inv(pose)
    mesh = metric @ inv[:3, :3].T + inv[:3, 3]
    return mesh, pose


# ----------------------------------------------------------------------------- projection, retargeting
def perspective_matrix(aspect: float) -> np.ndarray:
    """The 63-degree camera (near 1, far 10000, y flipped for a top-left origin), as a 4x4 applied
    to row vectors (``p @ P``)."""
    f = 1.0 / np.tan(np.deg2rad(VERTICAL_FOV_DEGREES) / 2.0)
    denom = 1.0 / (NEAR - FAR)
    m = np.zeros((4, 4))
    m[0, 0] = f / aspect
    m[1, 1] = -f
    m[2, 2] = (NEAR + FAR) * denom
    m[2, 3] = -1.0
    m[3, 2] = FAR * NEAR * denom
    return m


def project(mesh: np.ndarray, pose: np.ndarray, width: int, height: int) -> np.ndarray:
    """mesh [N,3] (face frame) -> pixel coordinates [N,2] of a width x height frame."""
    homo = np.concatenate([mesh, np.ones((len(mesh), 1))], 1)
    clip = homo @ pose.T @ perspective_matrix(width / height)
    ndc = clip[:, :2] / clip[:, 3:4]
    return np.stack([(ndc[:, 0] + 1) * 0.5 * width, (ndc[:, 1] + 1) * 0.5 * height], 1)


def place_irises(landmarks: np.ndarray, projected: np.ndarray) -> np.ndarray:
    """Append the 10 iris points (468..477) to projected [468,2]: each iris keeps its position
    relative to its eye's bounding box in the driving landmarks [478,>=2] -> [478, 2]."""
    out = [projected]
    for iris, eye in ((RIGHT_IRIS, RIGHT_EYE_CONTOUR), (LEFT_IRIS, LEFT_EYE_CONTOUR)):
        src_eye = landmarks[list(eye), :2]
        lo, hi = src_eye.min(0), src_eye.max(0)
        rel = (landmarks[list(iris), :2] - lo) / (hi - lo)
        dst_eye = projected[list(eye)]
        dlo, dhi = dst_eye.min(0), dst_eye.max(0)
        out.append(rel * (dhi - dlo) + dlo)
    return np.concatenate(out, 0)


def retarget(mesh: np.ndarray, neutral_mesh: np.ndarray, reference_mesh: np.ndarray, pose: np.ndarray,
             landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
    """One driving frame onto the reference face -> pixel landmarks [478, 2].

    mesh, neutral_mesh, reference_mesh: [468,3] metric meshes (this frame, the driving video's most
    neutral frame, the reference photo); pose: this frame's [4,4] matrix; landmarks: this frame's
    normalised [478,3] landmarks (only the eyes and irises are read)."""
    verts = mesh - neutral_mesh + reference_mesh
    return place_irises(np.asarray(landmarks, np.float64), project(verts, pose, width, height))
