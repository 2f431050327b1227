"""The synthetic albedo texture spaces, as FLAME_albedo_from_BFM.npz, FLAME_texture.npz and
AlbedoMM's albedoModel2020_FLAME_albedoPart.npz hold them.

Textures are low-frequency DCT patterns with random coefficients. All coefficients are
drawn whatever the number of components asked for, and the components are rendered in
fixed-size blocks, so the first k components do not depend on how many were asked for.
"""

from __future__ import annotations

import functools

import numpy as np

from .mesh import (
    _STREAM_ALBEDOMM_DIFFUSE,
    _STREAM_ALBEDOMM_SPECULAR,
    _STREAM_BFM,
    _STREAM_FLAME_TEX,
    _mesh,
    _rng,
    _size_spec,
)

_BFM_FILE = 'FLAME_albedo_from_BFM.npz'
_FLAME_TEX_FILE = 'FLAME_texture.npz'
_ALBEDOMM_FILE = 'albedoModel2020_FLAME_albedoPart.npz'

_TEX_BLOCK = 8  # texture components rendered together


def _dct_texture(hw, n_freq, n_total, n_keep, rng, base, mean_rms, basis_rms, dtype):
    """Mean (H,W,3) and the first n_keep of n_total basis images (H,W,3,n_keep).

    Images are sums of DCT-II patterns cos(pi a (h + 1/2) / H) cos(pi b (w + 1/2) / W)
    with random coefficients; the patterns are orthogonal, which gives each image's RMS in
    closed form. All coefficients are drawn, so component k never depends on n_keep.
    """
    decay = (1.0 + np.add.outer(np.arange(n_freq), np.arange(n_freq))) ** -1.5
    mean_coef = rng.standard_normal((n_freq, n_freq, 3)) * decay[..., None]
    coef = rng.standard_normal((n_freq, n_freq, 3, n_total)) * decay[..., None, None]
    # mean over pixels of a squared pattern: 1 when both frequencies are 0, else 1/2 or 1/4
    axis = np.where(np.arange(n_freq) == 0, 1.0, 0.5)
    energy = np.multiply.outer(axis, axis)

    def normalised(c, rms):
        return c * (rms / np.sqrt(np.einsum('ab,abck->k', energy, c**2) / 3.0))

    mean_coef = normalised(mean_coef[..., None], np.array([mean_rms]))
    # all n_total normalised at once, so that the arithmetic does not depend on n_keep
    coef = normalised(coef, basis_rms / (1.0 + np.arange(n_total)))[..., :n_keep]
    wave = np.cos(np.pi * np.outer(np.arange(hw) + 0.5, np.arange(n_freq)) / hw)

    def render(c):
        # Fixed-size blocks of components, zero-padded: the BLAS calls then have the same
        # shapes whatever n_keep is, so component k comes out bit-identical.
        out = np.empty((hw, hw, 3, c.shape[-1]), dtype)
        for k0 in range(0, c.shape[-1], _TEX_BLOCK):
            block = np.zeros(c.shape[:3] + (_TEX_BLOCK,))
            n = min(_TEX_BLOCK, c.shape[-1] - k0)
            block[..., :n] = c[..., k0 : k0 + n]
            cols = np.einsum('wb,abck->awck', wave, block).reshape(n_freq, -1)
            for lo in range(0, hw, 32):  # row chunks keep the float64 temporaries small
                rows = (wave[lo : lo + 32] @ cols).reshape(-1, hw, 3, _TEX_BLOCK)
                out[lo : lo + 32, :, :, k0 : k0 + n] = rows[..., :n]
        return out

    mean = render(mean_coef)[..., 0] + np.asarray(base, dtype)
    return mean, render(coef)


# BGR like the published files (FlameTex flips the channels on output).
@functools.lru_cache(maxsize=2)
def _build_bfm(size: str, seed: int, n_tex: int) -> dict:
    spec = _size_spec(size)
    mu, pc = _dct_texture(
        spec.tex_hw, spec.tex_freq, spec.n_tex_bfm, n_tex, _rng(seed, _STREAM_BFM),
        (0.42, 0.52, 0.70), 0.04, 0.06, np.float64,
    )
    return {'MU': mu.reshape(-1), 'PC': pc.reshape(-1, n_tex)}


@functools.lru_cache(maxsize=2)
def _build_flame_texture(size: str, seed: int, n_tex: int) -> dict:
    spec = _size_spec(size)
    mean, tex_dir = _dct_texture(
        spec.tex_hw, spec.tex_freq, spec.n_tex_flame, n_tex, _rng(seed, _STREAM_FLAME_TEX),
        (105.0, 135.0, 180.0), 10.0, 15.0, np.float32,
    )
    mesh = _mesh(size)
    return {'mean': mean, 'tex_dir': tex_dir, 'vt': mesh.vt, 'ft': mesh.ft}


@functools.lru_cache(maxsize=2)
def _build_albedomm(size: str, seed: int, n_tex: int) -> dict:
    """AlbedoMM's FLAME file: diffuse MU / PC and specular specMU / specPC, image-shaped
    (H,W,3) and (H,W,3,P) like the published file, values on the 0..1 scale, BGR, plus its
    UV layout (vt, ft). float32: the full-size file's four arrays are then 0.9 GB."""
    spec = _size_spec(size)
    mu, pc = _dct_texture(
        spec.tex_hw, spec.tex_freq, spec.n_tex_albedomm, n_tex,
        _rng(seed, _STREAM_ALBEDOMM_DIFFUSE), (0.38, 0.48, 0.66), 0.04, 0.06, np.float32,
    )
    # specular albedo: grey-ish and dimmer than the diffuse part
    spec_mu, spec_pc = _dct_texture(
        spec.tex_hw, spec.tex_freq, spec.n_tex_albedomm, n_tex,
        _rng(seed, _STREAM_ALBEDOMM_SPECULAR), (0.16, 0.16, 0.17), 0.02, 0.03, np.float32,
    )
    mesh = _mesh(size)
    return {'MU': mu, 'PC': pc, 'specMU': spec_mu, 'specPC': spec_pc,
            'vt': mesh.vt, 'ft': mesh.ft}
