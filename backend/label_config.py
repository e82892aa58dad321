"""A project's labeling config, read for what Stable-SAM needs: which control a mask is written
for on each image (its PolygonLabels, else its BrushLabels), which task data key holds the image,
and whether a prompt region fits the config.

A config with no ``<Image>`` at all (``<View></View>``, a project whose labeling interface is not
set yet) is ``ConfigNotReady``: /setup accepts it, /predict answers it with a 400 saying what the
config needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Sequence

from label_studio_sdk.label_interface import LabelInterface

from stable_sam.data.label_studio_prompts import (KEYPOINT_CONTROL_TAGS, PROMPT_CONTROL_TAGS, RECTANGLE_CONTROL_TAGS,
                                                  PromptGroup, Region)

from .errors import BadInput, short_repr


MASK_CONTROL_TAGS = ("PolygonLabels", "BrushLabels")  # what a mask is written as, preferred first


class ConfigNotReady(BadInput):
    """A label config with no ``<Image>``: nothing to segment yet (accepted by /setup)."""


@dataclass(frozen=True)
class ParsedConfig:
    """A project's labeling config, read once: its controls, which control each image's masks are
    written for, and which task data key holds each image."""
    interface: LabelInterface
    controls: Dict[str, Any]  # name -> control tag
    brush_by_image: Dict[str, Any]  # Image tag name -> its first BrushLabels control
    image_keys: Dict[str, str]  # Image tag name -> task data key
    polygon_by_image: Dict[str, Any] = field(default_factory=dict)  # Image tag name -> its first PolygonLabels

    @property
    def output_by_image(self) -> Dict[str, Any]:
        """Image tag name -> the control its masks are written for: its PolygonLabels control
        (polygons), else its BrushLabels control (brush masks)."""
        return {**self.brush_by_image, **self.polygon_by_image}


def parse_label_config(config: Any) -> ParsedConfig:
    """Parse a label config (``StableSamBackend.label_config`` caches them); 4xx when it cannot
    serve masks (``ConfigNotReady`` when it has no image at all)."""
    if config is not None and not isinstance(config, str):
        raise BadInput(f"label_config must be a string (the labeling config's XML), got {type(config).__name__}")
    if not config or not config.strip():
        raise BadInput("no label config: send 'label_config' with /predict or connect through /setup first")
    try:
        li = LabelInterface(config)
    except Exception as e:  # the SDK raises many types for a broken XML
        raise BadInput(f"label config cannot be parsed: {str(e)[:300]}") from None
    controls = {c.name: c for c in (li.controls or [])}
    images = {obj.name: obj for obj in (li.objects or []) if obj.tag == "Image"}
    if not images:
        raise ConfigNotReady("the project's labeling config has no <Image>: Stable-SAM segments images. Set the "
                             "labeling interface to label_config/recommended.xml (brush masks) or "
                             "label_config/polygon.xml (polygons): an <Image>, smart <KeyPointLabels> / "
                             "<RectangleLabels> for the prompts and <BrushLabels> or <PolygonLabels> for the masks")
    by_tag: Dict[str, Dict[str, Any]] = {tag: {} for tag in MASK_CONTROL_TAGS}
    for c in controls.values():
        if c.tag in by_tag:
            for to in c.to_name:
                if to in images:
                    by_tag[c.tag].setdefault(to, c)
    if not by_tag["BrushLabels"] and not by_tag["PolygonLabels"]:
        raise BadInput("the label config has no <BrushLabels> or <PolygonLabels> control on an <Image>: Stable-SAM "
                       "answers with brush masks or polygons; use label_config/recommended.xml or polygon.xml")
    keys = {name: obj.value_name for name, obj in images.items() if obj.value_name}
    return ParsedConfig(li, controls, by_tag["BrushLabels"], keys, by_tag["PolygonLabels"])


def output_label(group: PromptGroup, control: Any) -> str:
    """The label a prompt's mask gets in ``control`` (its image's BrushLabels or PolygonLabels):
    the prompt's own label (case folded if need be), or the control's only label; 4xx when
    neither fits."""
    labels = list(control.labels or [])
    if group.label is not None and group.label in labels:
        return group.label
    if group.label is not None:
        folded = {v.casefold(): v for v in labels}
        if group.label.casefold() in folded:
            return folded[group.label.casefold()]
    if group.label is None and len(labels) == 1:
        return labels[0]
    if group.label is None:
        raise BadInput(f"the prompt ({short_repr(', '.join(group.source_ids))}) has no label and {control.tag} control "
                       f"'{control.name}' has several ({short_repr(labels, 300)}): use labelled keypoints / rectangles")
    raise BadInput(f"label {short_repr(group.label)} of {short_repr(group.from_name)} is not a label of {control.tag} control "
                   f"'{control.name}' ({short_repr(labels, 300)}): give both controls the same labels")


def check_regions(cfg: ParsedConfig, regions: Sequence[Region]) -> None:
    """4xx unless every region comes from a keypoint / rectangle control of ``cfg`` on an image
    that a brush or polygon control labels."""
    for r in regions:
        control = cfg.controls.get(r.from_name)
        rid = short_repr(r.id, 40)
        if control is None:
            raise BadInput(f"unknown from_name {short_repr(r.from_name)} (region {rid}): the label config's controls "
                           f"are {short_repr(sorted(cfg.controls), 300)}")
        if control.tag not in PROMPT_CONTROL_TAGS:
            raise BadInput(f"from_name {short_repr(r.from_name)} (region {rid}) is a <{control.tag}>, not a keypoint "
                           f"or rectangle control")
        expected = KEYPOINT_CONTROL_TAGS if r.kind == "keypoint" else RECTANGLE_CONTROL_TAGS
        if control.tag not in expected:
            raise BadInput(f"region {rid} is a {r.kind}, but its from_name {short_repr(r.from_name)} is a "
                           f"<{control.tag}>: send it with a {' / '.join(expected)} control")
        if r.to_name not in control.to_name:
            raise BadInput(f"to_name {short_repr(r.to_name)} (region {rid}) is not an object of control "
                           f"{short_repr(r.from_name)} (it labels {short_repr(control.to_name, 300)})")
        if r.to_name not in cfg.output_by_image:
            raise BadInput(f"no <BrushLabels> or <PolygonLabels> control in the label config is paired with image "
                           f"{short_repr(r.to_name)}")
