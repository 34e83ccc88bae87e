"""Records of what made a cache: the backbone's weights and each cut, as frozen dataclasses.

A manifest stores them as JSON (`to_json`) and gives them back as the same records
(`from_manifest`), so that no stage parses a string such as "vgg16:IMAGENET1K_V1" or
"file:my.pth" again. Manifests written before the weights record existed (formats 1 and 2)
hold only the `weights` string: `Weights.from_manifest` converts it.

    w = Weights.from_manifest(manifest)      # Weights(kind="torchvision", name="IMAGENET1K_V1", ...)
    w.is_random_init(); w.label("vgg16")     # False, "vgg16:IMAGENET1K_V1"
    [c.display_name for c in Cut.all(manifest)]   # ["fc7"]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import UserError

TIMM = "timm:"                                   # backbone prefix of timm models
WEIGHT_KINDS = ("torchvision", "timm", "file", "none")
RECORD_KEY = "weights_record"                    # the manifest field that stores `Weights`
REEXTRACT = "re-extract it with `pipeline extract SOURCE -o CACHE --overwrite`"


@dataclass(frozen=True)
class Weights:
    """The backbone weights a cache was made with."""
    kind: str                # "torchvision" (a weights enum name), "timm" (its pretrained
                             # weights), "file" (a local .pth state_dict), "none" (random init)
    name: str                # enum name ("IMAGENET1K_V1"), timm tag, file name, or "none"
    sha256: str              # SHA-256 of the backbone state_dict actually used
    path: str | None = None  # a local file's absolute path when it was extracted; else None

    def is_random_init(self) -> bool:
        return self.kind == "none"

    def label(self, backbone: str) -> str:
        """The short name stored as the manifest's `weights` ("vgg16:IMAGENET1K_V1",
        "file:my.pth", "none"): what the feature fingerprint of every cache is made of."""
        if self.kind == "none":
            return "none"
        if self.kind == "file":
            return f"file:{self.name}"
        return f"{backbone}:{self.name}"

    def argument(self) -> str | None:
        """The --weights value that rebuilds these weights: the enum name, DEFAULT for timm's
        pretrained weights, the file's recorded path, 'none'; None for a file whose path is
        not known (a cache made before paths were recorded)."""
        if self.kind == "file":
            return self.path
        return {"none": "none", "timm": "DEFAULT"}.get(self.kind, self.name)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: Any = "cache", fix: str = REEXTRACT) -> "Weights":
        """The record stored by `to_json`; a UserError naming `where` and `fix` if it is
        damaged."""
        ok = (isinstance(data, dict) and data.get("kind") in WEIGHT_KINDS
              and all(isinstance(data.get(k), str) and data.get(k) for k in ("name", "sha256"))
              and (data.get("path") is None or isinstance(data.get("path"), str)))
        if not ok:
            raise UserError(f"{where}: damaged weights record {str(data)[:120]!r}: {fix}")
        return cls(data["kind"], data["name"], data["sha256"], data.get("path"))

    @classmethod
    def from_label(cls, backbone: str, label: str, sha256: str) -> "Weights":
        """The record of a manifest's `weights` string, for manifests without the record."""
        if label == "none":
            return cls("none", "none", sha256)
        if label.startswith("file:"):
            return cls("file", label[len("file:"):], sha256)
        kind = "timm" if backbone.startswith(TIMM) else "torchvision"
        name = label[len(backbone) + 1:] if label.startswith(backbone + ":") else label
        return cls(kind, name, sha256)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], where: Any = "cache") -> "Weights":
        """The weights of a cache manifest (or of the `cache` entry of a head's metadata): its
        record, or the `weights` string converted where there is none. The string and the
        SHA-256 are what the features' fingerprint is made of, so a record that disagrees with
        them (a file edited by hand) gives way to them."""
        backbone, label, sha = manifest["backbone"], manifest["weights"], manifest["weights_sha256"]
        if manifest.get(RECORD_KEY) is not None:
            record = cls.from_json(manifest[RECORD_KEY], where)
            if record.label(backbone) == label and record.sha256 == sha:
                return record
        return cls.from_label(backbone, label, sha)


@dataclass(frozen=True)
class Cut:
    """One cut of the backbone: where the features come from and how wide they are."""
    name: str                # the cut's dataset name in the cache (fc7, penultimate, ...)
    node: str                # graph node of the model, e.g. "classifier.4"
    alias: str | None        # the short name users know it by (fc7), if any
    pool: str | None         # None (flattened) or "avg"
    dim: int                 # D, the feature width

    @property
    def display_name(self) -> str:
        """How messages and tables name the cut: its alias, else its node."""
        return self.alias or self.node

    def to_json(self) -> dict[str, Any]:
        """The manifest's form: {name, layer, layer_alias, pool, feature_dim}."""
        return {"name": self.name, "layer": self.node, "layer_alias": self.alias,
                "pool": self.pool, "feature_dim": self.dim}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Cut":
        """A cut stored by `to_json`, or a one-cut manifest (its name is then its display name)."""
        alias, node = data.get("layer_alias"), data["layer"]
        return cls(data.get("name") or alias or node, node, alias, data.get("pool"),
                   int(data["feature_dim"]))

    @classmethod
    def all(cls, manifest: dict[str, Any]) -> list["Cut"]:
        """Every cut a manifest holds (one for a format-1 manifest)."""
        if manifest.get("cuts"):
            return [cls.from_json(c) for c in manifest["cuts"]]
        return [cls.from_json(manifest)]


__all__ = ["RECORD_KEY", "WEIGHT_KINDS", "Cut", "Weights"]
