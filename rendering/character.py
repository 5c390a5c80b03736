"""Character-like animated test assets, built to weigh what real animated Objaverse files weigh.

rendering/procedural.py's kinds are light (a few hundred triangles, flat colours): right for tests of the
job's logic, wrong for measuring render speed. A typical animated Objaverse character is a skinned mesh of
tens of thousands of triangles in several parts, an armature of a few dozen bones, packed PBR image
textures (base colour, normal, roughness/metallic; 1-2k) and a few named actions of different lengths.
This module builds such an asset deterministically from a seed, with numpy for the geometry, the smooth
skin weights and the textures, and exports it to GLB through Blender's glTF exporter (every action as its
own glTF animation), so the job imports it through the same importer as a downloaded file.

* geometry: a body (torso, neck, arms, legs, hands), a head with eyes, an outfit shell (jacket, sleeves,
  trousers), boots, hair and, in some variants, a tail and a hand-held staff: 4 mesh objects (body, head,
  outfit, gear), all skinned to one armature (28 bones, 31 with a tail); triangle counts set by the
  variant's density;
* weights: inverse-distance to the bone segments of the part's own bones, 4 influences at most, smooth
  across joints;
* textures: skin, cloth and gear materials, each with a base-colour (JPEG), tangent-space normal (PNG)
  and glTF metallic-roughness (JPEG: G roughness, B metal) map made from value-noise fBm with real
  detail down to the pixel (pores, weave, scratches); the eyes are a plain material;
* actions: walk, wave, idle and jump (the variant says how many), each of its own length.

Run in a Blender (bpy) process:

    python -m rendering.character --out DIR [--variant light|medium|heavy|tiny ...] [--seed N]
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rendering.procedural import _armature, _bind, _bpy, _material, _start_action, _stash, write_glb

# Bumped whenever the generator changes, so cached GLBs of an older one are not reused.
VERSION = 1


@dataclass(frozen=True)
class Variant:
    """How heavy one character is."""

    density: float  # multiplies the ring and segment counts of every part (triangles ~ density^2)
    texture: int  # side of every image texture in pixels
    actions: int  # how many of ACTIONS it carries (3 or 4)
    tail: bool
    staff: bool


VARIANTS: dict[str, Variant] = {
    # ~27k triangles, 1k textures, 3 actions
    "light": Variant(density=0.52, texture=1024, actions=3, tail=False, staff=False),
    # ~42k triangles, 1k textures, 4 actions, a tail
    "medium": Variant(density=0.62, texture=1024, actions=4, tail=True, staff=False),
    # ~60k triangles, 2k textures, 3 actions, a tail and a staff
    "heavy": Variant(density=0.72, texture=2048, actions=3, tail=True, staff=True),
    # for tests: a few thousand triangles, 256 px textures, 3 actions (same structure)
    "tiny": Variant(density=0.25, texture=256, actions=3, tail=True, staff=True),
}
ACTIONS = ("walk", "wave", "idle", "jump")


# ----------------------------------------------------------------------------------------------- skeleton

def _skeleton(rng: np.random.Generator, tail: bool) -> list[tuple[str, tuple, tuple, str | None]]:
    """(name, head, tail, parent) of every bone, in a T pose facing -Y, about 1.8 units tall."""
    k = float(rng.uniform(0.92, 1.08))  # overall height
    sw = float(rng.uniform(0.9, 1.15))  # shoulder width
    z = lambda v: v * k  # noqa: E731
    bones: list[tuple[str, tuple, tuple, str | None]] = [
        ("root", (0, 0, 0), (0, 0, z(0.15)), None),
        ("hips", (0, 0, z(0.95)), (0, 0, z(1.05)), "root"),
        ("spine", (0, 0, z(1.05)), (0, 0, z(1.18)), "hips"),
        ("chest", (0, 0, z(1.18)), (0, 0, z(1.32)), "spine"),
        ("upper_chest", (0, 0, z(1.32)), (0, 0, z(1.45)), "chest"),
        ("neck", (0, 0, z(1.45)), (0, 0, z(1.56)), "upper_chest"),
        ("head", (0, 0, z(1.56)), (0, 0, z(1.82)), "neck"),
        ("jaw", (0, -0.02, z(1.62)), (0, -0.09, z(1.58)), "head"),
    ]
    for side, s in (("L", 1.0), ("R", -1.0)):
        sh = z(1.43)
        bones += [
            (f"shoulder_{side}", (s * 0.04, 0, sh), (s * 0.17 * sw, 0, sh), "upper_chest"),
            (f"upper_arm_{side}", (s * 0.17 * sw, 0, sh), (s * 0.44 * sw, 0, sh), f"shoulder_{side}"),
            (f"forearm_{side}", (s * 0.44 * sw, 0, sh), (s * 0.68 * sw, 0, sh), f"upper_arm_{side}"),
            (f"hand_{side}", (s * 0.68 * sw, 0, sh), (s * 0.77 * sw, 0, sh), f"forearm_{side}"),
            (f"fingers_{side}", (s * 0.77 * sw, 0, sh), (s * 0.86 * sw, 0, sh), f"hand_{side}"),
            (f"thumb_{side}", (s * 0.72 * sw, -0.03, sh - 0.01), (s * 0.77 * sw, -0.08, sh - 0.02), f"hand_{side}"),
            (f"thigh_{side}", (s * 0.09, 0, z(0.95)), (s * 0.10, 0, z(0.52)), "hips"),
            (f"shin_{side}", (s * 0.10, 0, z(0.52)), (s * 0.10, 0.01, z(0.10)), f"thigh_{side}"),
            (f"foot_{side}", (s * 0.10, 0.01, z(0.10)), (s * 0.10, -0.12, z(0.03)), f"shin_{side}"),
            (f"toe_{side}", (s * 0.10, -0.12, z(0.03)), (s * 0.10, -0.20, z(0.02)), f"foot_{side}"),
        ]
    if tail:
        bones += [("tail_0", (0, 0.08, z(0.98)), (0, 0.25, z(0.90)), "hips"),
                  ("tail_1", (0, 0.25, z(0.90)), (0, 0.42, z(0.86)), "tail_0"),
                  ("tail_2", (0, 0.42, z(0.86)), (0, 0.58, z(0.90)), "tail_1")]
    return bones


# ----------------------------------------------------------------------------------------------- geometry

class _Part:
    """Triangles of one mesh object: positions, per-corner UVs, per-triangle material slot, bones allowed."""

    def __init__(self) -> None:
        self.verts: list[np.ndarray] = []
        self.tris: list[np.ndarray] = []
        self.uvs: list[np.ndarray] = []
        self.mats: list[np.ndarray] = []
        self.bones: list[list[str]] = []  # per piece: the bones its vertices may follow
        self.n = 0

    def add(self, verts: np.ndarray, tris: np.ndarray, uvs: np.ndarray, mat: int, bones: list[str]) -> None:
        self.verts.append(verts)
        self.tris.append(tris + self.n)
        self.uvs.append(uvs)
        self.mats.append(np.full(len(tris), mat, np.int32))
        self.bones.append(bones)
        self.n += len(verts)

    def arrays(self):
        return (np.concatenate(self.verts), np.concatenate(self.tris), np.concatenate(self.uvs),
                np.concatenate(self.mats))


def _tube(path: np.ndarray, radii: np.ndarray, radial: int, rings: int, rect: tuple[float, float, float, float],
          rng: np.random.Generator, bumps: float = 0.0, ref: tuple = (0.0, 0.0, 1.0)):
    """A closed generalized cylinder along ``path`` (K x 3) with elliptic sections ``radii`` (K x 2).

    Returns (verts, tris, per-corner uvs) with the UVs wrapped into ``rect`` (u0, v0, u1, v1): u around,
    v along; the seam shares its vertices (the corners carry u = 1 on one side and 0 on the other), as an
    artist's unwrap does. Both ends are closed by a fan around a centre vertex.
    """
    path, radii = np.asarray(path, float), np.asarray(radii, float)
    seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, s[-1], rings)
    P = np.stack([np.interp(t, s, path[:, i]) for i in range(3)], 1)
    R = np.stack([np.interp(t, s, radii[:, i]) for i in range(2)], 1)
    T = np.gradient(P, axis=0)
    T /= np.linalg.norm(T, axis=1, keepdims=True) + 1e-12
    ref_v = np.asarray(ref, float)
    if abs(float(T.mean(0) @ ref_v)) > 0.8 * np.linalg.norm(T.mean(0)):
        ref_v = np.array([1.0, 0.0, 0.0]) if abs(ref_v[0]) < 0.5 else np.array([0.0, 1.0, 0.0])
    N = np.cross(ref_v, T)
    N /= np.linalg.norm(N, axis=1, keepdims=True) + 1e-12
    B = np.cross(T, N)
    theta = 2 * np.pi * np.arange(radial) / radial
    scale = np.ones((rings, radial))
    if bumps > 0:  # smooth lumps (muscles, folds): a few low harmonics around and along
        for _ in range(4):
            a, f, g, ph = rng.uniform(0, bumps), rng.integers(1, 4), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi, 2)
            scale += a * np.outer(np.sin(g * np.pi * t / max(s[-1], 1e-6) + ph[0]), np.cos(f * theta + ph[1]))
    ring = (R[:, None, 0:1] * (np.cos(theta)[None, :, None] * N[:, None, :]) +
            R[:, None, 1:2] * (np.sin(theta)[None, :, None] * B[:, None, :])) * scale[..., None]
    V = (P[:, None, :] + ring).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(rings - 1), np.arange(radial), indexing="ij")
    i, j = i.ravel(), j.ravel()
    jn = (j + 1) % radial
    a, b, c, d = i * radial + j, i * radial + jn, (i + 1) * radial + jn, (i + 1) * radial + j
    tris = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    u0, v0, u1, v1 = rect
    uu = lambda jj: u0 + (u1 - u0) * 0.9 * jj / radial  # noqa: E731  (the last 10% of the rect holds the caps)
    vv = lambda ii: v0 + (v1 - v0) * ii / (rings - 1)  # noqa: E731
    ua, ub = uu(j), uu(j + 1)
    va, vb = vv(i), vv(i + 1)
    uv1 = np.stack([np.stack([ua, va], 1), np.stack([ub, va], 1), np.stack([ub, vb], 1)], 1)
    uv2 = np.stack([np.stack([ua, va], 1), np.stack([ub, vb], 1), np.stack([ua, vb], 1)], 1)
    uvs = np.concatenate([uv1, uv2])
    # caps
    n = len(V)
    V = np.concatenate([V, P[[0, -1]]])
    cu = u0 + (u1 - u0) * 0.95
    caps, cap_uv = [], []
    for end, centre in ((0, n), (rings - 1, n + 1)):
        jj = np.arange(radial)
        ring_a, ring_b = end * radial + jj, end * radial + (jj + 1) % radial
        tri = np.stack([np.full(radial, centre), ring_b, ring_a], 1) if end == 0 else \
            np.stack([np.full(radial, centre), ring_a, ring_b], 1)
        caps.append(tri)
        ang = 2 * np.pi * jj / radial
        rr = 0.04 * (u1 - u0)
        vc = v0 + (v1 - v0) * (0.25 if end == 0 else 0.75)
        pa = np.stack([cu + rr * np.cos(ang), vc + rr * np.sin(ang)], 1)
        pb = np.stack([cu + rr * np.cos(ang + 2 * np.pi / radial), vc + rr * np.sin(ang + 2 * np.pi / radial)], 1)
        pc = np.tile([[cu, vc]], (radial, 1))
        cap_uv.append(np.stack([pc, pb, pa], 1) if end == 0 else np.stack([pc, pa, pb], 1))
    return V, np.concatenate([tris] + caps).astype(np.int64), np.concatenate([uvs] + cap_uv)


def _ellipsoid(centre, radii, radial: int, rings: int, rect, rng, bumps: float = 0.0, axis=(0.0, 0.0, 1.0)):
    """A UV ellipsoid: a tube along ``axis`` whose section follows sin(latitude), closed at the poles."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    phi = np.linspace(0.02, np.pi - 0.02, max(rings, 4))
    c = np.asarray(centre, float)
    path = c[None] - np.cos(phi)[:, None] * axis[None] * radii[2]
    rad = np.stack([radii[0] * np.sin(phi), radii[1] * np.sin(phi)], 1)
    return _tube(path, rad, radial, len(phi), rect, rng, bumps, ref=(0.0, -1.0, 0.0) if abs(axis[2]) > 0.5 else (0, 0, 1))


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=1)


def _weights(verts: np.ndarray, bones: dict[str, tuple], allowed: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Smooth skin weights: inverse 4th power of the distance to each allowed bone's segment, 4 influences
    at most, normalised. Returns (bone indices into ``allowed`` (N x 4), weights (N x 4))."""
    d = np.stack([_segment_distance(verts, np.asarray(bones[b][0], float), np.asarray(bones[b][1], float))
                  for b in allowed], 1)
    w = 1.0 / (d + 0.01) ** 4
    k = min(4, len(allowed))
    idx = np.argsort(-w, axis=1)[:, :k]
    top = np.take_along_axis(w, idx, 1)
    top /= top.sum(1, keepdims=True)
    top[top < 0.02] = 0.0
    top /= top.sum(1, keepdims=True)
    return idx, top


def _build_parts(rng: np.random.Generator, v: Variant, bones: dict[str, tuple]):
    """Every mesh object: {name: (_Part, [material names])}."""
    dens = v.density
    rad = lambda n: max(8, int(round(n * dens / 4)) * 4)  # noqa: E731
    rng_n = lambda n: max(4, int(round(n * dens)))  # noqa: E731
    H = lambda b: np.asarray(bones[b][0], float)  # noqa: E731
    T = lambda b: np.asarray(bones[b][1], float)  # noqa: E731
    bulk = float(rng.uniform(0.9, 1.15))
    parts: dict[str, tuple[_Part, list[str]]] = {}

    # Body: skin. Atlas of the skin texture: torso, arms, legs, hands in their own rects.
    body = _Part()
    torso_path = np.array([H("hips") + [0, 0, -0.08], H("spine"), H("chest"), H("upper_chest"), T("upper_chest")])
    torso_r = np.array([[0.15, 0.11], [0.14, 0.10], [0.16, 0.11], [0.19, 0.12], [0.12, 0.09]]) * bulk
    body.add(*_tube(torso_path, torso_r, rad(72), rng_n(70), (0.0, 0.0, 0.5, 0.5), rng, 0.04),
             0, ["hips", "spine", "chest", "upper_chest", "neck", "shoulder_L", "shoulder_R", "thigh_L", "thigh_R"])
    body.add(*_tube(np.array([H("neck") + [0, 0, -0.03], T("neck") + [0, 0, 0.03]]), np.array([[0.055, 0.05]] * 2) * bulk,
                    rad(40), rng_n(16), (0.5, 0.0, 0.75, 0.25), rng, 0.02), 0, ["upper_chest", "neck", "head"])
    for side, (ua, va) in (("L", (0.0, 0.5)), ("R", (0.25, 0.5))):
        arm = np.array([H(f"shoulder_{side}"), H(f"upper_arm_{side}"), T(f"upper_arm_{side}"), T(f"forearm_{side}")])
        arm_r = np.array([[0.07, 0.07], [0.06, 0.06], [0.045, 0.045], [0.035, 0.03]]) * bulk
        body.add(*_tube(arm, arm_r, rad(48), rng_n(80), (ua, va, ua + 0.25, va + 0.25), rng, 0.05), 0,
                 [f"shoulder_{side}", f"upper_arm_{side}", f"forearm_{side}", f"hand_{side}", "upper_chest"])
        hand_c = (H(f"hand_{side}") + T(f"hand_{side}")) / 2
        body.add(*_ellipsoid(hand_c, (0.03, 0.05, 0.05), rad(32), rng_n(20), (ua, va + 0.25, ua + 0.12, va + 0.37), rng,
                             axis=T(f"hand_{side}") - H(f"hand_{side}")), 0,
                 [f"forearm_{side}", f"hand_{side}", f"fingers_{side}", f"thumb_{side}"])
        body.add(*_tube(np.array([H(f"fingers_{side}"), T(f"fingers_{side}")]), np.array([[0.022, 0.04], [0.015, 0.03]]),
                        rad(24), rng_n(16), (ua + 0.12, va + 0.25, ua + 0.25, va + 0.37), rng), 0,
                 [f"hand_{side}", f"fingers_{side}"])
        body.add(*_tube(np.array([H(f"thumb_{side}"), T(f"thumb_{side}")]), np.array([[0.015, 0.015], [0.011, 0.011]]),
                        rad(16), rng_n(10), (ua, va + 0.37, ua + 0.12, va + 0.45), rng), 0,
                 [f"hand_{side}", f"thumb_{side}"])
        leg = np.array([H(f"thigh_{side}") + [0, 0, 0.04], T(f"thigh_{side}"), (T(f"thigh_{side}") + T(f"shin_{side}")) / 2,
                        T(f"shin_{side}")])
        leg_r = np.array([[0.10, 0.10], [0.065, 0.07], [0.06, 0.06], [0.04, 0.04]]) * bulk
        ul = 0.5 if side == "L" else 0.75
        body.add(*_tube(leg, leg_r, rad(56), rng_n(90), (ul, 0.5, ul + 0.25, 1.0), rng, 0.05), 0,
                 [f"thigh_{side}", f"shin_{side}", f"foot_{side}", "hips"])
    if v.tail:
        tail = np.array([H("tail_0"), H("tail_1"), H("tail_2"), T("tail_2")])
        body.add(*_tube(tail, np.array([[0.05, 0.05], [0.04, 0.04], [0.03, 0.03], [0.012, 0.012]]), rad(32), rng_n(50),
                        (0.75, 0.0, 1.0, 0.25), rng, 0.03), 0, ["hips", "tail_0", "tail_1", "tail_2"])
    parts["Body"] = (body, ["Skin"])

    # Head with eyes (two materials on one object, as most real heads have).
    head = _Part()
    hc = (H("head") + T("head")) / 2 + [0, -0.01, 0]
    head.add(*_ellipsoid(hc, (0.10 * bulk, 0.115, 0.135), rad(72), rng_n(56), (0.5, 0.25, 0.75, 0.5), rng, 0.03), 0,
             ["head", "neck", "jaw"])
    for side, s in (("L", 1), ("R", -1)):
        head.add(*_ellipsoid(hc + [s * 0.04, -0.095, 0.02], (0.02, 0.02, 0.02), rad(20), rng_n(14), (0, 0, 1, 1), rng,
                             axis=(0, -1, 0)), 1, ["head"])
    parts["Head"] = (head, ["Skin", "Eye"])

    # Outfit: a jacket shell over the torso and upper arms, trousers over the legs (cloth texture).
    outfit = _Part()
    jacket_r = np.array([[0.165, 0.125], [0.155, 0.115], [0.175, 0.125], [0.205, 0.135], [0.13, 0.10]]) * bulk
    outfit.add(*_tube(torso_path[:4].tolist() + [T("upper_chest") + [0, 0, -0.02]], jacket_r, rad(72), rng_n(56),
                      (0.0, 0.0, 0.5, 0.5), rng, 0.06),
               0, ["hips", "spine", "chest", "upper_chest", "shoulder_L", "shoulder_R", "thigh_L", "thigh_R"])
    for side, (ua, va) in (("L", (0.5, 0.0)), ("R", (0.75, 0.0))):
        sleeve = np.array([H(f"shoulder_{side}"), H(f"upper_arm_{side}"), (H(f"forearm_{side}") + T(f"forearm_{side}")) / 2])
        outfit.add(*_tube(sleeve, np.array([[0.08, 0.08], [0.07, 0.07], [0.055, 0.05]]) * bulk, rad(48), rng_n(50),
                          (ua, va, ua + 0.25, va + 0.5), rng, 0.06), 0,
                   [f"shoulder_{side}", f"upper_arm_{side}", f"forearm_{side}", "upper_chest"])
        ul = 0.0 if side == "L" else 0.25
        trousers = np.array([H("hips") + [0.09 if side == "L" else -0.09, 0, -0.02], T(f"thigh_{side}"),
                             0.3 * T(f"thigh_{side}") + 0.7 * T(f"shin_{side}")])
        outfit.add(*_tube(trousers, np.array([[0.115, 0.115], [0.075, 0.08], [0.07, 0.07]]) * bulk, rad(56), rng_n(70),
                          (ul, 0.5, ul + 0.25, 1.0), rng, 0.06), 0,
                   [f"thigh_{side}", f"shin_{side}", "hips"])
    parts["Outfit"] = (outfit, ["Cloth"])

    # Boots, hair, staff: gear (leather and metal share one texture set, as game assets do).
    gear = _Part()
    for side, ua in (("L", 0.0), ("R", 0.25)):
        c = (H(f"foot_{side}") + T(f"toe_{side}")) / 2 + [0, 0, 0.02]
        gear.add(*_ellipsoid(c, (0.06, 0.06, 0.14), rad(40), rng_n(32), (ua, 0.0, ua + 0.25, 0.25), rng, 0.03,
                             axis=(0, -1, -0.1)), 0, [f"shin_{side}", f"foot_{side}", f"toe_{side}"])
        boot_top = np.array([T(f"shin_{side}") + [0, 0, 0.16], T(f"shin_{side}") + [0, 0, -0.04]])
        gear.add(*_tube(boot_top, np.array([[0.055, 0.055], [0.055, 0.06]]) * bulk, rad(40), rng_n(16),
                        (ua, 0.25, ua + 0.25, 0.5), rng, 0.02), 0, [f"shin_{side}", f"foot_{side}"])
    hair_c = hc + [0, 0.015, 0.035]
    gear.add(*_ellipsoid(hair_c, (0.108 * bulk, 0.125, 0.115), rad(64), rng_n(40), (0.5, 0.0, 1.0, 0.5), rng, 0.08), 0,
             ["head"])
    if v.staff:
        grip = (H("hand_R") + T("hand_R")) / 2
        staff = np.array([grip + [0, -0.02, -0.35], grip + [0, -0.02, 0.45]])
        gear.add(*_tube(staff, np.array([[0.018, 0.018], [0.022, 0.022]]), rad(20), rng_n(60), (0.0, 0.5, 0.5, 1.0), rng,
                        0.02), 0, ["hand_R"])
        gear.add(*_ellipsoid(staff[1] + [0, 0, 0.05], (0.06, 0.06, 0.08), rad(32), rng_n(24), (0.5, 0.5, 1.0, 1.0), rng,
                             0.15), 0, ["hand_R"])
    parts["Gear"] = (gear, ["Gear"])
    return parts


# ----------------------------------------------------------------------------------------------- textures

def _fbm(rng: np.random.Generator, n: int, lo: int = 4, hi: int = 256, persistence: float = 0.55,
         aspect: tuple[int, int] = (1, 1)) -> np.ndarray:
    """Tileable value-noise fBm in [0, 1] on an n x n grid: random lattices from ``lo`` to ``hi`` cells,
    each bilinearly upsampled with two small matrix products."""
    def upsample(k: int) -> np.ndarray:
        x = np.arange(n) * k / n
        i0 = np.floor(x).astype(int)
        f = x - i0
        m = np.zeros((n, k))
        m[np.arange(n), i0 % k] += 1 - f
        m[np.arange(n), (i0 + 1) % k] += f
        return m
    out = np.zeros((n, n))
    amp, total = 1.0, 0.0
    k = lo
    while k <= min(hi, n // 2):
        ky, kx = max(2, k * aspect[0]), max(2, k * aspect[1])
        ky, kx = min(ky, n // 2), min(kx, n // 2)
        g = rng.random((ky, kx))
        out += amp * (upsample(ky) @ g @ upsample(kx).T)
        total += amp
        amp *= persistence
        k *= 2
    out /= total
    lo_, hi_ = out.min(), out.max()
    return (out - lo_) / max(hi_ - lo_, 1e-9)


def _normal_map(height: np.ndarray, strength: float) -> np.ndarray:
    """Tangent-space normal map (OpenGL/glTF: +Y up) of a tileable height field, as uint8 RGB."""
    n = height.shape[0]
    dx = (np.roll(height, -1, 1) - np.roll(height, 1, 1)) * n / 2
    dy = (np.roll(height, -1, 0) - np.roll(height, 1, 0)) * n / 2
    nrm = np.stack([-dx * strength / n, dy * strength / n, np.ones_like(height)], -1)
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
    return np.round((nrm * 0.5 + 0.5) * 255).astype(np.uint8)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def _textures(rng: np.random.Generator, n: int) -> dict[str, dict[str, np.ndarray]]:
    """Base colour, normal and metallic-roughness images (uint8 RGB) for the skin, cloth and gear."""
    yy, xx = np.meshgrid(np.arange(n) / n, np.arange(n) / n, indexing="ij")
    out: dict[str, dict[str, np.ndarray]] = {}
    # Skin: tone with blotches, freckles, pores.
    tone = np.array([rng.uniform(0.45, 0.95), rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.55)])
    blotch = _fbm(rng, n, 4, 64)
    pores = rng.random((n, n))
    fine = _fbm(rng, n, 64, 512, 0.7)
    freckles = (_fbm(rng, n, 32, 256, 0.5) > 0.78) * 0.25
    base = tone[None, None] * (0.8 + 0.3 * blotch[..., None] - freckles[..., None]) * (0.95 + 0.05 * pores[..., None])
    height = 0.6 * fine + 0.4 * (pores > 0.93)
    mr = np.stack([np.zeros((n, n)), 0.45 + 0.25 * fine + 0.1 * blotch, np.zeros((n, n))], -1)
    out["Skin"] = {"base": _to_u8(base), "normal": _normal_map(height, 1.5), "mr": _to_u8(mr)}
    # Cloth: plaid colours over a woven height field.
    ca, cb, cc = rng.uniform(0.05, 0.9, 3), rng.uniform(0.05, 0.9, 3), rng.uniform(0.05, 0.9, 3)
    f = int(rng.integers(6, 14))
    plaid = ((np.sin(2 * np.pi * f * xx) > 0.3) ^ (np.sin(2 * np.pi * f * yy) > 0.3)).astype(float)
    stripe = (np.sin(2 * np.pi * 3 * f * xx) > 0.9).astype(float)
    weave_f = n // 8
    weave = 0.5 + 0.5 * np.sin(2 * np.pi * weave_f * xx) * np.sin(2 * np.pi * weave_f * yy)
    grime = _fbm(rng, n, 4, 128)
    base = (ca[None, None] * (1 - plaid[..., None]) + cb[None, None] * plaid[..., None]) * (1 - 0.5 * stripe[..., None]) \
        + cc[None, None] * 0.5 * stripe[..., None]
    base *= (0.8 + 0.2 * weave[..., None]) * (0.85 + 0.15 * grime[..., None])
    mr = np.stack([np.zeros((n, n)), 0.75 + 0.15 * grime + 0.05 * weave, np.zeros((n, n))], -1)
    out["Cloth"] = {"base": _to_u8(base), "normal": _normal_map(0.7 * weave + 0.3 * _fbm(rng, n, 32, 512), 2.0),
                    "mr": _to_u8(mr)}
    # Gear: leather (left half of the atlas) and metal (right half) with scratches.
    leather = np.array([rng.uniform(0.15, 0.45), rng.uniform(0.08, 0.3), rng.uniform(0.03, 0.15)])
    metal = np.array([rng.uniform(0.5, 0.9)] * 3) * np.array([1.0, rng.uniform(0.85, 1.0), rng.uniform(0.7, 1.0)])
    grain = _fbm(rng, n, 8, 512, 0.65)
    scratches = _fbm(rng, n, 4, 512, 0.6, aspect=(1, 16)) > 0.8
    is_metal = (xx >= 0.5)[..., None]
    base = np.where(is_metal, metal[None, None] * (0.85 + 0.15 * grain[..., None]),
                    leather[None, None] * (0.7 + 0.5 * grain[..., None])) * (1 - 0.2 * scratches[..., None])
    rough = np.where(is_metal[..., 0], 0.3 + 0.3 * scratches + 0.1 * grain, 0.55 + 0.3 * grain)
    mr = np.stack([np.zeros((n, n)), rough, is_metal[..., 0] * 1.0], -1)
    out["Gear"] = {"base": _to_u8(base), "normal": _normal_map(0.5 * grain - 0.5 * scratches, 1.5), "mr": _to_u8(mr)}
    return out


# ----------------------------------------------------------------------------------------------- Blender

def _mesh_object(name: str, part: _Part, materials: list, armature, bones: dict[str, tuple]):
    bpy = _bpy()
    V, F, UV, M = part.arrays()
    me = bpy.data.meshes.new(name)
    me.vertices.add(len(V))
    me.vertices.foreach_set("co", V.astype(np.float32).ravel())
    me.loops.add(F.size)
    me.loops.foreach_set("vertex_index", F.astype(np.int32).ravel())
    me.polygons.add(len(F))
    me.polygons.foreach_set("loop_start", np.arange(0, F.size, 3, dtype=np.int32))
    me.update(calc_edges=True)
    uv = me.uv_layers.new(name="UVMap")
    uv.data.foreach_set("uv", UV.astype(np.float32).ravel())
    me.polygons.foreach_set("material_index", M)
    for mat in materials:
        me.materials.append(mat)
    me.shade_smooth()
    me.validate()
    obj = bpy.data.objects.new(name, me)
    bpy.context.scene.collection.objects.link(obj)
    # Skin weights, piece by piece (each piece follows its own bones); set per (bone, quantised weight)
    # so that tens of thousands of vertices take a few thousand calls.
    groups: dict[str, object] = {}
    start = 0
    for verts, allowed in zip(part.verts, part.bones):
        idx, w = _weights(verts, bones, allowed)
        q = np.round(w * 255).astype(int)
        for slot in range(idx.shape[1]):
            for bi, bname in enumerate(allowed):
                sel = (idx[:, slot] == bi) & (q[:, slot] > 0)
                if not sel.any():
                    continue
                g = groups.get(bname) or obj.vertex_groups.new(name=bname)
                groups[bname] = g
                vi, vq = np.nonzero(sel)[0], q[sel, slot]
                for value in np.unique(vq):
                    g.add((vi[vq == value] + start).tolist(), float(value) / 255.0, "REPLACE")
        start += len(verts)
    _bind(obj, armature)
    return obj, len(F)


def _image(name: str, pixels: np.ndarray, fmt: str, tmp: Path, non_color: bool):
    """Write ``pixels`` as a PNG or JPEG file, load it into Blender and pack it (the GLB then carries the
    file's own bytes, as a downloaded asset does)."""
    from PIL import Image
    bpy = _bpy()
    path = tmp / f"{name}.{'jpg' if fmt == 'JPEG' else 'png'}"
    im = Image.fromarray(pixels)
    if fmt == "JPEG":
        im.save(path, "JPEG", quality=90, subsampling=0)
    else:
        im.save(path, "PNG", compress_level=6)
    img = bpy.data.images.load(str(path))
    img.name = name
    if non_color:
        img.colorspace_settings.name = "Non-Color"
    img.pack()
    return img


def _textured_material(name: str, maps: dict[str, np.ndarray], tmp: Path):
    """A material whose base colour, normal and metallic-roughness come from ``maps`` (``_textures``' images)."""
    mat = _material(name)
    nt = mat.node_tree
    bsdf = nt.nodes.get("Principled BSDF")
    base = nt.nodes.new("ShaderNodeTexImage")
    base.image = _image(f"{name}_basecolor", maps["base"], "JPEG", tmp, False)
    nt.links.new(base.outputs["Color"], bsdf.inputs["Base Color"])
    ntex = nt.nodes.new("ShaderNodeTexImage")
    ntex.image = _image(f"{name}_normal", maps["normal"], "PNG", tmp, True)
    nmap = nt.nodes.new("ShaderNodeNormalMap")
    nmap.uv_map = "UVMap"
    nt.links.new(ntex.outputs["Color"], nmap.inputs["Color"])
    nt.links.new(nmap.outputs["Normal"], bsdf.inputs["Normal"])
    mr = nt.nodes.new("ShaderNodeTexImage")
    mr.image = _image(f"{name}_metallicroughness", maps["mr"], "JPEG", tmp, True)
    sep = nt.nodes.new("ShaderNodeSeparateColor")
    nt.links.new(mr.outputs["Color"], sep.inputs["Color"])
    nt.links.new(sep.outputs["Green"], bsdf.inputs["Roughness"])
    nt.links.new(sep.outputs["Blue"], bsdf.inputs["Metallic"])
    return mat


def _quat(rig, bone: str, axis, angle: float):
    """The pose rotation (bone-local quaternion) that turns ``bone`` by ``angle`` about a world ``axis``
    given at rest (the rig is not rotated)."""
    import mathutils
    local = rig.data.bones[bone].matrix_local.to_3x3().inverted() @ mathutils.Vector(axis)
    return mathutils.Quaternion(local.normalized(), angle)


def _pose(rig, name: str, ph: float, amp: float) -> dict[str, tuple]:
    """Per bone: (list of (world axis, angle)), plus a root offset, at phase ``ph`` (0..2pi) of action ``name``."""
    s, c = math.sin(ph), math.cos(ph)
    r: dict[str, list] = {}
    loc = (0.0, 0.0, 0.0)
    down = math.radians(70)  # arms from the T pose down beside the body
    X, Y, Z = (1, 0, 0), (0, 1, 0), (0, 0, 1)
    if name == "walk":
        for side, sg in (("L", 1), ("R", -1)):
            r[f"thigh_{side}"] = [(X, sg * 0.5 * amp * s)]
            r[f"shin_{side}"] = [(X, -0.7 * amp * max(0.0, -sg * c))]
            r[f"foot_{side}"] = [(X, 0.2 * amp * sg * s)]
            r[f"upper_arm_{side}"] = [(Y, sg * down), (X, -sg * 0.4 * amp * s)]
            r[f"forearm_{side}"] = [(X, -0.3 * amp)]
        r["spine"] = [(Z, 0.12 * amp * s)]
        r["head"] = [(Z, -0.08 * amp * s)]
        loc = (0.0, 0.0, 0.03 * amp * abs(c))
    elif name == "wave":
        # The right arm points -X: a positive turn about +Y raises it.
        r["upper_arm_R"] = [(Y, math.radians(60)), (X, 0.2)]
        r["forearm_R"] = [(Y, 0.6 + 0.5 * amp * s)]
        r["hand_R"] = [(Y, 0.3 * amp * s)]
        r["fingers_R"] = [(X, 0.2 * amp * c)]
        r["upper_arm_L"] = [(Y, down)]
        r["head"] = [(Y, 0.12 * amp * s), (Z, 0.2)]
        r["chest"] = [(Y, -0.05 * amp * s)]
    elif name == "idle":
        r["chest"] = [(X, 0.05 * amp * s)]
        r["upper_chest"] = [(X, 0.04 * amp * s)]
        r["neck"] = [(Z, 0.3 * amp * math.sin(ph / 2))]
        r["head"] = [(X, 0.08 * amp * c)]
        r["jaw"] = [(X, 0.15 * amp * max(0.0, s))]
        for side, sg in (("L", 1), ("R", -1)):
            r[f"upper_arm_{side}"] = [(Y, sg * (down - 0.05 * amp * s))]
            r[f"fingers_{side}"] = [(X, 0.3 * amp * (1 + s))]
    elif name == "jump":
        crouch = max(0.0, math.sin(ph)) if ph < math.pi else 0.0
        air = max(0.0, -math.sin(ph))
        for side, sg in (("L", 1), ("R", -1)):
            r[f"thigh_{side}"] = [(X, -0.9 * amp * crouch + 0.3 * air)]
            r[f"shin_{side}"] = [(X, 1.5 * amp * crouch)]
            r[f"foot_{side}"] = [(X, -0.6 * amp * crouch + 0.4 * air)]
            r[f"upper_arm_{side}"] = [(Y, sg * (down * (1 - air) - 0.9 * air))]
        r["spine"] = [(X, 0.3 * amp * crouch)]
        loc = (0.0, 0.0, -0.25 * amp * crouch + 0.45 * amp * air)
    for bone in ("tail_0", "tail_1", "tail_2"):
        if bone in rig.pose.bones:
            r[bone] = [(Z, 0.35 * math.sin(ph * 2 + int(bone[-1]))), (X, 0.1 * c)]
    return {"rot": r, "loc": loc}


def _actions(rig, rng: np.random.Generator, names: tuple[str, ...]) -> dict[str, int]:
    """Keyframe each action on the rig (every 2 frames; the exporter samples every frame) and stash it in
    an NLA track, so the exporter writes one glTF animation per action. Returns {name: length in frames}."""
    bpy = _bpy()
    lengths = {"walk": int(rng.integers(24, 37)), "wave": int(rng.integers(36, 61)), "idle": int(rng.integers(48, 81)),
               "jump": int(rng.integers(20, 33))}
    for pb in rig.pose.bones:
        pb.rotation_mode = "QUATERNION"
    for name in names:
        _start_action(rig, name)
        amp = float(rng.uniform(0.8, 1.2))
        n = lengths[name]
        for f in list(range(0, n, 2)) + [n]:
            pose = _pose(rig, name, 2 * math.pi * f / n, amp)
            for pb in rig.pose.bones:
                q = None
                for axis, angle in pose["rot"].get(pb.name, []):
                    step = _quat(rig, pb.name, axis, angle)
                    q = step if q is None else step @ q
                pb.rotation_quaternion = q if q is not None else (1, 0, 0, 0)
                pb.location = (0, 0, 0)
                pb.keyframe_insert("rotation_quaternion", frame=f + 1)
            root = rig.pose.bones["root"]
            # The root bone points up +Z, its local Y: world offsets map to (x, z, -y) in its rest frame.
            lx, ly, lz = pose["loc"]
            root.location = (lx, lz, -ly)
            root.keyframe_insert("location", frame=f + 1)
        _stash(rig)
    bpy.context.scene.frame_start = 1
    bpy.context.scene.frame_end = max(lengths[n] for n in names) + 1
    return {n: lengths[n] for n in names}


def build(seed: int, variant: str = "medium") -> dict:
    """Build one character into the (empty) current scene; returns what it holds."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown character variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    rng = np.random.default_rng([seed, VERSION])
    spec = _skeleton(rng, v.tail)
    bones = {name: (head, tail) for name, head, tail, _ in spec}
    rig = _armature(spec, name="Armature")
    parts = _build_parts(rng, v, bones)
    tex = _textures(rng, v.texture)
    with tempfile.TemporaryDirectory() as d:
        mats = {name: _textured_material(name, tex[name], Path(d)) for name in ("Skin", "Cloth", "Gear")}
        mats["Eye"] = _material("Eye", color=(0.05, 0.05, 0.06, 1.0), roughness=0.15)
        triangles = {}
        for name, (part, mat_names) in parts.items():
            _, n = _mesh_object(name, part, [mats[m] for m in mat_names], rig, bones)
            triangles[name] = n
        # The images stay packed in the .blend data; their files can go.
        actions = _actions(rig, rng, ACTIONS[: v.actions])
    return {"seed": seed, "variant": variant, "triangles": triangles, "triangles_total": sum(triangles.values()),
            "bones": len(spec), "texture": v.texture, "images": 9, "actions": actions}


def export_glb(path: str | Path, seed: int = 0, variant: str = "medium") -> dict:
    """Build a character in a fresh scene and export it (every action its own animation) to ``path``."""
    _bpy().ops.wm.read_factory_settings(use_empty=True)
    info = build(seed, variant)
    path = write_glb(path, export_image_format="AUTO")
    info["path"] = str(path)
    info["bytes"] = path.stat().st_size
    return info


if __name__ == "__main__":
    import argparse
    import json
    p = argparse.ArgumentParser(description="Export character-like animated GLBs (skinned, textured, several actions)")
    p.add_argument("--out", required=True)
    p.add_argument("--variant", nargs="+", default=["light", "medium", "heavy"], choices=sorted(VARIANTS))
    p.add_argument("--seed", type=int, default=0, help="seed of the first asset; the next ones count up")
    a = p.parse_args()
    for i, var in enumerate(a.variant):
        print(json.dumps(export_glb(Path(a.out) / f"char-{var}-{a.seed + i}.glb", a.seed + i, var)), flush=True)
