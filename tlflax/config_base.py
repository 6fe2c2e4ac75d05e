"""What every section of ``params.yaml`` shares: the strict base model and the field types.

The sections themselves are in :mod:`tlflax.config_data` and :mod:`tlflax.config_training`;
:mod:`tlflax.config` assembles them into the whole file's schema and loads it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, lt=1)]


class StrictSection(BaseModel):
    # extra="forbid" is what turns a typo into an error instead of a silently ignored key.
    model_config = ConfigDict(extra="forbid", frozen=True)


Modality = Literal["image", "text", "audio"]
NonEmptyString = Annotated[str, Field(min_length=1)]
