"""FLAME parameters -> posed vertices: what FlameShape and FlameShapeLandmark share.

`ParametricDecoder` holds medusa's input rules (the six named inputs, the trainable
parameters, batch-1 broadcasting and medusa's error messages) and the FLAME math as
blend -> rigid transforms -> blend with pose correctives -> skinning, run on the step
functions of whichever path flame_ext._backend chose.
"""

from __future__ import annotations

import torch

from ._backend import DecoderModule
from ._checks import FLOAT_DTYPES, check_count, check_tensor

POSE_NAMES = ("global_pose", "neck_pose", "jaw_pose", "eye_pose")
INPUT_NAMES = ("shape", "expr") + POSE_NAMES
# The largest batch a decoder takes, as smplx's layer (flame_ext.compat.smplx): no machine
# holds the outputs of more (FLAME's vertices alone are 60 KB a sample), and far above it
# their sizes overflow int64 before an allocation is even tried.
MAX_BATCH = 2**31 - 1


def _range_checked_on_host(identity: torch.Tensor) -> bool:
    """Whether identity's range is checked on the host (eager, on the CPU); elsewhere a
    check would synchronise with the device or break a compiled graph."""
    return identity.device.type == "cpu" and not torch.compiler.is_compiling()


def identity_rows(rows: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """rows[identity]: one row per frame, with deterministic gradients. On the CPU
    index_select, whose backward (index_add_) adds each row's frames in frame order, ~10x
    faster at (8 rows, 64 frames) than advanced indexing's index_put_(accumulate=True),
    which sums in another order; on a device advanced indexing, whose accumulation sorts
    the indices with a stable sort (index_add_ there uses atomics). On a device an index
    out of range (not checked there: that would synchronise) gives that frame a NaN row."""
    if _range_checked_on_host(identity):
        return torch.index_select(rows, 0, identity)  # checked in _gather_inputs
    count = rows.shape[0]
    valid = (identity >= 0) & (identity < count)
    return rows[identity.clamp(0, count - 1)].masked_fill(~valid[:, None], float("nan"))


class ParametricDecoder(DecoderModule):
    """Base of FlameShape and FlameShapeLandmark: FLAME parameters in, posed vertices out.

    The input handling (medusa's inputs, parameters, broadcasting and error messages) and
    the blend -> rigid transforms -> blend -> skinning pipeline. Subclasses define the
    six parameters, ``parameters_``, ``n_shape``, ``transforms`` and the tables
    ``v_template``, ``shape_dirs``, ``pose_dirs``, ``lbs_weights``, ``parents``,
    ``_J_template``, ``_J_dirs`` (FlameShapeLandmark: restricted to a vertex subset), and
    ``_identity_dirs``, ``_expr_dirs`` (`_split_dirs`), the last four read from the
    ``tables`` (`DerivedTables._derived`) that ``_decode`` is given.
    """

    def _split_dirs(self):
        """The vertex basis' shape and expression columns as two (3V, n) tables.

        With one identity for many frames the shape columns are blended once and the
        expression columns per frame. As column slices of the (3V, n_shape + n_expr) basis
        each table's rows are strided (400 of 1600 bytes for FLAME's expression), and the
        CPU loops streamed them 10-45% slower than contiguous copies (docs/PERFORMANCE.md):
        the copies cost the basis' bytes once more. A basis being fitted (computed with
        autograd) gives the slices themselves: no copy per call. Derived, not part of the
        state_dict.
        """
        num_vertices, _, components = self.shape_dirs.shape
        dirs = self.shape_dirs.reshape(num_vertices * 3, components)
        n = self.n_shape
        if torch.is_grad_enabled() and dirs.requires_grad:
            return dirs[:, :n], dirs[:, n:]
        return dirs[:, :n].contiguous(), dirs[:, n:].contiguous()

    def get_full_pose(self) -> torch.Tensor:
        """cat([global_pose, neck_pose, jaw_pose, eye_pose], dim=1): (B, 15)."""
        return torch.cat([self.global_pose, self.neck_pose, self.jaw_pose, self.eye_pose], dim=1)

    def _gather_inputs(self, batch_size, inputs, identity=None):
        """(batch_size, the six inputs, identity): medusa's rules, plus identity-indexed
        batches (``shape`` (S, n_shape) rows, ``identity`` (B,) picking one per frame)."""
        unknown = sorted(set(inputs) - set(INPUT_NAMES))
        if unknown:
            raise ValueError(f"unknown input(s) {unknown}; valid keys are {INPUT_NAMES}")
        if not inputs and batch_size is None:
            raise ValueError("Either inputs or batch_size must be provided!")
        for name in INPUT_NAMES:
            if name in inputs and name in self.parameters_:
                raise ValueError(f"Parameter {name} is also part of inputs!")
        like = self.v_template
        if like.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"the model is {like.dtype}; {type(self).__name__} computes in float32 or "
                "float64 (convert it with .float() or .double())"
            )
        for name, value in inputs.items():
            dim = getattr(self, name).shape[1]
            check_tensor(name, value, shape=(None, dim), floating=True)
            if value.dtype != like.dtype:
                raise TypeError(
                    f"{name} has dtype {value.dtype} but the model is {like.dtype}; "
                    "convert one of them (e.g. model.double())"
                )
            if value.device != like.device:
                raise ValueError(f"{name} is on {value.device} but the model is on {like.device}")
        if identity is not None:
            identity = self._check_identity(identity, batch_size)
            batch_size = identity.shape[0]
        if batch_size is None:
            # medusa takes the first input's batch size; with batch-1 inputs broadcasting,
            # the first one that is not 1 (the same wherever medusa works).
            sizes = [value.shape[0] for value in inputs.values()]
            batch_size = next((size for size in sizes if size != 1), sizes[0])
        batch_size = check_count("batch_size", batch_size, 0, MAX_BATCH)
        values = {}
        for name in INPUT_NAMES:
            value = inputs[name] if name in inputs else getattr(self, name)
            if identity is not None and name == "shape":
                pass  # S identity rows, any S >= 1: identity picks one per frame
            elif value.shape[0] not in (1, batch_size):
                source = "input" if name in inputs else "parameter"
                raise ValueError(
                    f"{source} {name} has batch size {value.shape[0]} but the batch size is "
                    f"{batch_size}; it must be {batch_size} or 1"
                )
            if name not in inputs and (value.dtype != like.dtype or value.device != like.device):
                # a parameter replaced or converted apart from the buffers
                raise TypeError(
                    f"parameter {name} is {value.dtype} on {value.device} but the model's "
                    f"buffers are {like.dtype} on {like.device}; convert the whole module"
                )
            values[name] = value
        if identity is not None:
            self._check_identity_range(identity, values["shape"].shape[0])
        return batch_size, values, identity

    def _check_identity(self, identity, batch_size):
        check_tensor("identity", identity, ndim=1, dtype=(torch.int64, torch.int32))
        if identity.device != self.v_template.device:
            raise ValueError(
                f"identity is on {identity.device} but the model is on {self.v_template.device}"
            )
        if batch_size is not None and batch_size != identity.shape[0]:
            raise ValueError(
                f"batch_size is {batch_size} but identity has {identity.shape[0]} frames"
            )
        return identity.long()

    @staticmethod
    def _check_identity_range(identity, count):
        """On the CPU (eager) an index out of [0, S) is a ValueError; elsewhere checking
        would synchronise with the device: the frame's outputs are NaN instead."""
        if count == 0:
            raise ValueError("identity needs at least one shape row, got shape with 0 rows")
        if not _range_checked_on_host(identity) or identity.numel() == 0:
            return
        low, high = (int(x) for x in torch.aminmax(identity))  # one pass, two reads
        if low < 0 or high >= count:
            frame = int(((identity < 0) | (identity >= count)).nonzero()[0, 0])
            raise ValueError(
                f"identity[{frame}] = {int(identity[frame])} is out of range for {count} "
                f"shape rows (it must be in [0, {count}))"
            )

    def _decode(self, k, tables, shape, expr, pose, identity=None):
        """The FLAME math as blend -> rigid transforms -> blend with correctives -> skinning.

        With one shape row for the whole batch (the fitting case), or S rows and an
        identity per frame, each identity's shaped mesh and joints are blended once and
        only expression and pose run per frame.
        """
        batch_size, num_vertices = pose.shape[0], self.v_template.shape[0]
        num_joints = self.parents.shape[0]
        v_dirs = self.shape_dirs.view(num_vertices * 3, -1)
        v_base, j_base = self.v_template.view(-1), tables["_J_template"]
        j_dirs = tables["_J_dirs"]
        # (shared_dirs, shared_coeffs, shared_joint_dirs, identity): the identity rows,
        # one for all frames or one per frame picked by identity
        shared = (None, None, None, None)
        if identity is not None or (shape.shape[0] == 1 and batch_size > 1):
            n = self.n_shape
            identity_dirs, expr_dirs = tables["_identity_dirs"], tables["_expr_dirs"]
            shared = (identity_dirs, shape, j_dirs[:, :n], identity)
            v_dirs, j_dirs, coeffs = expr_dirs, j_dirs[:, n:], expr.expand(batch_size, -1)
        else:
            coeffs = torch.cat(
                [shape.expand(batch_size, -1), expr.expand(batch_size, -1)], dim=1
            )
        pose = pose.view(batch_size, num_joints, 3)
        model = (self.pose_dirs, self.parents, self.lbs_weights)
        want_vertex_transforms = self.transforms == "vertex"
        # The compiled ops' single autograd node where it applies, else the four steps.
        fused = k.lbs(v_base, v_dirs, j_base, j_dirs, coeffs, pose, *model, want_vertex_transforms,
                      *shared)
        if fused is not None:
            v, vertex_transforms, transforms, _ = fused
        else:
            if shared[0] is not None:
                v_base = k.blend(v_base, shared[0], shared[1])
                j_base = k.blend(j_base, shared[2], shared[1])
                if identity is not None:
                    v_base, j_base = identity_rows(v_base, identity), identity_rows(j_base, identity)
            joints = k.blend(j_base, j_dirs, coeffs).view(batch_size, num_joints, 3)
            transforms, pose_feature = k.rigid_transforms(pose, joints, self.parents)
            v_posed = k.blend(v_base, v_dirs, coeffs, self.pose_dirs, pose_feature)
            v, vertex_transforms = k.skin(
                v_posed.view(batch_size, num_vertices, 3),
                transforms,
                self.lbs_weights,
                want_vertex_transforms,
            )
        if want_vertex_transforms:
            return v, vertex_transforms
        if self.transforms == "mean":
            return v, torch.einsum("j,bjxy->bxy", tables["_mean_weights"], transforms)
        return v, transforms if self.transforms == "joint" else None
