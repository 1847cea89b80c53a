"""The int4 expert cache: routed experts quantised at load, kept as pack-quantized safetensors for the next start.

`<root>/<fingerprint>/layer-<L>.safetensors` holds MoE layer L's routed experts under the checkpoint's own names in
compressed-tensors pack-quantized form (`model.layers.L.mlp.experts.E.gate_proj.weight_packed`, `.weight_scale`,
`.weight_zero_point`, `.weight_shape`: `moed.formats.int4`'s bytes). The fingerprint hashes the source checkpoint's
config.json and its shards' names, sizes and modification times, and the quantiser's version and group, so a
changed checkpoint or quantiser never reads a stale file (a copied checkpoint merely rebuilds). Files are written
under a temporary name and renamed, so an interrupted start leaves nothing half-written; a file that cannot be
read is reported and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moed.formats import int4
from moed.model.config import GlmMoeDsaConfig
from moed.model.moe import ExpertWeights

log = logging.getLogger(__name__)

QUANTISER = "moed-int4-asym-clip16-v2"  # bump when quantize_expert's output changes
PROJS = ("gate_proj", "up_proj", "down_proj")


def fingerprint(checkpoint_dir: Path) -> str:
    h = hashlib.sha256(f"{QUANTISER} group={int4.GROUP_SIZE}\n".encode())
    h.update((checkpoint_dir / "config.json").read_bytes())
    for f in sorted(checkpoint_dir.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


class Int4Cache:
    def __init__(self, root: str | Path, checkpoint_dir: Path, cfg: GlmMoeDsaConfig) -> None:
        self.cfg = cfg
        self.dir = Path(root) / fingerprint(checkpoint_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        source = self.dir / "source.json"
        if not source.exists():
            source.write_text(
                json.dumps(
                    {"checkpoint": str(checkpoint_dir.resolve()), "quantiser": QUANTISER, "group_size": int4.GROUP_SIZE}
                )
                + "\n"
            )
        self._pending: dict[str, torch.Tensor] = {}

    def path(self, layer: int) -> Path:
        return self.dir / f"layer-{layer:03d}.safetensors"

    def read_layer(self, layer: int) -> list[ExpertWeights] | None:
        """Every routed expert of `layer` from its file, or None when there is none or it cannot be used."""
        path = self.path(layer)
        if not path.exists():
            return None
        I, H = self.cfg.moe_intermediate_size, self.cfg.hidden_size
        shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
        try:
            t = load_file(str(path))
            experts = []
            for e in range(self.cfg.n_routed_experts):
                parts = []
                for proj in PROJS:
                    p = f"model.layers.{layer}.mlp.experts.{e}.{proj}."
                    if tuple(t[p + "weight_shape"].tolist()) != shapes[proj]:
                        raise ValueError(
                            f"{p}weight_shape is {t[p + 'weight_shape'].tolist()}, want {list(shapes[proj])}"
                        )
                    parts.append(
                        int4.from_pack_quantized(
                            t[p + "weight_packed"],
                            t[p + "weight_scale"],
                            shapes[proj],
                            t.get(p + "weight_zero_point"),
                            int4.GROUP_SIZE,
                        )
                    )
                experts.append(ExpertWeights.from_int4(*parts))
        except Exception as e:  # safetensors raises its own types; any unreadable file is rebuilt, never trusted
            log.warning(
                "int4 cache %s is unusable (%s: %s); quantising layer %d again", path, type(e).__name__, e, layer
            )
            return None
        return experts

    def add(self, layer: int, expert: int, weights: ExpertWeights) -> None:
        for proj, w in zip(PROJS, weights.int4()):
            for suffix, tensor in int4.to_pack_quantized(w).items():
                self._pending[f"model.layers.{layer}.mlp.experts.{expert}.{proj}.{suffix}"] = tensor

    def write_layer(self, layer: int) -> None:
        path = self.path(layer)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(self._pending, str(tmp), metadata={"format": "pt", "quantiser": QUANTISER})
            tmp.rename(path)
        except OSError as e:  # a full or read-only disk costs the next start its speed, not this one its model
            log.warning("int4 cache: cannot write %s (%s); the next start quantises layer %d again", path, e, layer)
            tmp.unlink(missing_ok=True)
        self._pending.clear()
