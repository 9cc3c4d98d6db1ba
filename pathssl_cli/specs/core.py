"""Spec models' building blocks: `Section`, `SpecModel` and the typed fields every kind shares (paths,
backbone names, weights). The loading pipeline lives beside it: TOML (`toml_files`) → `extends` merge →
`--set` overrides → pydantic validation (`problems`) → path resolution (`paths`) → input checks (`building`).

Every problem found along the way is collected and reported at once (`SpecError`, exit 2) before any work starts.
Each problem names the file, the line and column for syntax errors, or the dotted field path with what was given
and what was expected, and for unknown keys the closest valid key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from pathssl_cli.errors import Problem
from pathssl_cli.normalization import Normalization


@dataclass(frozen=True)
class PathMarker:
    """Marks a path field for resolution: `input` must exist, `output` is written, `pattern` is a glob."""

    kind: Literal["input", "output", "pattern"]


InputPath = Annotated[Path, PathMarker("input")]
"""A file or folder that must exist; relative paths are resolved against the directory of the spec file."""
OutputPath = Annotated[Path, PathMarker("output")]
"""A file or folder that is written; relative paths are resolved against the directory of the spec file."""
PathPattern = Annotated[str, PathMarker("pattern")]
"""A path or glob pattern resolved against the spec file's directory; matching is the command's job."""


def _check_backbone(name: str) -> str:
    from pathssl_cli.backbones import BACKBONES, is_known_backbone

    if not is_known_backbone(name):
        raise ValueError(BACKBONES.unknown_message(name) + " (or 'timm:<model>' for any timm model)")
    return name


BackboneName = Annotated[str, AfterValidator(_check_backbone)]
"""A name from the backbone registry (`pathssl backbones list`) or 'timm:<model name>'."""
WeightsRef = Union[Literal["random"], InputPath]  # noqa: UP007 - the marker inside must stay visible to the walker
"""'random' for random initialisation, or a local weights file (never downloaded)."""


class Section(BaseModel):
    """A table of a spec: unknown keys are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SpecModel(Section):
    """The top-level model of one spec kind. Subclasses declare `kind: Literal["<kind>"]`."""

    _source_file: Path | None = PrivateAttr(default=None)

    @property
    def source_file(self) -> Path | None:
        """The TOML file the spec was loaded from (None when built in Python)."""
        return self._source_file

    def check_inputs(self) -> list[Problem]:
        """Checks that need resolved paths (globs that match nothing, CSV columns, ...); run before any work."""
        return []


class ExplicitNormalization(Section):
    """Input statistics given by hand, for weights whose release states them (e.g. a timm model card)."""

    mean: tuple[float, float, float] = Field(
        description="Per-channel mean (R, G, B) of inputs scaled to [0, 1]; e.g. [0.5, 0.5, 0.5] for timm's "
        "vit_small_patch16_224.augreg release.")
    std: tuple[float, float, float] = Field(
        description="Per-channel standard deviation (R, G, B) of inputs scaled to [0, 1]; must be positive.")

    @model_validator(mode="after")
    def _positive_std(self) -> ExplicitNormalization:
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive per channel, got {list(self.std)}")
        return self


NormalizationSpec = Union[Normalization, ExplicitNormalization]  # noqa: UP007 - kept as one named alias
"""model.normalization: 'auto' | 'imagenet' | 'lunit_tcga' | 'timm', or {mean = [r, g, b], std = [r, g, b]}."""
