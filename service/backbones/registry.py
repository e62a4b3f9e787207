"""The known backbone kinds and the ONE way to load one from settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from service.backbones.base import Backbone, Capability
from service.backbones.clip import ClipBackbone, load_clip
from service.backbones.llava import LlavaBackbone
from service.backbones.llava_loading import load_llava
from service.errors import BackboneError
from service.settings import Settings


@dataclass(frozen=True)
class Kind:
    """A backbone kind: its class (what it declares) and how settings load it."""

    cls: type[Backbone]
    load: Callable[[Settings], Backbone]


def _clip(s: Settings) -> Backbone:
    return load_clip(
        s.model, s.pretrained, model_config=s.model_config_path, device=s.device,
        precision=s.precision, cache_dir=s.cache_dir,
    )  # fmt: skip


def _llava(s: Settings) -> Backbone:
    return load_llava(
        s.model, s.pretrained, device=s.device, precision=s.precision, cache_dir=s.cache_dir
    )


BACKBONES: dict[str, Kind] = {
    ClipBackbone.kind: Kind(ClipBackbone, _clip),
    LlavaBackbone.kind: Kind(LlavaBackbone, _llava),
}


def load_backbone(settings: Settings) -> Backbone:
    """The frozen backbone the settings name (raises with the fix when weights are missing)."""
    return kind(settings.backbone).load(settings)


def kind(name: str) -> Kind:
    """The registered kind `name` (BackboneError naming the known ones)."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(
            f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}"
        ) from None


def serving(capability: Capability) -> list[type[Backbone]]:
    """The backbone kinds that can serve `capability` (to tell a client where to go)."""
    return [k.cls for k in BACKBONES.values() if capability in k.cls.capabilities]
